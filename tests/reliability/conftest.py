"""The reliability tests reuse the HTTP tests' store and live server: `http_store` (tiny random GPT-2s,
`tiny@1` alias prod) and `serve()`, from tests/api/conftest.py (tests/ is on sys.path, as pytest imports these suites
rootdir-relative; tests/finetune imports tests/conftest.py the same way), and `harness`, the long suites'
reliability/harness.py (and `audit`, reliability/audit.py), loaded from their paths: tests/ comes first on sys.path
under pytest, so `reliability` names this package there, and `pytest` (unlike `python -m pytest`) does not put the
repository root on sys.path at all."""

import importlib.util
import sys
from pathlib import Path

from api.conftest import free_port, http_store, serve  # noqa: F401  (http_store: a fixture, re-exported)


def _load(name: str):
    module_name = f"reliability_{name}"  # reliability/fuzz.py loads the harness under the same name
    if module_name not in sys.modules:
        path = Path(__file__).resolve().parents[2] / "reliability" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


harness = _load("harness")
audit = _load("audit")
