"""/v1/completions and /v1/chat/completions over real HTTP: parity with HF, stream = non-stream, the
echo + logprobs shape lm-evaluation-harness relies on, n and several prompts, and every bad input as a
400 in the OpenAI error shape."""

import json
import math

import pytest
import torch
from tokenizers import Tokenizer

from tests.support.live import serve


def tokenizer(http_store) -> Tokenizer:
    return Tokenizer.from_file(str(http_store[1][1] / "tokenizer.json"))


def sse_events(text: str) -> list:
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_greedy_completion_equals_hf_generate(live, hf_tiny, http_store):
    ids = [5, 17, 42, 99, 7]
    r = live.client.post(
        "/v1/completions", json={"prompt": ids, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    expected = hf_tiny.generate(
        torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0
    )[0, 5:].tolist()
    choice = body["choices"][0]
    assert choice["text"] == tokenizer(http_store).decode(expected)
    assert len(choice["logprobs"]["tokens"]) == 12 and choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}
    assert body["model"] == "tiny@1" and body["object"] == "text_completion"


def test_stream_equals_non_stream_with_n_and_several_prompts(live):
    req = {
        "prompt": ["The quick brown", "Tokens, positions"],
        "n": 2,
        "max_tokens": 8,
        "temperature": 0.9,
        "seed": 3,
        "ignore_eos": True,
        "logprobs": 2,
    }
    full = live.client.post("/v1/completions", json=req).json()
    streamed = live.client.post(
        "/v1/completions", json={**req, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed.text)
    texts, tokens, finish = {}, {}, {}
    for e in events[:-1]:
        (c,) = e["choices"]
        texts[c["index"]] = texts.get(c["index"], "") + c["text"]
        tokens[c["index"]] = tokens.get(c["index"], []) + c["logprobs"]["tokens"]
        finish[c["index"]] = c["finish_reason"] or finish.get(c["index"])
    assert [c["index"] for c in full["choices"]] == [0, 1, 2, 3]
    for c in full["choices"]:
        assert texts[c["index"]] == c["text"] and tokens[c["index"]] == c["logprobs"]["tokens"]
        assert finish[c["index"]] == c["finish_reason"] == "length"
    assert events[-1]["usage"] == full["usage"] and events[-1]["choices"] == []
    assert full["usage"]["completion_tokens"] == 4 * 8
    assert full["choices"][0]["text"] != full["choices"][1]["text"]  # samples differ (seed, seed + 1)


def test_seeded_request_reproducible_and_identical_greedy_requests_agree(live):
    req = {"prompt": "Serving language", "max_tokens": 10, "temperature": 1.0, "seed": 42}
    a, b = (live.client.post("/v1/completions", json=req).json()["choices"][0]["text"] for _ in range(2))
    assert a == b
    greedy = {"prompt": "Serving language", "max_tokens": 10, "temperature": 0}
    outs = {live.client.post("/v1/completions", json=greedy).json()["choices"][0]["text"] for _ in range(3)}
    assert len(outs) == 1


def test_echo_logprobs_have_lm_eval_semantics(live, hf_tiny):
    ids = [3, 50, 120, 7, 260, 18]
    r = live.client.post(
        "/v1/completions",
        json={"prompt": [ids], "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0, "seed": 1234},
    )
    lp = r.json()["choices"][0]["logprobs"]
    ref = torch.log_softmax(hf_tiny(torch.tensor([ids])).logits[0].float(), -1)
    assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt's entries, then the generated token's
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for j in range(1, len(ids)):
        assert abs(lp["token_logprobs"][j] - ref[j - 1, ids[j]].item()) <= 1e-4
        greedy = ref[j - 1].argmax().item() == ids[j]
        assert (lp["token_logprobs"][j] == max(lp["top_logprobs"][j].values())) == greedy  # lm-eval's is_greedy
    assert abs(lp["token_logprobs"][-1] - ref[-1].max().item()) <= 1e-4  # the generated (greedy) token
    assert lp["text_offset"] == sorted(lp["text_offset"])
    zero = live.client.post(
        "/v1/completions", json={"prompt": [ids], "max_tokens": 0, "echo": True, "logprobs": 0}
    ).json()
    assert len(zero["choices"][0]["logprobs"]["token_logprobs"]) == len(ids)
    assert zero["usage"]["completion_tokens"] == 0


def test_stream_echo_sends_prompt_first(live):
    req = {"prompt": "The quick", "max_tokens": 3, "echo": True, "logprobs": 0, "temperature": 0, "ignore_eos": True}
    full = live.client.post("/v1/completions", json=req).json()["choices"][0]
    events = sse_events(live.client.post("/v1/completions", json={**req, "stream": True}).text)
    assert "".join(e["choices"][0]["text"] for e in events) == full["text"]
    assert [t for e in events for t in e["choices"][0]["logprobs"]["token_logprobs"]] == full["logprobs"][
        "token_logprobs"
    ]


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({"prompt": ""}, "prompt", "invalid_value"),
        ({"prompt": []}, "prompt", "invalid_value"),
        ({"prompt": [1, 2, 400]}, "prompt", "invalid_value"),
        ({"prompt": [[1], [-1]]}, "prompt[1]", "invalid_value"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"prompt": "x", "max_tokens": -3}, "max_tokens", "invalid_value"),
        ({"prompt": "x", "max_tokens": 300}, "max_tokens", "context_length_exceeded"),
        ({"prompt": "x", "temperature": 2.5}, "temperature", "invalid_value"),
        ({"prompt": "x", "top_p": 0}, "top_p", "invalid_value"),
        ({"prompt": "x", "logprobs": 21}, "logprobs", "invalid_value"),
        ({"prompt": "x", "n": 17}, "n", "invalid_value"),
        ({"prompt": "x", "stop": ["a"] * 17}, "stop", "invalid_value"),
        ({"prompt": "x", "stop": [""]}, "stop", "invalid_value"),
        ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias", "invalid_value"),
        ({"prompt": "x", "logit_bias": {"100000": 1}}, "logit_bias", "invalid_value"),
        ({"prompt": "x", "max_tokens": "5"}, "max_tokens", "invalid_value"),
        ({"prompt": "x", "seed": 2**70}, "seed", "invalid_value"),
        ({"prompt": "x", "min_tokens": 20, "max_tokens": 5}, "min_tokens", "invalid_value"),
        ({"max_tokens": 5}, "prompt", "invalid_value"),
    ],
)
def test_bad_input_is_a_400_in_the_openai_shape(live, body, param, code):
    r = live.client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["code"] == code and err["type"] == "invalid_request_error"


