"""Fast versions of the reliability suites (`python -m reliability.run`): (e) an engine step raising, and
overload answered at once (a request past the queue limit is refused while the engine is inside a step;
a refused stream gets a 429 status).

The harness is reliability/harness.py, loaded from its path: tests/ comes first on sys.path under pytest,
and `pytest` (unlike `python -m pytest`) does not put the repository root there at all.
"""

import importlib.util
import sys
import threading
from pathlib import Path

import httpx
import pytest

from api.conftest import serve

REPO = Path(__file__).resolve().parents[2]


def _load_harness():
    spec = importlib.util.spec_from_file_location("reliability_harness", REPO / "reliability" / "harness.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


h = _load_harness()


def assert_checks(checks) -> None:
    failed = [f"{name}: {detail}" for name, ok, detail in checks if not ok]
    assert not failed, failed


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reliability-store")
    h.build_tiny_store(root)  # tiny@1 (prod), tiny@2
    return root


def test_engine_step_failure_errors_requests_and_exits_nonzero(tiny_store, tmp_path):
    trigger = tmp_path / "trigger"
    settings = {"MAX_NUM_SEQS": 4, "MAX_WAITING_REQUESTS": 4, "DTYPE": "float32", "KV_CACHE_MEMORY": "16MiB", "NUM_THREADS": 1}
    with h.ServerProcess(tiny_store, "tiny@prod", settings, tmp_path / "server.log", argv=["-c", h.FAULTY_SERVER],
                         extra_env={"RELIABILITY_FAULT_TRIGGER": str(trigger)}) as proc:  # fmt: skip
        proc.wait_ready()
        fig, checks = h.engine_fault(proc, trigger, 4)
    assert_checks(checks)
    assert fig["exit_code"] == 1, fig


def test_overload_is_refused_at_once_and_streams_get_a_429_status(tiny_store):
    """While the engine is stuck inside a step, requests arriving together are admitted up to the free
    running slots plus MAX_WAITING_REQUESTS; past that, they are refused at once (the engine thread would
    only see them after its step: seconds on a long prefill), and a refused stream gets 429 + Retry-After
    as its status, not a 200 whose first event is the error."""
    with serve(tiny_store, max_num_seqs=2, max_waiting_requests=1) as live:
        async_engine = live.server.backend.engine
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
                admitted = [threading.Thread(target=lambda: codes.append(
                    client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 4}).status_code)) for _ in range(3)]
                for t in admitted:  # 2 free slots + 1 waiting: all three are admitted
                    t.start()
                assert inside.wait(30)
                while async_engine._submitted < 3:
                    assert all(t.is_alive() for t in admitted), codes
                    threading.Event().wait(0.01)
                bodies = {"/v1/completions": [{"prompt": "x", "max_tokens": 4}, {"prompt": "x", "max_tokens": 4, "stream": True}],
                          "/v1/chat/completions": [{"messages": [{"role": "user", "content": "x"}], "stream": True}]}  # fmt: skip
                for path, items in bodies.items():
                    for body in items:
                        r = client.post(path, json=body)  # answered while the step is still held
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
