"""Fast versions of the reliability suites (`python -m reliability.run soak|overload|faults`, which run for
minutes): the same invariants on a tiny random GPT-2 and tiny limits, without the runner's timing ratios
(no 50 ms / 1.5x checks here), plus regression tests for the defects those suites found.

- a mini-soak (~20 s of mixed traffic at 2x the admitted concurrency, 10% of streams hanging up) and a
  mini-overload (4x) on one `python -m service` process, whose life ends with (a) SIGTERM while 8 streams
  are in flight;
- (b) `kill -9` of `python -m model_store finetune` inside its export (the runner also kills at two more
  stages and resumes the run afterwards);
- (d) hot reload back and forth several times under streaming and non-streaming load;
- (e) an engine step raising: requests get an error, /ready never says 200 meanwhile, the process exits 1;
- overload answered at once: while the engine is inside a step, a request past the queue limit gets its
  429 without waiting for the step, and a stream gets a real 429 status, not a 200 with an error event.

(c), a corrupted weight file refusing to start, is tests/api/test_drain.py's
test_corrupted_weights_refuse_to_start_naming_the_file; one reload under non-streaming load is
tests/api/test_operations.py's.

The machinery is the runner's: reliability/ (stores, server, traffic, load, figures, scenarios).
"""

import asyncio
import random
import threading
from pathlib import Path

import httpx
import pytest

from reliability.figures import failures, rss_growth, summarize
from reliability.load import LoadReport, drive, execute
from reliability.scenarios.engine_fault import engine_fault
from reliability.scenarios.finetune_kill import finetune_kill
from reliability.scenarios.sigterm import sigterm_streams
from reliability.server import FAULTY_SERVER, ServerProcess, model_info, wait_idle
from reliability.stores import build_tiny_store, copy_model
from reliability.traffic import fixed_request, mixed_request
from tests.support.live import serve

REPO = Path(__file__).resolve().parents[2]


C, W = 4, 4  # the shared server's admitted concurrency (MAX_NUM_SEQS) and waiting queue


def assert_checks(checks) -> None:
    failed = [f"{name}: {detail}" for name, ok, detail in checks if not ok]
    assert not failed, failed


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reliability-store")
    build_tiny_store(root)  # tiny@1 (prod), tiny@2
    return root


@pytest.fixture(scope="module")
def server(tiny_store, tmp_path_factory):
    """One `python -m service` for the mini-soak, the mini-overload and, last, SIGTERM."""
    log = tmp_path_factory.mktemp("reliability-logs") / "server.log"
    settings = {
        "MAX_NUM_SEQS": C,
        "MAX_WAITING_REQUESTS": W,
        "MAX_N": 2,
        "DRAIN_TIMEOUT": 3,
        "DTYPE": "float32",
        "KV_CACHE_MEMORY": "16MiB",
        "NUM_THREADS": 1,
    }
    with ServerProcess(tiny_store, "tiny@prod", settings, log) as proc:
        proc.wait_ready()
        yield proc


def run_load(server, clients: int, seconds: float, make, **kwargs):
    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            info = await model_info(client)
            report = await drive(
                server.url, clients, seconds, lambda rng: make(rng, info), server=server, request_timeout=60, **kwargs
            )
            return report, await wait_idle(client, timeout=30)

    return asyncio.run(main())


def test_mini_soak(server):
    report, (idle, gauges, _) = run_load(server, 2 * C, 20, lambda rng, info: mixed_request(rng, info, max_new=16))
    fig = summarize(report.results, report.duration)
    assert fig["completed"] >= 20, fig
    assert fig["5xx"] == 0 and fig["other_errors"] == 0, failures(report.results)
    assert fig["client_aborts"] >= 1, fig  # 10% of the streams hang up mid-stream
    assert len(fig["by_kind"]) == 7, fig["by_kind"]  # every kind of request was sent
    assert idle, gauges
    rss = rss_growth(report.rss, report.duration)
    assert rss["rss_growth_pct"] < 10, rss


def test_mini_overload(server):
    report, (idle, gauges, _) = run_load(
        server, 4 * C, 10, lambda rng, info: fixed_request(rng, info, 8, 24), retry_pause=(0.05, 0.2)
    )
    fig = summarize(report.results, report.duration)
    assert fig["rejected_429"] >= 1 and fig["completed"] >= C, fig  # the excess is refused, the admitted finish
    assert fig["5xx"] == 0 and fig["other_errors"] == 0, failures(report.results)  # every 429 had Retry-After
    assert idle, gauges

    async def one():  # recovery: right after the load, a single request succeeds
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            info = await model_info(client)
            return await execute(client, fixed_request(random.Random(0), info, 8, 24), 0.0)

    assert asyncio.run(one()).outcome == "ok"


def test_sigterm_with_8_streams_in_flight(server):  # ends the module's server: keep it the last user
    fig, checks = sigterm_streams(server, 8, drain_timeout=3)
    assert_checks(checks)


