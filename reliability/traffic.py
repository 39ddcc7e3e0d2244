"""What the suites send: random valid requests (`mixed_request`, the soak's mix of completions, chat and
scoring; `fixed_request`, the overload suite's one shape) as plain `Spec`s, made of WORDS and random token
ids. Sending them is reliability/load.py's.
"""

import random
from dataclasses import dataclass

WORDS = (
    "the quick brown fox jumps over lazy dog serving language models means batching requests that arrive "
    "at different times tokens positions and caches every sequence decodes its own position a of to in is "
    "on for with as by this was from be or are not but have"
).split()


@dataclass
class Spec:
    kind: str
    path: str
    body: dict
    stream: bool = False
    abort_after: int | None = None  # a stream: hang up after this many events
    expect: int = 1  # choices (completions) or results (score) in a complete answer


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def random_token(rng: random.Random, vocab: int, eos: int | None) -> int:
    """A random token id other than EOS."""
    t = rng.randrange(vocab - 1)
    return t + 1 if eos is not None and t >= eos else t


def _sampling(rng: random.Random, info: dict, max_new: int) -> dict:
    body: dict = {"max_tokens": rng.randint(1, max_new)}
    if rng.random() < 0.7:
        body["temperature"] = rng.choice([0.0, 0.5, 0.8, 1.0, 1.3])
    if rng.random() < 0.3:
        body["top_p"] = rng.choice([0.5, 0.9, 1.0])
    if rng.random() < 0.3:
        body["top_k"] = rng.choice([-1, 0, 1, 5, 50])
    if rng.random() < 0.15:
        body["min_p"] = rng.choice([0.0, 0.05, 0.1])
    if rng.random() < 0.2:
        body[rng.choice(["presence_penalty", "frequency_penalty"])] = rng.choice([-1.0, 0.5, 1.5])
    if rng.random() < 0.15:
        body["repetition_penalty"] = rng.choice([0.8, 1.1, 1.3])
    if rng.random() < 0.3:
        body["seed"] = rng.randrange(1 << 30)
    if rng.random() < 0.2:
        body["stop"] = rng.choice(["\n", [" the", "."], ["fox"]])
    if rng.random() < 0.1:
        body["logit_bias"] = {str(rng.randrange(info["vocab_size"])): rng.choice([-100.0, 5.0])}
    if rng.random() < 0.2:
        body["ignore_eos"] = True
    if rng.random() < 0.15:
        body["min_tokens"] = rng.randint(0, body["max_tokens"])
    if rng.random() < 0.2:
        body["n"] = 2
    return body


def mixed_request(rng: random.Random, info: dict, *, abort_fraction: float = 0.1, max_new: int = 32) -> Spec:
    """One random valid request of the soak mix: completions and chat (streaming or not), scoring (texts,
    context + continuations, rolling). `abort_fraction` of the streams hang up after 1-3 events."""
    max_len, vocab, eos = info["max_model_len"], info["vocab_size"], info["eos_token_id"]
    max_new = min(max_new, max_len // 4)
    kind = rng.choices(
        ["completion", "completion_stream", "chat", "chat_stream", "score_text", "score_cont", "score_rolling"],
        weights=[30, 25, 10, 10, 8, 9, 8],
    )[0]
    stream = kind.endswith("_stream")
    abort_after = rng.randint(1, 3) if stream and rng.random() < abort_fraction else None
    if kind.startswith("completion"):
        body = _sampling(rng, info, max_new)
        if rng.random() < 0.5:
            body["prompt"] = _words(rng, 1, 20)
        else:
            body["prompt"] = [random_token(rng, vocab, eos) for _ in range(rng.randint(1, 48))]
        if rng.random() < 0.3:
            body["logprobs"] = rng.randint(0, 3)
            body["echo"] = rng.random() < 0.3
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": rng.random() < 0.5}
        return Spec(kind, "/v1/completions", body, stream, abort_after, body.get("n", 1))
    if kind.startswith("chat"):
        body = _sampling(rng, info, max_new)
        roles = ["user", "assistant"]
        body["messages"] = [{"role": roles[i % 2], "content": _words(rng, 1, 12)} for i in range(rng.choice([1, 1, 3]))]
        if rng.random() < 0.2:
            body["logprobs"] = True
            body["top_logprobs"] = rng.randint(0, 3)
        if stream:
            body["stream"] = True
        return Spec(kind, "/v1/chat/completions", body, stream, abort_after, body.get("n", 1))
    top = rng.choice([0, 0, 1, 3])
    if kind == "score_text":
        texts = [_words(rng, 2, 30) for _ in range(rng.randint(1, 2))]
        return Spec(kind, "/v1/score", {"text": texts, "top_logprobs": top}, expect=len(texts))
    if kind == "score_cont":
        conts = [" " + _words(rng, 1, 5) for _ in range(rng.randint(1, 3))]
        return Spec(
            kind,
            "/v1/score",
            {"context": _words(rng, 3, 20), "continuations": conts, "top_logprobs": top},
            expect=len(conts),
        )
    # rolling: about 1.2-2.4 contexts of text in windows of half a context (2 to 4 windows); ~1.5 tokens a word
    words = int(max_len * rng.uniform(1.2, 2.4) / 1.5)
    return Spec(
        kind, "/v1/score", {"text": _words(rng, words, words), "rolling": True, "stride": max_len // 2}, expect=1
    )


def fixed_request(rng: random.Random, info: dict, prompt_len: int, new_tokens: int, spread: float = 0.0) -> Spec:
    """The overload suite's request: non-streaming, `prompt_len` random token ids (no prefix shared), exactly
    `new_tokens` generated (or uniformly within +-`spread` of it), greedy. A spread keeps closed-loop clients
    from running in lockstep (all admitted, prefilled and finished in the same steps), which flatters a
    baseline measured at exactly the admitted concurrency."""
    vocab, eos = info["vocab_size"], info["eos_token_id"]
    prompt = [random_token(rng, vocab, eos) for _ in range(prompt_len)]
    lo, hi = max(1, round(new_tokens * (1 - spread))), max(1, round(new_tokens * (1 + spread)))
    body = {"prompt": prompt, "max_tokens": rng.randint(lo, hi), "ignore_eos": True, "temperature": 0.0}
    return Spec("completion", "/v1/completions", body)
