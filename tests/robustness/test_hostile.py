"""Hostile inputs against a live server on 127.0.0.1: a hand-written corpus, one case per parameter. Each gets
the status written beside it, a 4xx in the OpenAI error shape `{"error": {"message", "type", "param",
"code"}}` (or a 200 where the input is legitimately valid), never a 5xx, never a hang (every request has a
client timeout). Then raw-socket abuse of the HTTP layer (malformed framing, slow bodies). Last, the
server must still be ready with nothing running or waiting in the engine.

tests/api/test_completions.py::test_hostile_bodies_never_get_a_5xx holds a smaller corpus (any 4xx); this
one pins the status of each case and covers every endpoint, the body limits and the socket level."""

import inspect
import json
import socket
import time

import httpx
import pytest

import service.__main__
import service.app
import service.connections
from service.connections import DeadlineH11Protocol
from tests.support.live import serve
from tests.support.raw_http import exchange, json_body

TIMEOUT = 20.0  # seconds; a case that takes longer is a hang
VOCAB = 400  # the tiny tokenizer's vocabulary (ids 0..399)
BIG_INT = b"1" + b"0" * 400  # 10**400 as raw JSON: valid JSON, no machine integer holds it
HUGE_INT = b"9" * 5000  # past Python's 4300-digit int parsing limit
JSON = "application/json"


def j(obj) -> bytes:
    return json.dumps(obj).encode()