def test_kill_9_finetune_during_export_leaves_the_store_intact(tiny_store, tmp_path):
    root = copy_model(tiny_store, "tiny@prod", tmp_path / "store")
    fig, checks = finetune_kill(
        root, "tiny@prod", tmp_path, ["weights-written"], finish=False
    )  # the runner resumes too
    assert_checks(checks)
    assert fig["kills"][0]["staging_left"]  # killed partway: its staging directory is left, never listed


def test_engine_step_failure_errors_requests_and_exits_nonzero(tiny_store, tmp_path):
    trigger = tmp_path / "trigger"
    settings = {
        "MAX_NUM_SEQS": 4,
        "MAX_WAITING_REQUESTS": 4,
        "DTYPE": "float32",
        "KV_CACHE_MEMORY": "16MiB",
        "NUM_THREADS": 1,
    }
    with ServerProcess(
        tiny_store,
        "tiny@prod",
        settings,
        tmp_path / "server.log",
        argv=["-c", FAULTY_SERVER],
        extra_env={"RELIABILITY_FAULT_TRIGGER": str(trigger)},
    ) as proc:
        proc.wait_ready()
        fig, checks = engine_fault(proc, trigger, 4)
    assert_checks(checks)
    assert fig["exit_code"] == 1, fig


def test_hot_reload_back_and_forth_under_streaming_load(tiny_store):
    with serve(tiny_store, max_num_seqs=4, max_waiting_requests=32) as live:  # never full: nothing may fail

        async def main():
            async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
                info = await model_info(client)
                report = LoadReport()
                make = lambda rng: mixed_request(rng, info, abort_fraction=0.0, max_new=16)  # noqa: E731
                load = asyncio.ensure_future(drive(live.url, 3, 1e9, make, report=report))
                served = []
                for target in ("tiny@2", "tiny@1", "tiny@2", "tiny@1"):
                    count = len(report.results)
                    while len(report.results) < count + 3:
                        assert not load.done(), load.exception()
                        await asyncio.sleep(0.02)
                    r = await client.post("/admin/reload", json={"model": target})
                    assert r.status_code == 200, r.text
                    served.append((await client.get("/v1/models")).json()["data"][0]["id"])
                count = len(report.results)
                while len(report.results) < count + 3:
                    await asyncio.sleep(0.02)
                load.cancel()
                await asyncio.gather(load, return_exceptions=True)
                return report, served

        report, served = asyncio.run(main())
    assert served == ["tiny@2", "tiny@1", "tiny@2", "tiny@1"]
    fig = summarize(report.results, 0)
    assert fig["completed"] == fig["sent"] >= 15, (fig, failures(report.results))
    assert fig["by_kind"].get("completion_stream", 0) + fig["by_kind"].get("chat_stream", 0) >= 1, fig["by_kind"]


def test_overload_is_refused_at_once_and_streams_get_a_429_status(tiny_store):
    """While the engine is stuck inside a step, requests arriving together are admitted up to the free
    running slots plus MAX_WAITING_REQUESTS; past that, they are refused at once (the engine thread would
    only see them after its step: seconds on a long prefill), and a refused stream gets 429 + Retry-After
    as its status, not a 200 whose first event is the error."""
    with serve(tiny_store, max_num_seqs=2, max_waiting_requests=1) as live:
        async_engine = live.server.served.engine
        engine = async_engine.engine
        gate, inside, step = threading.Event(), threading.Event(), engine.step

        def held_step():
            inside.set()
            assert gate.wait(60)
            return step()

        engine.step = held_step
        try:
            with httpx.Client(base_url=live.url, timeout=30) as client:
                codes = []
                admitted = [
                    threading.Thread(
                        target=lambda: codes.append(
                            client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 4}).status_code
                        )
                    )
                    for _ in range(3)
                ]
                for t in admitted:  # 2 free slots + 1 waiting: all three are admitted
                    t.start()
                assert inside.wait(30), f"the engine never stepped; answers so far: {codes}"
                while async_engine._submitted < 3:
                    assert all(t.is_alive() for t in admitted), f"one of the first three was answered: {codes}"
                    threading.Event().wait(0.01)
                bodies = {
                    "/v1/completions": [
                        {"prompt": "x", "max_tokens": 4},
                        {"prompt": "x", "max_tokens": 4, "stream": True},
                    ],
                    "/v1/chat/completions": [{"messages": [{"role": "user", "content": "x"}], "stream": True}],
                }
                for path, items in bodies.items():
                    for body in items:
                        try:  # answered while the step is still held; it is only released below
                            r = client.post(path, json=body, timeout=10)
                        except httpx.TimeoutException:
                            pytest.fail(
                                f"{path} {body}: no answer while the engine was inside its step "
                                f"(queued {len(engine.scheduler.waiting)}, running {len(engine.scheduler.running)}, "
                                f"sent {async_engine._submitted}, applied {async_engine._applied})"
                            )
                        assert r.status_code == 429 and r.headers["retry-after"] == "1", (path, body, r.text)
                        assert r.json()["error"]["code"] == "rate_limit_exceeded"
                assert not gate.is_set()
                gate.set()
                for t in admitted:
                    t.join(30)
                assert codes == [200, 200, 200]
                r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True})
                assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
        finally:
            gate.set()
            engine.step = step