def test_context_error_names_both_numbers(live):
    err = live.client.post("/v1/completions", json={"prompt": [1] * 200, "max_tokens": 100}).json()["error"]
    assert (
        "maximum context length is 256 tokens" in err["message"]
        and "300 tokens (200 in the prompt, 100 for the completion)" in err["message"]
    )


def test_malformed_json_nan_and_unknown_fields(live):
    r = live.client.post("/v1/completions", content=b'{"prompt": "x", ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("the body is not valid JSON")
    for value in (b"NaN", b"Infinity", b"1e400"):
        r = live.client.post(
            "/v1/completions",
            content=b'{"prompt": "x", "temperature": ' + value + b"}",
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = live.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "frobnicate": [1, 2], "user": "u"})
    assert r.status_code == 200


def test_unknown_model_route_and_method(live):
    r = live.client.post("/v1/completions", json={"prompt": "x", "model": "gpt-4"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    for name in ("tiny", "tiny@1"):
        assert (
            live.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "model": name}).status_code == 200
        )
    r = live.client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = live.client.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_chat_uses_dialogpt_convention_and_streams_the_same(live, http_store):
    tok = tokenizer(http_store)
    eos = tok.token_to_id("<|endoftext|>")
    messages = [
        {"role": "user", "content": "Hello there."},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "How are you?"},
    ]
    ids = []
    for m in messages:
        ids += tok.encode(m["content"], add_special_tokens=False).ids + [eos]
    chat = live.client.post(
        "/v1/chat/completions", json={"messages": messages, "max_tokens": 6, "temperature": 0}
    ).json()
    plain = live.client.post("/v1/completions", json={"prompt": ids, "max_tokens": 6, "temperature": 0}).json()
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": plain["choices"][0]["text"]}
    assert chat["usage"] == plain["usage"]
    events = sse_events(
        live.client.post(
            "/v1/chat/completions", json={"messages": messages, "max_tokens": 6, "temperature": 0, "stream": True}
        ).text
    )
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert (
        "".join(e["choices"][0]["delta"].get("content", "") for e in events) == chat["choices"][0]["message"]["content"]
    )
    assert events[-1]["choices"][0]["finish_reason"] == chat["choices"][0]["finish_reason"]
    r = live.client.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role"


