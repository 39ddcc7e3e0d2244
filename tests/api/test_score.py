"""/v1/score over real HTTP against HF log_softmax: texts, context + continuations (context computed
once), rolling windows over texts longer than the context; tokenizer endpoints."""

import math

import torch
from tokenizers import Tokenizer

from model_store.windows import rolling_windows
from tests.support.live import serve


def hf_logprobs(hf, ids):
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)


def encode(http_store, text):
    return Tokenizer.from_file(str(http_store[1][1] / "tokenizer.json")).encode(text, add_special_tokens=False).ids


EOS = 0  # the tiny tokenizer's <|endoftext|>


def test_text_scores_equal_hf(live, hf_tiny, http_store):
    texts = ["The quick brown fox jumps.", "Caf\u00e9 \U0001f600 \u4f60\u597d"]
    body = live.client.post("/v1/score", json={"text": texts, "top_logprobs": 3}).json()
    for text, result in zip(texts, body["results"]):
        ids = [EOS] + encode(http_store, text)
        ref = hf_logprobs(hf_tiny, ids)
        expected = [ref[j, ids[j + 1]].item() for j in range(len(ids) - 1)]
        assert result["token_ids"] == ids[1:] and result["num_tokens"] == len(ids) - 1
        assert max(abs(a - b) for a, b in zip(result["logprobs"], expected)) <= 1e-4
        assert abs(result["sum_logprob"] - sum(expected)) <= 1e-3
        assert math.isclose(result["perplexity"], math.exp(-result["sum_logprob"] / result["num_tokens"]))
        assert [t["token_id"] for t in result["top_logprobs"][0]] == ref[0].topk(3).indices.tolist()
        assert result["is_greedy"] == [ref[j].argmax().item() == ids[j + 1] for j in range(len(ids) - 1)]
    assert body["usage"]["scored_tokens"] == sum(r["num_tokens"] for r in body["results"])


def test_context_continuations_equal_hf_and_share_the_context(live, hf_tiny, http_store):
    context = "Serving language models means batching requests that arrive at different times and"
    continuations = [" tokens", " positions and caches", " the quick brown fox"]

    def hits():
        text = live.client.get("/metrics").text
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("gpt2_serve_prefix_cache_hits_total")
        )

    before = hits()
    body = live.client.post("/v1/score", json={"context": context, "continuations": continuations}).json()
    ctx = [EOS] + encode(http_store, context)
    assert body["context_tokens"] == len(ctx)
    for cont, result in zip(continuations, body["results"]):
        ids = encode(http_store, cont)
        ref = hf_logprobs(hf_tiny, ctx + ids)
        expected = [ref[len(ctx) - 1 + k, t].item() for k, t in enumerate(ids)]
        assert result["num_tokens"] == len(ids)
        assert abs(result["sum_logprob"] - sum(expected)) <= 1e-4
        assert result["greedy"] == all(ref[len(ctx) - 1 + k].argmax().item() == t for k, t in enumerate(ids))
    full_blocks = (len(ctx) // 16) * 16
    assert hits() - before >= 2 * full_blocks > 0  # continuations 2 and 3 reused the context's blocks


def test_rolling_equals_window_by_window_reference(live, hf_tiny, http_store):
    text = "The quick brown fox jumps over the lazy dog. Tokens, positions and caches. " * 12
    body = live.client.post("/v1/score", json={"text": text, "rolling": True, "stride": 100}).json()
    (result,) = body["results"]
    ids = [EOS] + encode(http_store, text)
    assert len(ids) > 256  # longer than the context: needs windows
    total, count = 0.0, 0
    for w in rolling_windows(len(ids), 256, 100):
        window = ids[w.start : w.end]
        ref = hf_logprobs(hf_tiny, window)
        for j in range(max(w.score_from, 1), len(window)):
            total += ref[j - 1, window[j]].item()
            count += 1
    assert count == len(ids) - 1 == result["num_tokens"]  # every token after the EOS once
    assert abs(result["sum_logprob"] - total) <= 1e-3
    assert math.isclose(result["bits_per_byte"], -total / math.log(2) / len(text.encode()), rel_tol=1e-5)
    assert result["num_windows"] == len(rolling_windows(len(ids), 256, 100))


def test_score_errors(live):
    long = "word " * 400
    cases = [
        ({"text": long}, "text", "context_length_exceeded"),
        ({"text": ""}, "text", "invalid_value"),
        ({"text": "a", "context": "b", "continuations": ["c"]}, "context", "invalid_value"),
        ({"context": "b", "continuations": []}, "continuations", "invalid_value"),
        ({"context": "b", "continuations": [""]}, "continuations[0]", "invalid_value"),
        ({}, "text", "invalid_value"),
        ({"text": "abc", "top_logprobs": 21}, "top_logprobs", "invalid_value"),
        ({"text": long, "rolling": True, "stride": 1000}, "stride", "invalid_value"),
    ]
    for body, param, code in cases:
        r = live.client.post("/v1/score", json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param and r.json()["error"]["code"] == code, (body, r.text)


def test_tokenizer_endpoints(live, http_store):
    info = live.client.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 256
    toks = live.client.post("/tokenize", json={"prompt": "<|endoftext|>The quick", "add_special_tokens": False}).json()
    assert toks["tokens"] == [EOS] + encode(http_store, "The quick")
    assert live.client.post("/detokenize", json={"tokens": toks["tokens"]}).json() == {
        "prompt": "<|endoftext|>The quick"
    }
    r = live.client.post("/detokenize", json={"tokens": [1, 100000]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    models = live.client.get("/v1/models").json()["data"]
    assert [(m["id"], m["max_model_len"], m["dtype"]) for m in models] == [("tiny@1", 256, "float32")]


def test_scoring_is_refused_with_int8_weights_and_generation_serves(http_store):
    """Under QUANTIZATION=int8 a score would not be the model's own: /v1/score and echo + logprobs are a 400
    in the OpenAI error shape, while generation (its logprobs included) serves."""
    with serve(http_store[0], quantization="int8") as server:
        r = server.client.post("/v1/score", json={"text": "hello world"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported"
        assert "QUANTIZATION=int8" in r.json()["error"]["message"]
        body = {"prompt": "hello", "max_tokens": 1, "echo": True, "logprobs": 1}
        r = server.client.post("/v1/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported"
        r = server.client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3, "logprobs": 2})
        assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["tokens"]) == 3
