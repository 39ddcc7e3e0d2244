"""The reliability tests reuse the HTTP tests' store and live server: `http_store` (tiny random GPT-2s,
`tiny@1` alias prod) and `serve()`, from tests/api/conftest.py (tests/ is on sys.path, as pytest imports
these suites rootdir-relative; tests/finetune imports tests/conftest.py the same way)."""

from api.conftest import free_port, http_store, serve  # noqa: F401  (http_store: a fixture, re-exported)
