"""The synchronous engine on a tiny random GPT-2: batched equals alone, HF parity, seeds, stops, memory."""

import dataclasses
import random

import pytest
import torch

from service.engine import Engine, EngineConfig, EngineRequest, FinishReason, SamplingParams, SchedulerConfig
from service.model import KVCache


def make_engine(loaded, kv_tokens=4096, block_size=4, compiled_kernels=True, quantization="none", **sched):
    cfg = loaded.model.cfg
    kv_bytes = kv_tokens * KVCache.bytes_per_token(cfg, loaded.dtype)
    defaults = dict(max_num_seqs=32, max_num_batched_tokens=64, max_model_len=cfg.n_positions)
    scheduler = SchedulerConfig(**{**defaults, **sched})
    config = EngineConfig(scheduler, kv_bytes, block_size, seed=0, compiled_kernels=compiled_kernels)
    return Engine(loaded, dataclasses.replace(config, quantization=quantization))


def run_all(engine, arrivals):
    """arrivals: {step: [(request_id, prompt, params)]}. Returns {request_id: (tokens, text, finish_reason)}."""
    results, step = {}, 0
    while engine.has_work or any(s >= step for s in arrivals):
        for rid, prompt, params in arrivals.get(step, []):
            engine.add(EngineRequest(rid, prompt, params))
            results[rid] = ([], "", None)
        for out in engine.step():
            tokens, text, _ = results[out.request_id]
            results[out.request_id] = (tokens + out.token_ids, text + out.text, out.finish_reason)
        step += 1
        assert step < 5000
    return results


def random_prompts(n, vocab, seed, lo=2, hi=60):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


def test_greedy_alone_equals_hf_generate(tiny):
    loaded, hf = tiny
    prompt = random_prompts(1, loaded.model.cfg.vocab_size, 1, 10, 10)[0]
    got = run_all(make_engine(loaded), {0: [("a", prompt, GREEDY)]})["a"]
    expected = hf.generate(
        torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0
    )
    assert got[0] == expected[0, 10:].tolist() and got[2] is FinishReason.LENGTH


def test_greedy_alone_equals_inside_a_batch_of_16_staggered(tiny):
    loaded, _ = tiny
    vocab = loaded.model.cfg.vocab_size
    target = random_prompts(1, vocab, 2, 30, 30)[0]
    alone = run_all(make_engine(loaded), {0: [("t", target, GREEDY)]})["t"]
    others = random_prompts(16, vocab, 3)
    arrivals: dict[int, list] = {}
    for i, p in enumerate(others):  # different lengths, arriving over the first steps, some before the target
        arrivals.setdefault(i % 6, []).append(
            (f"o{i}", p, SamplingParams(temperature=0.0, max_tokens=5 + i, ignore_eos=True))
        )
    arrivals.setdefault(3, []).append(("t", target, GREEDY))
    batched = run_all(make_engine(loaded, max_num_batched_tokens=48), arrivals)
    assert batched["t"][0] == alone[0] and batched["t"][1] == alone[1]
    for i, p in enumerate(others):
        solo = run_all(
            make_engine(loaded), {0: [("x", p, SamplingParams(temperature=0.0, max_tokens=5 + i, ignore_eos=True))]}
        )
        assert batched[f"o{i}"][0] == solo["x"][0]


def test_seeded_sampling_reproducible_and_batch_independent(tiny):
    loaded, _ = tiny
    vocab = loaded.model.cfg.vocab_size
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, seed=1234, ignore_eos=True)
    prompt = random_prompts(1, vocab, 7, 12, 12)[0]
    alone = run_all(make_engine(loaded), {0: [("s", prompt, p)]})["s"][0]
    again = run_all(make_engine(loaded), {0: [("s", prompt, p)]})["s"][0]
    noise = {
        0: [
            (f"n{i}", q, SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True))
            for i, q in enumerate(random_prompts(6, vocab, 8))
        ]
    }
    noise[2] = [("s", prompt, p)]
    batched = run_all(make_engine(loaded), noise)["s"][0]
    other_seed = run_all(
        make_engine(loaded),
        {0: [("s", prompt, SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, seed=99, ignore_eos=True))]},
    )["s"][0]
    assert alone == again == batched
    assert other_seed != alone


def test_preemption_under_tiny_kv_budget_keeps_greedy_output(tiny):
    loaded, _ = tiny
    prompts = random_prompts(6, loaded.model.cfg.vocab_size, 11, 8, 30)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    roomy = run_all(make_engine(loaded), {0: [(f"r{i}", p, params) for i, p in enumerate(prompts)]})
    tight_engine = make_engine(loaded, kv_tokens=64, block_size=4)
    tight = run_all(tight_engine, {0: [(f"r{i}", p, params) for i, p in enumerate(prompts)]})
    assert {k: v[0] for k, v in tight.items()} == {k: v[0] for k, v in roomy.items()}
    assert tight_engine.kv.usage == 0.0