# (id, path, body, content type or None for no header, expected status)
CORPUS: list[tuple[str, str, bytes, str | None, int]] = [
    # -- huge numbers ---------------------------------------------------------------------------------------
    ("max_tokens-1e308", "/v1/completions", b'{"prompt": "x", "max_tokens": 1e308}', JSON, 400),
    ("max_tokens-10e400", "/v1/completions", b'{"prompt": "x", "max_tokens": ' + BIG_INT + b"}", JSON, 400),
    ("max_tokens-5000-digits", "/v1/completions", b'{"prompt": "x", "max_tokens": ' + HUGE_INT + b"}", JSON, 400),
    ("temperature-10e400", "/v1/completions", b'{"prompt": "x", "temperature": ' + BIG_INT + b"}", JSON, 400),
    ("temperature-1e308", "/v1/completions", b'{"prompt": "x", "temperature": 1e308}', JSON, 400),
    ("temperature-minus-1e308", "/v1/completions", b'{"prompt": "x", "temperature": -1e308}', JSON, 400),
    (
        "temperature-1e-400-is-zero",
        "/v1/completions",
        b'{"prompt": "x", "max_tokens": 1, "temperature": 1e-400}',
        JSON,
        200,
    ),
    ("temperature-1e400", "/v1/completions", b'{"prompt": "x", "temperature": 1e400}', JSON, 400),
    ("seed-2e64", "/v1/completions", b'{"prompt": "x", "seed": 18446744073709551616}', JSON, 400),
    ("seed-negative", "/v1/completions", b'{"prompt": "x", "seed": -1}', JSON, 400),
    ("n-10e400", "/v1/completions", b'{"prompt": "x", "n": ' + BIG_INT + b"}", JSON, 400),
    ("logit_bias-1e308", "/v1/completions", b'{"prompt": "x", "logit_bias": {"1": 1e308}}', JSON, 400),
    ("top_k-10e400", "/v1/completions", b'{"prompt": "x", "top_k": ' + BIG_INT + b"}", JSON, 400),
    ("score-top_logprobs-10e400", "/v1/score", b'{"text": "abc", "top_logprobs": ' + BIG_INT + b"}", JSON, 400),
    ("score-stride-10e400", "/v1/score", b'{"text": "abc", "rolling": true, "stride": ' + BIG_INT + b"}", JSON, 400),
    (
        "chat-max_completion_tokens-10e400",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": ' + BIG_INT + b"}",
        JSON,
        400,
    ),
    ("tokenize-prompt-number", "/tokenize", b'{"prompt": ' + BIG_INT + b"}", JSON, 400),
    ("detokenize-10e400", "/detokenize", b'{"tokens": [' + BIG_INT + b"]}", JSON, 400),
    ("detokenize-5000-digits", "/detokenize", b'{"tokens": [' + HUGE_INT + b"]}", JSON, 400),
    # -- NaN and infinities, raw ----------------------------------------------------------------------------
    *[
        (
            f"{field}-{value.decode()}",
            "/v1/completions",
            b'{"prompt": "x", "' + field.encode() + b'": ' + value + b"}",
            JSON,
            400,
        )
        for field in ("temperature", "top_p", "min_p", "presence_penalty", "repetition_penalty", "max_tokens")
        for value in (b"NaN", b"Infinity", b"-Infinity")
    ],
    ("logit_bias-NaN", "/v1/completions", b'{"prompt": "x", "logit_bias": {"1": NaN}}', JSON, 400),
    ("prompt-ids-NaN", "/v1/completions", b'{"prompt": [NaN]}', JSON, 400),
    (
        "chat-temperature-Infinity",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "temperature": Infinity}',
        JSON,
        400,
    ),
    ("score-stride-NaN", "/v1/score", b'{"text": "abc", "rolling": true, "stride": NaN}', JSON, 400),
    ("detokenize-Infinity", "/detokenize", b'{"tokens": [Infinity]}', JSON, 400),
    # -- deep nesting ---------------------------------------------------------------------------------------
    ("nested-100k-open", "/v1/completions", b"[" * 100_000, JSON, 400),
    ("nested-100k-balanced", "/v1/completions", b"[" * 100_000 + b"]" * 100_000, JSON, 400),
    ("nested-100k-objects", "/v1/completions", b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, JSON, 400),
    ("nested-100k-in-prompt", "/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", JSON, 400),
    ("nested-100k-chat", "/v1/chat/completions", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", JSON, 400),
    ("nested-100k-score", "/v1/score", b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", JSON, 400),
    ("nested-100k-tokenize", "/tokenize", b"[" * 100_000 + b"]" * 100_000, JSON, 400),
    ("nested-100k-detokenize", "/detokenize", b'{"tokens": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", JSON, 400),
    (
        "nested-500-in-ignored-field",
        "/v1/completions",
        b'{"prompt": "x", "max_tokens": 1, "extra": ' + b"[" * 500 + b"]" * 500 + b"}",
        JSON,
        200,
    ),
    ("nested-prompt-3-levels", "/v1/completions", b'{"prompt": [[[1]]]}', JSON, 400),
    # -- invalid UTF-8 in the body --------------------------------------------------------------------------
    ("utf8-ff-fe", "/v1/completions", b'{"prompt": "\xff\xfe", "max_tokens": 1}', JSON, 400),
    ("utf8-encoded-surrogate", "/v1/completions", b'{"prompt": "\xed\xa0\x80", "max_tokens": 1}', JSON, 400),
    ("utf8-overlong-slash", "/v1/completions", b'{"prompt": "\xc0\xaf", "max_tokens": 1}', JSON, 400),
    ("utf8-truncated", "/v1/completions", b'{"prompt": "\xe2\x82', JSON, 400),
    ("utf8-in-key", "/v1/completions", b'{"\xff": 1, "prompt": "x", "max_tokens": 1}', JSON, 400),
    ("utf8-chat", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\x80"}]}', JSON, 400),
    ("utf8-score", "/v1/score", b'{"text": "\xf8\x88\x80\x80\x80"}', JSON, 400),
    ("utf8-tokenize", "/tokenize", b'{"prompt": "\xc3"}', JSON, 400),
    ("utf8-detokenize", "/detokenize", b'{"tokens": [1], "model": "\xfe"}', JSON, 400),
    ("utf8-bom-is-valid", "/v1/completions", b'\xef\xbb\xbf{"prompt": "x", "max_tokens": 1}', JSON, 200),
    # -- lone surrogates, escaped ---------------------------------------------------------------------------
    ("surrogate-prompt", "/v1/completions", b'{"prompt": "\\ud800", "max_tokens": 1}', JSON, 400),
    ("surrogate-prompt-list", "/v1/completions", b'{"prompt": ["ok", "\\udc00"], "max_tokens": 1}', JSON, 400),
    ("surrogate-stop", "/v1/completions", b'{"prompt": "x", "stop": ["\\udfff"], "max_tokens": 1}', JSON, 400),
    ("surrogate-logit_bias-key", "/v1/completions", b'{"prompt": "x", "logit_bias": {"\\ud800": 1}}', JSON, 400),
    ("surrogate-model", "/v1/completions", b'{"prompt": "x", "model": "\\ud800"}', JSON, 400),
    ("surrogate-user", "/v1/completions", b'{"prompt": "x", "user": "\\ud800"}', JSON, 400),
    ("surrogate-chat", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', JSON, 400),
    ("surrogate-score-text", "/v1/score", b'{"text": "\\ud800"}', JSON, 400),
    ("surrogate-score-continuation", "/v1/score", b'{"context": "a", "continuations": ["\\udbff"]}', JSON, 400),
    ("surrogate-score-rolling", "/v1/score", b'{"text": "abc\\ud800", "rolling": true}', JSON, 400),
    ("surrogate-tokenize", "/tokenize", b'{"prompt": "\\ud800"}', JSON, 400),
    ("surrogate-detokenize-model", "/detokenize", b'{"tokens": [1], "model": "\\ud800"}', JSON, 400),
    ("surrogate-pair-is-valid", "/v1/completions", b'{"prompt": "\\ud83d\\ude00", "max_tokens": 1}', JSON, 200),
    ("nul-char-is-valid", "/v1/completions", b'{"prompt": "a\\u0000b", "max_tokens": 1}', JSON, 200),
    # -- many stop strings ----------------------------------------------------------------------------------
    ("stop-100k", "/v1/completions", j({"prompt": "x", "stop": ["s"] * 100_000}), JSON, 400),
    ("stop-100k-distinct", "/v1/completions", j({"prompt": "x", "stop": [str(i) for i in range(100_000)]}), JSON, 400),
    ("stop-token-ids-100k", "/v1/completions", j({"prompt": "x", "stop_token_ids": [1] * 100_000}), JSON, 400),
    ("stop-one-of-100k-chars", "/v1/completions", j({"prompt": "x", "stop": "s" * 100_000}), JSON, 400),
    ("stop-empty", "/v1/completions", j({"prompt": "x", "stop": [""]}), JSON, 400),
    (
        "chat-stop-100k",
        "/v1/chat/completions",
        j({"messages": [{"role": "user", "content": "x"}], "stop": ["s"] * 100_000}),
        JSON,
        400,
    ),
    # -- token ids out of range, in prompts and logit_bias keys ---------------------------------------------
    ("prompt-id-negative", "/v1/completions", j({"prompt": [-1]}), JSON, 400),
    ("prompt-id-vocab", "/v1/completions", j({"prompt": [VOCAB]}), JSON, 400),
    ("prompt-id-2e31", "/v1/completions", j({"prompt": [2**31]}), JSON, 400),
    ("prompt-id-2e63", "/v1/completions", j({"prompt": [2**63]}), JSON, 400),
    ("prompt-id-2e64", "/v1/completions", j({"prompt": [2**64]}), JSON, 400),
    ("prompt-id-10e400", "/v1/completions", b'{"prompt": [' + BIG_INT + b"]}", JSON, 400),
    ("prompt-ids-second-bad", "/v1/completions", j({"prompt": [[1, 2], [3, -5]]}), JSON, 400),
    ("prompt-id-bool", "/v1/completions", j({"prompt": [True]}), JSON, 400),
    ("prompt-id-float", "/v1/completions", j({"prompt": [1.0]}), JSON, 400),
    ("prompt-ids-empty", "/v1/completions", j({"prompt": [[]]}), JSON, 400),
    ("prompt-empty-string", "/v1/completions", j({"prompt": ""}), JSON, 400),
    ("prompt-empty-list", "/v1/completions", j({"prompt": []}), JSON, 400),
    ("prompt-1025", "/v1/completions", j({"prompt": ["x"] * 1025, "max_tokens": 1}), JSON, 400),
    ("logit_bias-negative", "/v1/completions", j({"prompt": "x", "logit_bias": {"-1": 1}}), JSON, 400),
    ("logit_bias-vocab", "/v1/completions", j({"prompt": "x", "logit_bias": {str(VOCAB): 1}}), JSON, 400),
    ("logit_bias-2e63", "/v1/completions", j({"prompt": "x", "logit_bias": {str(2**63): 1}}), JSON, 400),
    ("logit_bias-5000-digits", "/v1/completions", j({"prompt": "x", "logit_bias": {"9" * 5000: 1}}), JSON, 400),
    ("logit_bias-float-key", "/v1/completions", j({"prompt": "x", "logit_bias": {"1e3": 1}}), JSON, 400),
    ("logit_bias-hex-key", "/v1/completions", j({"prompt": "x", "logit_bias": {"0x10": 1}}), JSON, 400),
    ("logit_bias-empty-key", "/v1/completions", j({"prompt": "x", "logit_bias": {"": 1}}), JSON, 400),
    ("logit_bias-101", "/v1/completions", j({"prompt": "x", "logit_bias": {"1": 101}}), JSON, 400),
    (
        "logit_bias-100k-keys",
        "/v1/completions",
        j({"prompt": "x", "max_tokens": 1, "logit_bias": {str(i): 1 for i in range(100_000)}}),
        JSON,
        400,
    ),
    (
        "logit_bias-valid",
        "/v1/completions",
        j({"prompt": "x", "max_tokens": 2, "logit_bias": {"5": 100, "0": -100}}),
        JSON,
        200,
    ),
    ("stop_token_ids-negative", "/v1/completions", j({"prompt": "x", "stop_token_ids": [-1]}), JSON, 400),
    (
        "chat-logit_bias-negative",
        "/v1/chat/completions",
        j({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"-7": 1}}),
        JSON,
        400,
    ),
    ("detokenize-negative", "/detokenize", j({"tokens": [-1]}), JSON, 400),
    ("detokenize-vocab", "/detokenize", j({"tokens": [VOCAB]}), JSON, 400),
    ("detokenize-2e63", "/detokenize", j({"tokens": [2**63]}), JSON, 400),
    ("detokenize-nested", "/detokenize", j({"tokens": [[1]]}), JSON, 400),
    ("detokenize-100k-valid", "/detokenize", j({"tokens": [5] * 100_000}), JSON, 200),
    ("detokenize-empty-valid", "/detokenize", j({"tokens": []}), JSON, 200),
    # -- n x max_tokens bombs -------------------------------------------------------------------------------
    ("n256-max_tokens-100000", "/v1/completions", j({"prompt": "x", "n": 256, "max_tokens": 100_000}), JSON, 400),
    ("n256-max_tokens-1", "/v1/completions", j({"prompt": "x", "n": 256, "max_tokens": 1}), JSON, 400),
    ("n-2e31", "/v1/completions", j({"prompt": "x", "n": 2**31, "max_tokens": 1}), JSON, 400),
    ("n-0", "/v1/completions", j({"prompt": "x", "n": 0}), JSON, 400),
    ("max_tokens-100000", "/v1/completions", j({"prompt": "x", "max_tokens": 100_000}), JSON, 400),
    ("max_tokens-2e31", "/v1/completions", j({"prompt": "x", "max_tokens": 2**31}), JSON, 400),
    ("max_tokens-negative", "/v1/completions", j({"prompt": "x", "max_tokens": -1}), JSON, 400),
    ("prompts-1024-n16", "/v1/completions", j({"prompt": [[1]] * 1024, "n": 16, "max_tokens": 250}), JSON, 400),
    ("prompts-300-n1", "/v1/completions", j({"prompt": [[1]] * 300, "max_tokens": 1}), JSON, 400),
    ("min_tokens-over-max", "/v1/completions", j({"prompt": "x", "min_tokens": 100, "max_tokens": 10}), JSON, 400),
    ("stream-n256", "/v1/completions", j({"prompt": "x", "n": 256, "max_tokens": 100_000, "stream": True}), JSON, 400),
    (
        "chat-n256-max_tokens-100000",
        "/v1/chat/completions",
        j({"messages": [{"role": "user", "content": "x"}], "n": 256, "max_tokens": 100_000}),
        JSON,
        400,
    ),
    (
        "chat-50k-messages",
        "/v1/chat/completions",
        j({"messages": [{"role": "user", "content": "a"}] * 50_000}),
        JSON,
        400,
    ),
    (
        "n16-full-context-is-valid",
        "/v1/completions",
        j({"prompt": [1], "n": 16, "max_tokens": None, "ignore_eos": True}),
        JSON,
        200,
    ),
    (
        "prompts-16-n16-is-valid",
        "/v1/completions",
        j({"prompt": [[1]] * 16, "n": 16, "max_tokens": 8, "ignore_eos": True}),
        JSON,
        200,
    ),
    (
        "echo-logprobs-20-full-is-valid",
        "/v1/completions",
        j({"prompt": [3] * 255, "max_tokens": 1, "echo": True, "logprobs": 20}),
        JSON,
        200,
    ),
    ("score-1025-texts", "/v1/score", j({"text": ["ab"] * 1025}), JSON, 400),
    ("score-1025-continuations", "/v1/score", j({"context": "a", "continuations": ["b"] * 1025}), JSON, 400),
    ("score-empty-continuation", "/v1/score", j({"context": "a", "continuations": [""]}), JSON, 400),
    ("score-stride-0", "/v1/score", j({"text": "ab", "rolling": True, "stride": 0}), JSON, 400),
    ("score-top_logprobs-21", "/v1/score", j({"text": "ab", "top_logprobs": 21}), JSON, 400),
    # more texts than MAX_WAITING_REQUESTS (256) can never be admitted at once: 400, not a 429 to retry forever
    ("score-1024-texts", "/v1/score", j({"text": ["The quick brown fox."] * 1024}), JSON, 400),
    ("score-257-continuations", "/v1/score", j({"context": "The", "continuations": [" quick"] * 257}), JSON, 400),
    (
        "score-256-texts-top20-is-valid",
        "/v1/score",
        j({"text": ["The quick brown fox."] * 256, "top_logprobs": 20}),
        JSON,
        200,
    ),
    (
        "score-256-continuations-is-valid",
        "/v1/score",
        j({"context": "The", "continuations": [" quick"] * 256}),
        JSON,
        200,
    ),
    # -- content types and body shapes ----------------------------------------------------------------------
    ("text-plain", "/v1/completions", b'{"prompt": "x", "max_tokens": 1}', "text/plain", 400),
    ("form-urlencoded", "/v1/completions", b"prompt=x&max_tokens=1", "application/x-www-form-urlencoded", 400),
    (
        "multipart",
        "/v1/completions",
        b"--b\r\nContent-Disposition: form-data; name=prompt\r\n\r\nx\r\n--b--\r\n",
        "multipart/form-data; boundary=b",
        400,
    ),
    ("multipart-no-boundary", "/v1/completions", b"garbage", "multipart/form-data", 400),
    ("content-type-garbage", "/v1/completions", b'{"prompt": "x", "max_tokens": 1}', "\x01;;;==", 400),
    (
        "content-type-json-utf16",
        "/v1/completions",
        '{"prompt": "x", "max_tokens": 1}'.encode("utf-16"),
        "application/json; charset=utf-16",
        200,
    ),
    ("content-type-plus-json", "/v1/completions", b'{"prompt": "x", "max_tokens": 1}', "application/vnd.x+json", 200),
    ("chat-text-plain", "/v1/chat/completions", j({"messages": [{"role": "user", "content": "x"}]}), "text/plain", 400),
    ("score-text-plain", "/v1/score", j({"text": "ab"}), "text/plain", 400),
    ("tokenize-form", "/tokenize", b"prompt=x", "application/x-www-form-urlencoded", 400),
    ("detokenize-xml", "/detokenize", b"<tokens>1</tokens>", "application/xml", 400),
    *[
        (f"{shape}-{path.strip('/').replace('/', '-')}", path, body, JSON, 400)
        for path in (
            "/v1/completions",
            "/v1/chat/completions",
            "/v1/score",
            "/tokenize",
            "/detokenize",
            "/admin/reload",
        )
        for shape, body in (
            ("empty", b""),
            ("whitespace", b"  \n "),
            ("array", b"[]"),
            ("string", b'"prompt"'),
            ("number", b"1"),
            ("null", b"null"),
            ("true", b"true"),
            ("object-empty", b"{}"),
            ("trailing-garbage", b'{"prompt": "x"} x'),
            ("truncated", b'{"prompt": '),
        )
    ],
    ("duplicate-keys-last-wins", "/v1/completions", b'{"prompt": 1, "prompt": "x", "max_tokens": 1}', JSON, 200),
    ("wrong-type-messages", "/v1/chat/completions", j({"messages": {"role": "user", "content": "x"}}), JSON, 400),
    ("wrong-role", "/v1/chat/completions", j({"messages": [{"role": "system\n", "content": "x"}]}), JSON, 400),
    ("chat-messages-empty", "/v1/chat/completions", j({"messages": []}), JSON, 400),
    (
        "chat-template-syntax-is-data",
        "/v1/chat/completions",
        j(
            {
                "messages": [{"role": "user", "content": "{{ 7*7 }}{% for x in range(10**9) %}x{% endfor %}"}],
                "max_tokens": 1,
            }
        ),
        JSON,
        200,
    ),
    ("model-path-traversal", "/v1/completions", j({"prompt": "x", "model": "../../etc/passwd"}), JSON, 404),
    ("tokenize-add_special_tokens-string", "/tokenize", j({"prompt": "x", "add_special_tokens": "yes"}), JSON, 400),
]


@pytest.fixture(scope="module")
def live(http_store):
    with serve(http_store[0]) as live:
        yield live


@pytest.fixture(scope="module")
def client(live):
    with httpx.Client(base_url=live.url, timeout=TIMEOUT) as client:
        yield client


def assert_answer(r: httpx.Response, expected: int, what: str = "") -> None:
    assert r.status_code < 500, (what, r.status_code, r.text[:300])
    assert r.status_code == expected, (what, r.status_code, r.text[:300])
    body = r.json()
    if expected >= 400:
        err = body["error"]
        assert set(body) == {"error"} and set(err) == {"message", "type", "param", "code"}, body
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
        assert isinstance(err["code"], str) and (err["param"] is None or isinstance(err["param"], str))


@pytest.mark.parametrize("path, body, content_type, expected", [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_hostile_body(client, path, body, content_type, expected):
    headers = {"content-type": content_type} if content_type is not None else {}
    start = time.monotonic()
    r = client.post(path, content=body, headers=headers)
    assert_answer(r, expected, f"{path} {body[:80]!r}")
    assert time.monotonic() - start < TIMEOUT


def test_corpus_ids_are_unique():
    assert len({c[0] for c in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/score", "/tokenize", "/detokenize"])
def test_10mb_body_is_413(client, path):
    body = b'{"prompt": "' + b"x" * (10 << 20) + b'"}'
    assert_answer(client.post(path, content=body, headers={"content-type": JSON}), 413, path)

    def chunks():  # no Content-Length: the limit holds on the bytes received
        for _ in range(10):
            yield b"x" * (1 << 20)

    assert_answer(client.post(path, content=chunks(), headers={"content-type": JSON}), 413, path + " chunked")


def test_bodies_just_under_the_limit_are_parsed(client):
    """2 MiB is the default limit: a prompt that fills it is read, tokenized and refused for its length;
    tokenizing 1 MiB is legitimate."""
    text = "The quick brown fox. " * ((2 << 20) // 21 - 10)
    r = client.post("/v1/completions", json={"prompt": text, "max_tokens": 1})
    assert_answer(r, 400)
    assert r.json()["error"]["code"] == "context_length_exceeded"
    r = client.post("/tokenize", json={"prompt": text[: 1 << 20]})
    assert r.status_code == 200 and r.json()["count"] > 50_000


def test_rolling_stride_cannot_multiply_the_work(client):
    """Rolling windows start every `stride` tokens, so stride 1 costs max_model_len times the text: one
    request of a few KB would keep the engine busy for hours on a real model. A rolling request computes
    at most MAX_PROMPTS (1024) full contexts, what the largest plain request could ask for."""
    text = "The quick brown fox jumps over the lazy dog. Serving language models means batching. " * 60
    n = client.post("/tokenize", json={"prompt": text}).json()["count"] + 1  # + the EOS prefix
    assert 1300 < n < 4000
    start = time.monotonic()
    r = client.post("/v1/score", json={"text": text, "rolling": True, "stride": 1})
    assert_answer(r, 400)
    assert r.json()["error"]["param"] == "stride" and "1024 full contexts" in r.json()["error"]["message"]
    assert time.monotonic() - start < 2
    r = client.post("/v1/score", json={"text": [text, text], "rolling": True, "stride": 128})
    assert_answer(r, 200)
    assert r.json()["results"][0]["num_windows"] == 1 + -(-(n - 256) // 128)
    r = client.post(
        "/v1/score", json={"text": text[:2000], "rolling": True, "stride": 8}
    )  # short texts keep any stride
    assert_answer(r, 200)


def test_hostile_query_strings_and_paths(client):
    for path in ("/v1/models?x=" + "%ff" * 1000, "/tokenizer_info?%00=%00", "/health?a=1&a=2&" + "b=1&" * 5000):
        assert_answer(client.get(path), 200, path)
    for path in (
        "/../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/v1/completions/../../etc/passwd",
        "/%00",
        "/" + "a" * 8000,
    ):
        assert_answer(client.get(path), 404, path)
    assert_answer(client.request("DELETE", "/v1/completions"), 405)
    assert_answer(client.request("PUT", "/admin/reload", content=b"{}"), 405)


# -- the HTTP layer, over a raw socket ------------------------------------------------------------------------
RAW = [  # (id, request bytes, statuses allowed besides a 4xx): h11 answers 400 (plain text), the edge a 4xx (JSON)
    ("content-length-negative", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", ()),
    ("content-length-letters", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", ()),
    (
        "content-length-31-digits",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1" + b"0" * 30 + b"\r\n\r\n",
        (),
    ),
    (
        "content-length-twice",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        (),
    ),
    (
        "content-length-and-chunked",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        (),
    ),
    (
        "chunk-size-garbage",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        (),
    ),
    ("transfer-encoding-unknown", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", ()),
    ("non-ascii-path", b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n", ()),
    ("nul-in-path", b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n", ()),
    ("header-without-colon", b"GET /health HTTP/1.1\r\nHost: x\r\nnocolon\r\n\r\n", ()),
    ("header-nul", b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", ()),
    (
        "header-folded-is-accepted",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
        (200,),
    ),  # obs-fold, RFC 9112 5.2
    ("http-2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", ()),
    ("http-0.9", b"GET /health\r\n\r\n", ()),
    ("not-http", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, ()),  # a TLS ClientHello
    ("no-host-http-1.1", b"GET /health HTTP/1.1\r\n\r\n", ()),
    ("bare-lf-is-accepted", b"GET /health HTTP/1.1\nHost: x\n\n", (200,)),  # h11 is lenient here, harmlessly
    ("request-id-header-injection", b"GET /health HTTP/1.1\r\nHost: x\r\nX-Request-Id: a\rSet-Cookie: x\r\n\r\n", ()),
]


@pytest.mark.parametrize("request_bytes, allowed", [r[1:] for r in RAW], ids=[r[0] for r in RAW])
def test_malformed_http_is_a_4xx_or_a_close(live, request_bytes, allowed):
    status, data, closed, elapsed = exchange(live.url, [request_bytes], read_timeout=10)
    assert status is None or 400 <= status < 500 or status in allowed, data[:300]
    assert status is not None or closed, data[:300]  # no answer at all: then the connection must be closed
    assert elapsed < 10
    if status is not None and b"application/json" in data.partition(b"\r\n\r\n")[0].lower():
        assert status in allowed or set(json_body(data)["error"]) == {"message", "type", "param", "code"}


def test_content_length_past_the_limit_is_413_before_the_body(live):
    status, data, _, elapsed = exchange(
        live.url,
        [
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000000\r\n\r\n{"
        ],
        read_timeout=5,
    )
    assert status == 413 and json_body(data)["error"]["code"] == "request_too_large" and elapsed < 5


@pytest.fixture
def body_timeout(monkeypatch):
    """The edge's body deadline (service.app.BODY_TIMEOUT_S, 30 s), shortened to keep the test fast; it is
    read when each request starts."""
    monkeypatch.setattr(service.app, "BODY_TIMEOUT_S", 1.0)
    return 1.0


@pytest.mark.parametrize(
    "path", ["/v1/completions", "/v1/chat/completions", "/v1/score", "/tokenize", "/detokenize", "/admin/reload"]
)
def test_slow_body_gets_408_within_the_body_timeout(live, body_timeout, path):
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    ).encode()
    drip = [head] + [
        b'{"p',
        b"r",
        b"o",
        b"m",
        b"p",
        b"t",
        b'"',
        b":",
        b" ",
        b" ",
    ]  # a byte every 0.15 s, never all 1000
    status, data, closed, elapsed = exchange(live.url, drip, delay=0.15, read_timeout=10)
    assert status == 408, data[:300]
    err = json_body(data)["error"]
    assert err["code"] == "invalid_value" and "did not arrive within 1 s" in err["message"]
    assert closed  # a client that slow gets no keep-alive: the connection is closed after the 408
    assert elapsed < body_timeout + 11 * 0.15 + 1


def test_body_that_never_comes_gets_408(live, body_timeout):
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n"
    status, data, closed, elapsed = exchange(live.url, [head], read_timeout=10)
    assert status == 408 and closed and body_timeout <= elapsed < body_timeout + 3, (data[:200], elapsed)


@pytest.fixture(scope="module")
def deadline_url(http_store):
    """A server with the connection-level request deadline `python -m service` uses (service/connections.py;
    serve() otherwise runs plain uvicorn)."""
    with serve(http_store[0], uvicorn_options={"timeout_keep_alive": 5, "http": DeadlineH11Protocol}) as live:
        yield live.url


@pytest.fixture
def request_timeout(monkeypatch):
    """service.connections.REQUEST_TIMEOUT_S (40 s), shortened; read when a request's first byte arrives."""
    monkeypatch.setattr(service.connections, "REQUEST_TIMEOUT_S", 1.5)
    return 1.5


def test_main_serves_with_the_request_deadline():
    assert "http=DeadlineH11Protocol" in inspect.getsource(service.__main__.main)


SLOW_CLIENTS = [  # (id, parts sent 0.25 s apart, the status expected before the close, or None)
    ("connects-and-sends-nothing", [], None),
    (
        "headers-a-byte-at-a-time",
        [b"POST /v1/completions HTTP/1.1\r\n"] + [bytes([c]) for c in b"Host: x\r\nX-Slow: " + b"a" * 40],
        None,
    ),
    (
        "get-with-a-trickled-body",
        [b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"] + [b"a"] * 30,
        200,
    ),
    (
        "413-then-a-trickled-body",
        [b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n"] + [b"a"] * 30,
        413,
    ),
    (
        "404-then-a-trickled-body",
        [b"POST /nothing HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"] + [b"a"] * 30,
        404,
    ),
]


@pytest.mark.parametrize("parts, status", [c[1:] for c in SLOW_CLIENTS], ids=[c[0] for c in SLOW_CLIENTS])
def test_slow_clients_are_cut_at_the_request_deadline(deadline_url, request_timeout, parts, status):
    """uvicorn alone keeps each of these connections open for as long as the client trickles bytes."""
    host, port = deadline_url.removeprefix("http://").split(":")
    start = time.monotonic()
    data, closed = b"", False
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.settimeout(0.25)
        for part in [*parts, *[b""] * 40]:  # then wait, reading, for up to 10 s more
            try:
                if part:
                    sock.sendall(part)
                chunk = sock.recv(65536)
                if not chunk:
                    closed = True
                    break
                data += chunk
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
    elapsed = time.monotonic() - start
    assert closed, f"still open after {elapsed:.1f} s: {data[:200]!r}"
    assert elapsed < request_timeout + 1.5, elapsed
    assert (int(data.split(b" ", 2)[1]) if data else None) == status, data[:300]


def test_the_deadline_spares_complete_requests_and_keep_alive(deadline_url, monkeypatch):
    monkeypatch.setattr(service.connections, "REQUEST_TIMEOUT_S", 0.3)
    with httpx.Client(base_url=deadline_url, timeout=TIMEOUT) as client:
        start = time.monotonic()  # a response that takes longer than the deadline: the request was complete
        body = {"prompt": [[1], [2], [3], [4]], "n": 16, "max_tokens": 250, "ignore_eos": True}  # 64 x 250 tokens
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200 and time.monotonic() - start > 0.3
        time.sleep(1.0)  # idle between requests: uvicorn's keep-alive (5 s) rules, not the deadline
        assert client.get("/health").status_code == 200
        with client.stream(
            "POST", "/v1/completions", json={"prompt": [1], "max_tokens": 250, "ignore_eos": True, "stream": True}
        ) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and len(events) > 100


# -- afterwards ----------------------------------------------------------------------------------------------
def gauge(text: str, name: str) -> float:
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def test_server_is_healthy_after_the_corpus(live, client):
    """Runs last in this module (pytest keeps file order): nothing the corpus did may leave the server
    unready or with sequences left in the engine."""
    deadline = time.monotonic() + 10
    while True:
        text = client.get("/metrics").text
        running, waiting = (
            gauge(text, "gpt2_serve_num_requests_running"),
            gauge(text, "gpt2_serve_num_requests_waiting"),
        )
        if (running, waiting) == (0, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert client.get("/ready").status_code == 200 and client.get("/health").status_code == 200
    assert (running, waiting) == (0, 0)
    assert gauge(text, "gpt2_serve_kv_cache_usage_ratio") == 0
    assert 'gpt2_serve_requests_total{endpoint="/v1/completions",status="500"}' not in text
    assert not [
        line for line in text.splitlines() if line.startswith("gpt2_serve_requests_total") and 'status="5' in line
    ]
    r = client.post("/v1/completions", json={"prompt": "The quick", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
