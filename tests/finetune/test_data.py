"""Data: documents separated by EOS and packed into blocks where every token after the first is a target
exactly once; the visiting order is a permutation per epoch, split disjointly over micro-batches and ranks."""

import json

import pytest
import torch
from tokenizers import Tokenizer

from model_store.errors import StoreError
from model_store.finetune.data import SampleOrder, micro_batch_positions, pack, read_documents
from reliability.stores import EOS


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))


def test_documents_are_eos_separated_and_packed_with_one_token_overlap(tok):
    eos = tok.token_to_id(EOS)
    docs = ["The quick brown fox.", "Tokens, positions and caches.", "def forward(self, x):"]
    stream = [eos] + [t for d in docs for t in (*tok.encode(d).ids, eos)]
    blocks = pack(docs, tok, eos, block_size=5).tokens  # (n, 6)
    assert blocks.shape == ((len(stream) - 1) // 5, 6)
    assert torch.equal(blocks[1:, 0], blocks[:-1, -1])  # consecutive blocks share one token
    targets = torch.cat([b[1:] for b in blocks]).tolist()
    assert targets == stream[1 : 1 + len(targets)]  # each target once, in order


def test_jsonl_takes_the_text_field_and_reports_bad_lines(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 2}) + "\n")
    assert read_documents(good) == ["one", "two"]
    plain = tmp_path / "a.txt"
    plain.write_text("line one\nline two\n")
    assert read_documents(plain) == ["line one\nline two\n"]
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(StoreError, match="b.jsonl:2"):
        read_documents(bad)


def test_order_is_a_permutation_per_epoch_and_shards_partition_each_global_batch():
    order = SampleOrder(10, seed=3)
    first, second = order.blocks(0, 10), order.blocks(10, 10)
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(10))
    assert not torch.equal(first, second)  # reshuffled each epoch
    assert torch.equal(SampleOrder(10, seed=3).blocks(7, 6), torch.cat([first[7:], second[:3]]))
    starts = sorted(
        micro_batch_positions(5, m, r, batch_size=2, grad_accum=3, world_size=2) for m in range(3) for r in range(2)
    )
    assert starts == list(range(5 * 12, 6 * 12, 2))