def test_preemption_happens_with_tiny_budget(tiny):
    loaded, _ = tiny
    engine = make_engine(loaded, kv_tokens=64, block_size=4)
    prompts = random_prompts(6, loaded.model.cfg.vocab_size, 11, 8, 30)
    for i, p in enumerate(prompts):
        engine.add(EngineRequest(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)))
    seqs = [s.seq for samples in engine.requests.values() for s in samples.values()]
    while engine.has_work:
        engine.step()
    assert sum(s.num_preemptions for s in seqs) > 0


def test_abort_frees_kv(tiny):
    loaded, _ = tiny
    engine = make_engine(loaded)
    engine.add(EngineRequest("a", list(range(1, 40)), SamplingParams(max_tokens=100, ignore_eos=True)))
    engine.step()
    engine.step()
    assert engine.kv.usage > 0
    engine.abort("a")
    assert engine.kv.usage == 0.0 and not engine.has_work


def test_stop_token_ids_max_tokens_and_eos(tiny):
    loaded, _ = tiny
    prompt = random_prompts(1, loaded.model.cfg.vocab_size, 4, 10, 10)[0]
    free = run_all(make_engine(loaded), {0: [("a", prompt, GREEDY)]})["a"][0]
    stop_id = free[5]
    first = free.index(stop_id)
    got = run_all(
        make_engine(loaded),
        {
            0: [
                (
                    "a",
                    prompt,
                    SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=(stop_id,), ignore_eos=True),
                )
            ]
        },
    )["a"]
    assert got[0] == free[: first + 1] and got[2] is FinishReason.STOP
    engine = make_engine(loaded)
    engine.eos_token_id = stop_id  # as if the model's EOS were this token
    got = run_all(engine, {0: [("a", prompt, SamplingParams(temperature=0.0, max_tokens=20))]})["a"]
    assert got[0] == free[: first + 1] and got[2] is FinishReason.STOP
    got = run_all(engine, {0: [("b", prompt, SamplingParams(temperature=0.0, max_tokens=20, min_tokens=first + 2))]})[
        "b"
    ]
    assert len(got[0]) > first + 1
    assert stop_id not in got[0][: first + 2]  # masked before min_tokens: neither stops nor appears


def test_stop_string_trimmed_and_text_equals_decode(tiny):
    loaded, _ = tiny
    prompt = random_prompts(1, loaded.model.cfg.vocab_size, 4, 10, 10)[0]
    tokens, text, _ = run_all(make_engine(loaded), {0: [("a", prompt, GREEDY)]})["a"]
    assert text == loaded.tokenizer.decode(tokens)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3
    _, stopped_text, reason = run_all(
        make_engine(loaded),
        {0: [("a", prompt, SamplingParams(temperature=0.0, max_tokens=20, stop=(stop,), ignore_eos=True))]},
    )["a"]
    assert reason is FinishReason.STOP and stopped_text == text[: text.index(stop)]


def test_prefix_reuse_gives_same_output(tiny):
    loaded, _ = tiny
    shared = random_prompts(1, loaded.model.cfg.vocab_size, 9, 40, 40)[0]
    engine = make_engine(loaded)
    run_all(engine, {0: [("a", shared + [1, 2], GREEDY)]})
    engine.add(EngineRequest("b", shared + [3], GREEDY))
    seq = engine.requests["b"][0].seq
    reused = []
    while engine.has_work:
        reused += [t for out in engine.step() for t in out.token_ids]
    assert seq.num_cached_tokens == 40  # 10 full blocks of 4 reused, only the last token computed
    fresh = run_all(make_engine(loaded), {0: [("b", shared + [3], GREEDY)]})["b"][0]
    assert reused == fresh


def test_request_and_step_stats(tiny):
    loaded, _ = tiny
    engine = make_engine(loaded)
    shared = list(range(1, 30))
    run_all(engine, {0: [("warm", shared, SamplingParams(max_tokens=1, ignore_eos=True))]})
    engine.add(EngineRequest("a", shared + [40], SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)))
    final = None
    while engine.has_work:
        for out in engine.step():
            assert (out.stats is not None) == out.finished
            final = out.stats or final
        assert engine.last_step.num_seqs == 1 and engine.last_step.num_tokens >= 1
    assert final.num_prompt_tokens == 30 and final.num_generated_tokens == 7 and final.num_cached_tokens == 28
    assert len(final.inter_token_latencies) == 6 and all(t >= 0 for t in final.inter_token_latencies)
    assert 0 <= final.queue_time <= final.time_to_first_token
    assert engine.last_step.kv_usage == 0.0 and engine.last_step.num_running == 0


