"""Fixtures of the HTTP tests: a real server on 127.0.0.1 (tests.support.live's `serve`) over the shared
`http_store` (tests/conftest.py: tiny@1 alias prod, tiny@2, tiny@3 with a chat template), and tiny@1's HF
twin."""

import pytest
from transformers import GPT2LMHeadModel

from tests.support.live import serve


@pytest.fixture(scope="session")
def hf_tiny(http_store):
    return GPT2LMHeadModel.from_pretrained(http_store[1][1], attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def live(http_store):
    with serve(http_store[0]) as server:
        yield server
