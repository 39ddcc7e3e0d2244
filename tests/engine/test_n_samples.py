"""`n > 1` samples of one prompt: each equals an n = 1 request seeded with seed + i, they share the
prompt's KV instead of computing it n times, and they finish, abort and stream as one request."""

import asyncio

import pytest

from service.engine import AsyncEngine, EngineRequest, QueueFull, SamplingParams

from .test_engine import make_engine, random_prompts, run_all


def run_samples(engine, rid, prompt, params):
    """{index: (tokens, text, finish_reason, stats)} of one request."""
    engine.add(EngineRequest(rid, prompt, params))
    got: dict[int, tuple] = {}
    while engine.has_work:
        for out in engine.step():
            tokens, text, _, _ = got.get(out.index, ([], "", None, None))
            got[out.index] = (tokens + out.token_ids, text + out.text, out.finish_reason, out.stats)
    return got


def test_sample_i_equals_a_single_request_seeded_seed_plus_i(tiny):
    loaded, _ = tiny
    prompt = random_prompts(1, loaded.model.cfg.vocab_size, 31, 21, 21)[0]
    params = SamplingParams(temperature=1.0, top_k=40, max_tokens=12, seed=100, ignore_eos=True, n=4)
    got = run_samples(make_engine(loaded), "r", prompt, params)
    assert sorted(got) == [0, 1, 2, 3]
    for i in range(4):
        single = SamplingParams(temperature=1.0, top_k=40, max_tokens=12, seed=100 + i, ignore_eos=True)
        alone = run_all(make_engine(loaded), {0: [("x", prompt, single)]})["x"]
        assert got[i][:3] == alone
    assert len({tuple(g[0]) for g in got.values()}) > 1  # different seeds, different samples


def test_samples_share_the_prompt_kv(tiny):
    loaded, _ = tiny
    prompt = random_prompts(1, loaded.model.cfg.vocab_size, 32, 41, 41)[0]  # 10 full blocks of 4, then 1
    engine = make_engine(loaded, block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, n=3)
    engine.add(EngineRequest("r", prompt, params))
    computed = 0
    while engine.has_work:
        engine.step()
        computed += engine.last_step.num_tokens
    # The prompt is computed once; each other sample computes only the token after the shared blocks.
    assert computed == 41 + 2 * 1 + 3 * 5
    greedy = run_samples(make_engine(loaded), "r", prompt, params)
    alone = run_all(
        make_engine(loaded), {0: [("x", prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))]}
    )["x"]
    assert all(g[:3] == alone for g in greedy.values())
    assert [greedy[i][3].num_cached_tokens for i in range(3)] == [0, 40, 40]


def test_samples_wait_for_the_prompt_without_blocking_others(tiny):
    loaded, _ = tiny
    vocab = loaded.model.cfg.vocab_size
    engine = make_engine(loaded, max_num_batched_tokens=16)  # the 60-token prompt takes 4 chunked steps
    engine.add(
        EngineRequest(
            "long", random_prompts(1, vocab, 33, 60, 60)[0], SamplingParams(max_tokens=2, ignore_eos=True, n=3)
        )
    )
    engine.add(EngineRequest("short", [1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True)))
    first_step_of: dict[str, int] = {}
    step = 0
    while engine.has_work:
        engine.step()
        step += 1
        for seq in engine.scheduler.running:
            first_step_of.setdefault(f"{seq.request_id}#{seq.index}", step)
    assert first_step_of["long#1"] == first_step_of["long#2"] == 5  # after the 4 prompt chunks
    assert first_step_of["short#0"] < first_step_of["long#1"]  # queued behind them, admitted before them


def test_abort_ends_every_sample_and_frees_kv(tiny):
    loaded, _ = tiny
    engine = make_engine(loaded)
    engine.add(EngineRequest("r", list(range(1, 30)), SamplingParams(max_tokens=100, ignore_eos=True, n=3)))
    for _ in range(3):
        engine.step()
    assert len(engine.scheduler.running) == 3
    engine.abort("r")
    assert engine.kv.usage == 0.0 and not engine.has_work and not engine.requests


def test_queue_full_admits_no_sample(tiny):
    loaded, _ = tiny
    engine = make_engine(loaded, max_waiting=3, max_num_seqs=1)  # 3 waiting beyond the 1 free slot
    with pytest.raises(QueueFull):
        engine.add(EngineRequest("r", [1, 2, 3], SamplingParams(max_tokens=4, n=5)))
    assert not engine.has_work and not engine.requests
    engine.add(EngineRequest("r", [1, 2, 3], SamplingParams(max_tokens=4, n=4)))  # the same id is free again
    assert engine.has_work


def test_stream_ends_after_every_sample_finished(tiny):
    loaded, _ = tiny
    prompt = random_prompts(1, loaded.model.cfg.vocab_size, 34, 9, 9)[0]
    params = SamplingParams(temperature=0.8, max_tokens=5, seed=7, n=3, ignore_eos=True)
    expected = run_samples(make_engine(loaded), "r", prompt, params)

    async def main():
        engine = AsyncEngine(make_engine(loaded))
        engine.start()
        try:
            got: dict[int, list[int]] = {}
            finished = []
            async for out in await engine.submit(EngineRequest("r", prompt, params)):
                got.setdefault(out.index, []).extend(out.token_ids)
                if out.finished:
                    finished.append(out.index)
            return got, finished
        finally:
            engine.stop()

    got, finished = asyncio.run(main())
    assert sorted(finished) == [0, 1, 2]
    assert got == {i: expected[i][0] for i in range(3)}
