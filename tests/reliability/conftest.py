"""The reliability tests reuse the HTTP tests' store and live server: `http_store` (tiny random GPT-2s,
`tiny@1` alias prod) and `serve()`, from tests/api/conftest.py (tests/ is on sys.path, as pytest imports
these suites rootdir-relative; tests/finetune imports tests/conftest.py the same way), and `harness`, the
long suites' reliability/harness.py, loaded from its path: tests/ comes first on sys.path under pytest, so
`reliability` names this package there, and `pytest` (unlike `python -m pytest`) does not put the
repository root on sys.path at all."""

import importlib.util
import sys
from pathlib import Path

from api.conftest import free_port, http_store, serve  # noqa: F401  (http_store: a fixture, re-exported)


def _load_harness():
    if "reliability_harness" not in sys.modules:  # reliability/fuzz.py loads it under the same name
        path = Path(__file__).resolve().parents[2] / "reliability" / "harness.py"
        spec = importlib.util.spec_from_file_location("reliability_harness", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["reliability_harness"]


harness = _load_harness()
