"""Fast versions of the reliability suites (`python -m reliability.run`): (e) an engine step raising.

The harness is reliability/harness.py, loaded from its path: tests/ comes first on sys.path under pytest,
and `pytest` (unlike `python -m pytest`) does not put the repository root there at all.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

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
