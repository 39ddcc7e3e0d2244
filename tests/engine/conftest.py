"""Fixtures for the engine tests: one tiny random GPT-2 in a store, with its HF twin."""

import pytest
from transformers import GPT2LMHeadModel

from model_store import ModelStore
from model_store.import_hf import import_hf
from service.model import load_model


@pytest.fixture(scope="module")
def tiny(make_hf_model, tmp_path_factory):
    src = make_hf_model(seed=5, config={"n_positions": 256})
    store = ModelStore(tmp_path_factory.mktemp("engine-store"))
    import_hf(store, str(src), "tiny")
    hf = GPT2LMHeadModel.from_pretrained(src, attn_implementation="eager").eval()
    return load_model(store, "tiny"), hf
