"""Fixtures for the fine-tuning tests: a tiny random GPT-2 (tests.support.finetune's TINY_FT: 2 layers, 32 wide,
64 positions) imported into a store as `tiny@1`, a JSONL corpus, and one torch thread for a test and the
children it forks. Running and inspecting runs: tests.support.finetune."""

import json
from pathlib import Path

import pytest
import torch

from model_store import ModelStore
from model_store.import_hf import import_hf
from tests.support.checkpoints import CORPUS
from tests.support.finetune import TINY_FT


@pytest.fixture(scope="session")
def tiny_store(make_hf_model, tmp_path_factory) -> ModelStore:
    store = ModelStore(tmp_path_factory.mktemp("ft-store"))
    import_hf(store, str(make_hf_model(seed=11, config=TINY_FT)), "tiny")
    return store


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ft-data") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in CORPUS))
    return path


@pytest.fixture
def one_thread():
    """Same thread count in the test and its forked children (which must use 1), so runs compare bit for bit:
    Adam turns last-bit differences in tiny gradients into lr-sized weight differences."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
