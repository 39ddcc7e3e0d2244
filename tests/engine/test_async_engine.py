"""The engine thread and asyncio facade: concurrent streams equal the synchronous engine, aborts free
memory, admission errors reach the caller, a failing step errors every request instead of hanging."""

import asyncio
import threading

import pytest

from service.engine import AsyncEngine, EngineDead, EngineHooks, EngineRequest, QueueFull, SamplingParams, TooLarge

from .test_engine import GREEDY, make_engine, random_prompts, run_all


async def collect(engine: AsyncEngine, rid, prompt, params):
    tokens, text, reason = [], "", None
    async for out in await engine.submit(EngineRequest(rid, prompt, params)):
        tokens += out.token_ids
        text += out.text
        reason = out.finish_reason
    return tokens, text, reason


def test_concurrent_streams_equal_sync_engine(tiny):
    loaded, _ = tiny
    prompts = random_prompts(8, loaded.model.cfg.vocab_size, 21)
    expected = run_all(make_engine(loaded), {0: [(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]})

    async def main():
        engine = AsyncEngine(make_engine(loaded))
        engine.start()
        try:
            return await asyncio.gather(*(collect(engine, f"r{i}", p, GREEDY) for i, p in enumerate(prompts)))
        finally:
            engine.stop()

    got = asyncio.run(main())
    assert {f"r{i}": g for i, g in enumerate(got)} == expected


def test_leaving_a_stream_aborts_and_frees_kv(tiny):
    loaded, _ = tiny

    async def main():
        engine = AsyncEngine(make_engine(loaded))
        engine.start()
        try:
            handle = await engine.submit(
                EngineRequest("long", list(range(1, 30)), SamplingParams(max_tokens=200, ignore_eos=True))
            )
            async for _ in handle:
                break  # the client went away after one token
            handle.abort()
            # Commands are applied in order, so once this probe finishes the abort has been applied.
            await collect(engine, "probe", [1, 2, 3], SamplingParams(max_tokens=1, ignore_eos=True))
            return engine.engine.kv.usage, dict(engine.engine.requests)
        finally:
            engine.stop()

    usage, requests = asyncio.run(main())
    assert usage == 0.0 and requests == {}


def test_queue_full_reaches_the_caller(tiny):
    loaded, _ = tiny

    async def main():
        engine = AsyncEngine(make_engine(loaded, max_waiting=1, max_num_seqs=1))
        engine.start()
        try:
            params = SamplingParams(max_tokens=30, ignore_eos=True)
            first = asyncio.ensure_future(collect(engine, "a", [1, 2], params))
            results = await asyncio.gather(
                *(collect(engine, f"b{i}", [1, 2], params) for i in range(4)), return_exceptions=True
            )
            return results, await first
        finally:
            engine.stop()

    results, first = asyncio.run(main())
    assert any(isinstance(r, QueueFull) for r in results)  # 5 requests, 1 running + 1 waiting at most
    assert all(isinstance(r, (QueueFull, tuple)) for r in results)
    assert len(first[0]) == 30


def test_failing_step_errors_requests_instead_of_hanging(tiny):
    loaded, _ = tiny

    async def main():
        sync = make_engine(loaded)
        sync.runner.run = lambda batch, **options: (_ for _ in ()).throw(RuntimeError("boom"))
        engine = AsyncEngine(sync)
        engine.start()
        with pytest.raises(EngineDead, match="boom"):
            await asyncio.wait_for(collect(engine, "a", [1, 2], GREEDY), timeout=60)
        engine._thread.join(timeout=60)
        assert not engine.alive
        with pytest.raises(EngineDead):
            await collect(engine, "b", [1, 2], GREEDY)

    asyncio.run(main())


def test_each_step_reaches_the_event_loop_in_one_handoff(tiny):
    """The engine thread hands a step's outputs over once, for every request in it, not once per sequence."""
    loaded, _ = tiny
    prompts = random_prompts(8, loaded.model.cfg.vocab_size, 22, 5, 5)
    expected = run_all(make_engine(loaded), {0: [(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]})
    sync = make_engine(loaded)
    steps, step = [], sync.step

    def counted_step():
        outputs = step()
        steps.append(len(outputs))
        return outputs

    sync.step = counted_step

    async def main():
        engine = AsyncEngine(sync)
        handoffs, deliver = [], engine._deliver

        def counted_deliver(outputs, *rest):
            handoffs.append(len(outputs))
            deliver(outputs, *rest)

        engine._deliver = counted_deliver
        engine.start()
        try:
            handle = await engine.submit(*(EngineRequest(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)))
            got = {f"r{i}": ([], "", None) for i in range(len(prompts))}
            async for out in handle:
                tokens, text, _ = got[out.request_id]
                got[out.request_id] = (tokens + out.token_ids, text + out.text, out.finish_reason)
            return got, handoffs
        finally:
            engine.stop()

    got, handoffs = asyncio.run(main())
    assert got == expected
    assert handoffs == [n for n in steps if n] and max(handoffs) == len(prompts)


def test_a_submission_is_queued_whole_or_not_at_all(tiny):
    loaded, _ = tiny

    async def main():
        engine = AsyncEngine(make_engine(loaded, kv_tokens=64))
        engine.start()
        try:
            fits = EngineRequest("fits", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
            too_large = EngineRequest("too-large", [1, 2, 3], SamplingParams(max_tokens=100, ignore_eos=True))
            with pytest.raises(TooLarge):
                await engine.submit(fits, too_large)
            # Commands are applied in order, so once this probe finishes the refusal has been applied.
            await collect(engine, "probe", [1, 2, 3], SamplingParams(max_tokens=1, ignore_eos=True))
            return engine.engine.kv.usage, dict(engine.engine.requests), engine.engine.has_work
        finally:
            engine.stop()

    assert asyncio.run(main()) == (0.0, {}, False)


def test_a_failing_observer_leaves_no_request_waiting(tiny):
    loaded, _ = tiny
    prompts = random_prompts(4, loaded.model.cfg.vocab_size, 23, 5, 5)
    expected = run_all(make_engine(loaded), {0: [(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]})

    def broken(*_):
        raise RuntimeError("observer bug")

    async def main():
        engine = AsyncEngine(make_engine(loaded), EngineHooks(on_step=broken, on_finish=broken, on_abort=broken))
        engine.start()
        try:
            got = await asyncio.wait_for(
                asyncio.gather(*(collect(engine, f"r{i}", p, GREEDY) for i, p in enumerate(prompts))), timeout=60
            )
            handle = await engine.submit(EngineRequest("left", [1, 2, 3], SamplingParams(max_tokens=50)))
            handle.abort()
            return got, handle.finished
        finally:
            engine.stop()

    got, left_finished = asyncio.run(main())
    assert {f"r{i}": g for i, g in enumerate(got)} == expected and left_finished


def test_the_engine_thread_returns_freed_heap_pages(tiny, monkeypatch):
    """Between steps (and before waiting for work) the engine thread gives freed heap pages back to the
    kernel, at most every TRIM_EVERY_S; here every time, so a request's steps must have called it, on the
    engine thread."""
    import threading

    from service.engine import async_engine, cpu

    loaded, _ = tiny
    calls = []
    monkeypatch.setattr(async_engine, "TRIM_EVERY_S", 0.0)
    monkeypatch.setattr(cpu, "release_freed_memory", lambda: calls.append(threading.current_thread().name) or True)

    async def main():
        engine = AsyncEngine(make_engine(loaded))
        engine.start()
        try:
            await collect(engine, "r", [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))
        finally:
            engine.stop()

    asyncio.run(main())
    assert len(calls) >= 5 and set(calls) == {"engine"}


def test_release_freed_memory_runs_where_glibc_is():
    from service.engine import cpu

    assert cpu.release_freed_memory() == hasattr(cpu._libc(), "malloc_trim")


def test_a_call_runs_on_the_engine_thread_between_steps(tiny):
    loaded, _ = tiny

    async def main():
        engine = AsyncEngine(make_engine(loaded))
        engine.start()
        try:
            thread = await engine.call(lambda e: threading.current_thread().name)
            with pytest.raises(ZeroDivisionError):
                await engine.call(lambda e: 1 / 0)
            works = await engine.call(lambda e: e.has_work)
        finally:
            engine.stop()
        with pytest.raises(EngineDead):
            await engine.call(lambda e: None)
        return thread, works

    assert asyncio.run(main()) == ("engine", False)