def test_chat_logprobs_true_alone_gives_each_tokens_logprob(live):
    """OpenAI's `logprobs: true` without `top_logprobs` returns each token's logprob and empty top lists
    (top_logprobs defaults to 0); it once sent NaN, a 500 from the JSON encoder and invalid JSON in a stream."""
    messages = [{"role": "user", "content": "Hello there."}]
    body = {"messages": messages, "max_tokens": 5, "ignore_eos": True, "logprobs": True, "seed": 3}
    r = live.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 5
    assert all(math.isfinite(e["logprob"]) and e["logprob"] <= 0 and e["top_logprobs"] == [] for e in content)
    with_top = live.client.post("/v1/chat/completions", json={**body, "top_logprobs": 0}).json()
    assert with_top["choices"][0]["logprobs"]["content"] == content  # the same seed: the same tokens and values
    events = sse_events(live.client.post("/v1/chat/completions", json={**body, "stream": True}).text)
    streamed = [e for ev in events for c in ev["choices"] if c.get("logprobs") for e in c["logprobs"]["content"]]
    assert streamed == content


def test_chat_uses_the_models_chat_template(http_store):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there."}]
    rendered = "[system] Be brief.\n[user] Hello there.\n[assistant]"
    with serve(http_store[0], model="tiny@3") as live:
        chat = live.client.post(
            "/v1/chat/completions", json={"messages": messages, "max_tokens": 5, "temperature": 0}
        ).json()
        plain = live.client.post("/v1/completions", json={"prompt": rendered, "max_tokens": 5, "temperature": 0}).json()
        assert chat["choices"][0]["message"]["content"] == plain["choices"][0]["text"]
        assert chat["usage"] == plain["usage"]
        assert live.client.get("/tokenizer_info").json()["chat_template"].startswith("{% for m in messages %}")


HOSTILE = [
    b'{"prompt": "\\ud800abc", "max_tokens": 2}',  # a lone surrogate: valid JSON, invalid Unicode
    b'{"prompt": "ok", "stop": ["\\udfff"], "max_tokens": 2}',
    b'{"text": "\\ud800"}',
    b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"prompt": "\xff\xfe", "max_tokens": 2}',  # invalid UTF-8
    b"[" * 50000 + b"]" * 50000,  # deeply nested
    b'{"prompt": "x", "logit_bias": {"1": 1e308}}',
    b'{"prompt": [1e30]}',
    b'{"prompt": "x", "n": 1e30}',
    b'{"prompt": "x", "max_tokens": 99999999999999999999999}',
    b'{"prompt": [[1, 2], "mixed"]}',
    b'{"prompt": "x", "stop": null, "seed": -1}',
    b"null",
    b"",
]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/score", "/tokenize", "/detokenize"])
def test_hostile_bodies_never_get_a_5xx(live, path):
    for body in HOSTILE:
        r = live.client.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code < 500, (path, body[:60], r.status_code, r.text[:200])
        if r.status_code >= 400:  # some bodies are valid for some endpoints (extra fields are ignored)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