def test_the_compiled_decode_attention_changes_no_output(tiny):
    """Greedy tokens equal and logprobs within float32 rounding, with the C++ kernel or the PyTorch path."""
    from service.model import kernels

    if kernels.paged_attention() is None:
        pytest.skip("the C++ kernel could not be built here")
    loaded, _ = tiny
    prompts = random_prompts(6, loaded.model.cfg.vocab_size, 31, 3, 40)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)

    def run(compiled):
        engine = make_engine(loaded, compiled_kernels=compiled)
        for i, p in enumerate(prompts):
            engine.add(EngineRequest(f"r{i}", p, params))
        got = {}
        while engine.has_work:
            for out in engine.step():
                tokens, lps = got.get(out.request_id, ([], []))
                got[out.request_id] = (tokens + out.token_ids, lps + out.logprobs)
        return got

    compiled, torch_only = run(True), run(False)
    assert engine_uses_kernel(loaded)
    for rid, (tokens, lps) in torch_only.items():
        assert compiled[rid][0] == tokens
        assert max(abs(a - b) for a, b in zip(compiled[rid][1], lps)) <= 1e-5


def engine_uses_kernel(loaded) -> bool:
    return make_engine(loaded).runner.cache.decode_kernel is not None


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_the_small_decoder_gives_the_blocks_bits(tiny, quantization):
    """Decode steps of one and two sequences through the compiled SmallDecoder equal, bit for bit, the same
    steps through the blocks one call at a time (float32 `gemv` products, and int8's)."""
    from service.model import kernels
    from service.model.linear import GEMV_ROWS, KernelChoice, Linear

    if kernels.small_decoder() is None:
        pytest.skip("the C++ kernels could not be built here")
    loaded, _ = tiny
    model = loaded.model
    prompts = random_prompts(2, model.cfg.vocab_size, 41, 5, 30)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
    choice = KernelChoice("gemv", "aten")  # the timing may prefer aten for a model this small: set it

    def run(fused):
        engine = make_engine(loaded, quantization=quantization)
        if quantization == "none":
            for m in model.modules():
                if isinstance(m, Linear):
                    m.use(choice)
            model._decoder = model._small_decoder(choice)
        assert model._decoder is not None
        calls = []
        model._decoder = Spy(model._decoder, calls) if fused else None
        for i, p in enumerate(prompts):  # r1 ends first: steps of two sequences, then of one
            engine.add(EngineRequest(f"r{i}", p, dataclasses.replace(params, max_tokens=12 - 6 * i)))
        got = {}
        while engine.has_work:
            for out in engine.step():
                tokens, lps = got.get(out.request_id, ([], []))
                got[out.request_id] = (tokens + out.token_ids, lps + out.logprobs)
        return got, calls

    try:
        (fused, calls), (blocks, _) = run(True), run(False)
    finally:
        model.prepare_kernels()
    assert fused == blocks and [len(blocks[r][0]) for r in ("r0", "r1")] == [12, 6]
    assert {1, 2} <= set(calls) and all(n < GEMV_ROWS for n in calls)  # it served the steps of one and two sequences


class Spy:
    def __init__(self, decoder, calls):
        self.decoder, self.calls = decoder, calls

    def forward(self, x, *args):
        self.calls.append(x.shape[0])
        return self.decoder.forward(x, *args)


def test_greedy_tokens_without_the_logits_equal_the_argmax_of_the_logits(tiny):
    """Greedy requests without logprobs take their token from GPT2.greedy_tokens (a bfloat16 screen of the
    head, then the candidates exactly) in steps of one or two sequences: the same tokens as the sampler's
    argmax of the logits; while a request asks for logprobs, every step computes the logits."""
    from service.model import kernels
    from service.model.linear import KernelChoice

    if kernels.gemv() is None:
        pytest.skip("the C++ kernels could not be built here")
    loaded = tiny[0]
    model = loaded.model
    prompts = random_prompts(2, model.cfg.vocab_size, 43, 5, 30)
    short = dataclasses.replace(GREEDY, max_tokens=8)
    choice = KernelChoice("gemv", "aten")  # the timing may prefer aten for a head this small: set it

    def run(requests, screen=True):
        engine, found = make_engine(loaded), []
        model.head.use(choice)
        model._screen = model._greedy_screen(choice) if screen else None
        real = model.greedy_tokens

        def spy(hidden):
            ids = real(hidden)
            found.append(None if ids is None else len(ids))
            return ids

        model.greedy_tokens = spy
        try:
            got = run_all(engine, {0: [(rid, prompts[i], params) for i, (rid, params) in enumerate(requests)]})
        finally:
            del model.greedy_tokens
        return {rid: tokens for rid, (tokens, _, _) in got.items()}, found

    try:
        fast, found = run([("a", GREEDY), ("b", short)])
        slow, none_found = run([("a", GREEDY), ("b", short)], screen=False)
        _, found_mixed = run([("a", GREEDY), ("b", dataclasses.replace(short, logprobs=1))])
    finally:
        model.prepare_kernels()
    assert fast == slow and [len(fast["a"]), len(fast["b"])] == [20, 8]
    assert found.count(2) == 8 and found.count(1) == 12  # two sequences for 8 steps, then one
    assert set(none_found) == {None}
    assert found_mixed == [1] * 12  # only once b has ended
