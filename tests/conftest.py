"""Fixtures shared by every test folder: tiny random GPT-2 checkpoints in HF format built in a temp dir (never
downloaded; tests.support.checkpoints builds them), an empty store, and the HTTP tests' store (`http_store`,
used by tests/api and tests/robustness).
"""

from collections.abc import Callable
from pathlib import Path

import pytest

from model_store import ModelStore
from tests.support.checkpoints import hf_checkpoint, save_tokenizer
from tests.support.stores import build_http_store


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A GPT-2-style byte-level BPE tokenizer (vocab ~400) saved both as tokenizer.json and vocab/merges."""
    return save_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def make_hf_model(tmp_path_factory, tokenizer_dir) -> Callable[..., Path]:
    """Build a random GPT2LMHeadModel and save it like a user's HF directory. Returns the directory."""

    def make(weights: str = "safetensors", tokenizer: str = "json", seed: int = 0, config: dict | None = None) -> Path:
        out = tmp_path_factory.mktemp(f"hf-{weights}-{tokenizer}")
        return hf_checkpoint(out, tokenizer_dir, weights, tokenizer, seed, config)

    return make


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path / "store")


@pytest.fixture(scope="session")
def http_store(make_hf_model, tmp_path_factory):
    """A store with tiny@1 (alias prod), tiny@2 (other weights) and tiny@3 (with a chat template); returns
    (root, {version: hf model dir})."""
    return build_http_store(make_hf_model, tmp_path_factory.mktemp("http-store"))
