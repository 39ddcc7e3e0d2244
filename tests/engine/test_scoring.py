"""Scoring through the engine's scheduler: prompt logprobs against HF log_softmax, context reuse, rolling."""

import pytest
import torch

from model_store.windows import rolling_windows
from service.engine import EngineRequest, SamplingParams

from .test_engine import make_engine, random_prompts

SCORE = SamplingParams(max_tokens=0, prompt_logprobs=5)


def score(engine, rid, tokens, params=SCORE, score_from=None):
    engine.add(EngineRequest(rid, tokens, params, score_from=score_from))
    seq = engine.requests[rid][0].seq
    outs = []
    while engine.has_work:
        outs += [o for o in engine.step() if o.request_id == rid]
    assert outs[-1].finished
    return outs[0].prompt_logprobs, seq


def hf_logprobs(hf, tokens):
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([tokens])).logits[0].float(), -1)  # (L, V)


@pytest.mark.parametrize("top", [5, 0])  # 0: the compiled one-pass target logprobs, where built
@pytest.mark.parametrize("budget", [8, 256])  # chunked prefill and one chunk
def test_prompt_logprobs_equal_hf(tiny, budget, top):
    loaded, hf = tiny
    tokens = random_prompts(1, loaded.model.cfg.vocab_size, 31, 50, 50)[0]
    params = SamplingParams(max_tokens=0, prompt_logprobs=top)
    got, _ = score(make_engine(loaded, max_num_batched_tokens=budget), "s", tokens, params)
    ref = hf_logprobs(hf, tokens)
    assert len(got) == len(tokens) - 1 and got[0].token_id == tokens[1]
    for j, entry in enumerate(got):  # entry j scores token j + 1 given tokens 0..j
        assert abs(entry.logprob - ref[j, tokens[j + 1]].item()) <= 1e-4
        best = ref[j].topk(top)
        assert [t for t, _ in entry.top] == best.indices.tolist()
        assert all(abs(lp - r) <= 1e-4 for (_, lp), r in zip(entry.top, best.values.tolist()))
        assert entry.greedy == (ref[j].argmax().item() == tokens[j + 1])
    assert any(e.greedy for e in got) or not any(ref[j].argmax() == tokens[j + 1] for j in range(len(got)))


def test_context_continuations_reuse_context_and_equal_fresh(tiny):
    loaded, hf = tiny
    vocab = loaded.model.cfg.vocab_size
    context = random_prompts(1, vocab, 32, 41, 41)[0]
    continuations = random_prompts(3, vocab, 33, 2, 6)
    engine = make_engine(loaded)
    score(engine, "ctx", context, SamplingParams(max_tokens=0))  # computes the context once
    for i, cont in enumerate(continuations):
        got, seq = score(
            engine, f"c{i}", context + cont, SamplingParams(max_tokens=0, prompt_logprobs=0), score_from=len(context)
        )
        assert seq.num_cached_tokens == 40  # 10 blocks of 4 came from the cache
        ref = hf_logprobs(hf, context + cont)
        assert [e.token_id for e in got] == cont
        expected = [ref[len(context) - 1 + k, t].item() for k, t in enumerate(cont)]
        assert max(abs(e.logprob - x) for e, x in zip(got, expected)) <= 1e-4


def test_continuations_added_together_compute_the_context_once(tiny):
    loaded, hf = tiny
    vocab = loaded.model.cfg.vocab_size
    context = random_prompts(1, vocab, 35, 41, 41)[0]  # 10 full blocks of 4, then 1
    continuations = random_prompts(3, vocab, 36, 3, 3)
    engine = make_engine(loaded, max_num_batched_tokens=16)
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    for i, cont in enumerate(continuations):  # all arrive in the same step
        engine.add(
            EngineRequest(
                f"c{i}", context + cont, params, score_from=len(context), shares_prefix_with="c0" if i else None
            )
        )
    seqs = [engine.requests[f"c{i}"][0].seq for i in range(3)]
    got, computed = {}, 0
    while engine.has_work:
        for o in engine.step():
            got[o.request_id] = o.prompt_logprobs
        computed += engine.last_step.num_tokens
    assert [s.num_cached_tokens for s in seqs] == [0, 40, 40]
    assert computed == 44 + 2 * 4  # the others compute only the context's last token and their own
    for i, cont in enumerate(continuations):
        ref = hf_logprobs(hf, context + cont)
        expected = [ref[len(context) - 1 + k, t].item() for k, t in enumerate(cont)]
        assert max(abs(e.logprob - x) for e, x in zip(got[f"c{i}"], expected)) <= 1e-4


def test_scoring_survives_preemption(tiny):
    loaded, hf = tiny
    vocab = loaded.model.cfg.vocab_size
    engine = make_engine(loaded, kv_tokens=64, block_size=4, max_num_batched_tokens=16)
    texts = random_prompts(4, vocab, 34, 30, 40)
    for i, t in enumerate(texts):  # generations grow while scoring requests arrive between them
        engine.add(EngineRequest(f"g{i}", t[:5], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)))
        engine.add(EngineRequest(f"s{i}", t, SamplingParams(max_tokens=0, prompt_logprobs=0)))
    seqs = [s.seq for samples in engine.requests.values() for s in samples.values()]
    results = {}
    while engine.has_work:
        for o in engine.step():
            if o.prompt_logprobs is not None:
                results[o.request_id] = o.prompt_logprobs
    assert sum(s.num_preemptions for s in seqs) > 0
    for i, t in enumerate(texts):
        ref = hf_logprobs(hf, t)
        assert [e.token_id for e in results[f"s{i}"]] == t[1:]
        assert max(abs(e.logprob - ref[j, t[j + 1]].item()) for j, e in enumerate(results[f"s{i}"])) <= 1e-4


def test_rolling_windows_score_each_token_once_with_most_context():
    for n, max_len, stride in [(10, 4, 2), (1000, 128, 64), (129, 128, 128), (2, 1024, 512), (5000, 1024, 512)]:
        windows = rolling_windows(n, max_len, stride)
        scored = [w.start + k for w in windows for k in range(w.score_from, w.end - w.start)]
        assert scored == list(range(1, n))
        for w in windows:
            assert w.end - w.start <= max_len
            if w.start > 0:
                assert w.score_from >= max_len - stride  # at least that much context for every scored token


def test_rolling_log_likelihood_equals_window_by_window_reference(tiny):
    loaded, hf = tiny
    max_len = loaded.model.cfg.n_positions  # 256 on this model: the text is longer than the context
    tokens = random_prompts(1, loaded.model.cfg.vocab_size, 35, 600, 600)[0]
    engine = make_engine(loaded, max_num_batched_tokens=128)
    total = 0.0
    windows = rolling_windows(len(tokens), max_len, 128)
    for i, w in enumerate(windows):
        got, _ = score(
            engine,
            f"w{i}",
            tokens[w.start : w.end],
            SamplingParams(max_tokens=0, prompt_logprobs=0),
            score_from=w.score_from,
        )
        total += sum(e.logprob for e in got)
    reference = 0.0
    for w in windows:  # HF, one window at a time
        ref = hf_logprobs(hf, tokens[w.start : w.end])
        reference += sum(ref[k - 1, tokens[w.start + k]].item() for k in range(w.score_from, w.end - w.start))
    assert len(windows) >= 3
    assert abs(total - reference) <= 1e-3
