"""Training data: text and JSONL files -> EOS-separated token stream -> fixed-length blocks, and the
order in which blocks are visited.

A `.jsonl` file holds one document per line (its `text` field); any other file is one UTF-8 document.
The stream is `EOS doc EOS doc EOS ...`; block i is tokens [i*T, i*T + T + 1), so consecutive blocks
overlap by one token and every token after the first is a target exactly once (inputs [:-1], targets [1:]).

The visiting order is a function of (seed, position) only: position p of the endless sample stream is
block `perm(seed, p // n)[p % n]`. Optimizer step s consumes positions [s*G, (s+1)*G) for the global batch
G, so resuming needs only the step, and any number of processes shard the same global batches.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from ..errors import StoreError
from ..manifest import sha256_file


@dataclass(frozen=True)
class Blocks:
    tokens: torch.Tensor  # (num_blocks, block_size + 1) int64

    def __len__(self) -> int:
        return self.tokens.shape[0]


@dataclass(frozen=True)
class Dataset:
    train: Blocks
    held_out: Blocks
    unigram: torch.Tensor  # (vocab,) float64 token frequencies of the training targets
    data_sha256: dict[str, str]  # every data file read (training and held-out) -> sha256


def read_documents(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreError(f"cannot read data file {path}: {exc}") from None
    if path.suffix != ".jsonl":
        return [text]
    docs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            doc = record["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise StoreError(f'{path}:{number}: expected a JSON object with a "text" field') from None
        if not isinstance(doc, str):
            raise StoreError(f'{path}:{number}: "text" is not a string')
        docs.append(doc)
    return docs


def pack(docs: list[str], tokenizer: Tokenizer, eos_id: int, block_size: int) -> Blocks:
    stream = [eos_id]
    for encoding in tokenizer.encode_batch(docs, add_special_tokens=False):
        stream.extend(encoding.ids)
        stream.append(eos_id)
    num_blocks = (len(stream) - 1) // block_size
    ids = torch.tensor(stream[: num_blocks * block_size + 1], dtype=torch.int64)
    if num_blocks == 0:
        return Blocks(torch.empty(0, block_size + 1, dtype=torch.int64))
    return Blocks(ids.unfold(0, block_size + 1, block_size).contiguous())  # (num_blocks, block_size + 1)


def load_dataset(
    train_files: list[Path],
    eval_files: list[Path],
    tokenizer: Tokenizer,
    *,
    eos_id: int,
    block_size: int,
    eval_fraction: float,
    seed: int,
) -> Dataset:
    hashes = {str(p): sha256_file(p) for p in [*train_files, *eval_files]}
    train = pack([d for p in train_files for d in read_documents(p)], tokenizer, eos_id, block_size)
    if eval_files:
        held_out = pack([d for p in eval_files for d in read_documents(p)], tokenizer, eos_id, block_size)
    else:
        train, held_out = split_blocks(train, eval_fraction, seed)
    if len(train) == 0 or len(held_out) == 0:
        raise StoreError(
            f"too little data for blocks of {block_size} tokens: {len(train)} training and {len(held_out)} "
            "held-out blocks (add data, lower --block-size or change the held-out split)"
        )
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    unigram = torch.bincount(train.tokens[:, 1:].reshape(-1), minlength=vocab).double()
    return Dataset(train, held_out, unigram / unigram.sum(), hashes)


def split_blocks(blocks: Blocks, fraction: float, seed: int) -> tuple[Blocks, Blocks]:
    """A seeded random `fraction` of the blocks (at least one) held out; the rest, in order, for training."""
    n = len(blocks)
    num_held = max(1, round(fraction * n)) if n > 1 else 0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
    held = torch.zeros(n, dtype=torch.bool)
    held[order[:num_held]] = True
    return Blocks(blocks.tokens[~held]), Blocks(blocks.tokens[held])


class SampleOrder:
    """Block indices for positions of the endless, per-epoch shuffled stream of training samples."""

    def __init__(self, num_blocks: int, seed: int) -> None:
        self.num_blocks, self.seed = num_blocks, seed
        self._perms: dict[int, torch.Tensor] = {}

    def blocks(self, start: int, count: int) -> torch.Tensor:
        positions = torch.arange(start, start + count)
        return torch.stack([self._perm(int(p) // self.num_blocks)[int(p) % self.num_blocks] for p in positions])

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {
                epoch: torch.randperm(
                    self.num_blocks, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                )
            }
        return self._perms[epoch]


def micro_batch_positions(
    step: int, micro: int, rank: int, *, batch_size: int, grad_accum: int, world_size: int
) -> int:
    """First stream position of the micro-batch `micro` of process `rank` in optimizer step `step`
    (0-based). Each global batch is split into disjoint, contiguous per-(micro, rank) slices."""
    global_batch = batch_size * grad_accum * world_size
    return step * global_batch + (micro * world_size + rank) * batch_size
