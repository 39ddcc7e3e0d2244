"""Shared fixtures: tiny random GPT-2 checkpoints in HF format, built in a temp dir (never downloaded).

`make_hf_model` writes what `save_pretrained` writes (or a legacy `pytorch_model.bin`), plus a byte-level
BPE tokenizer trained on the fly with `tokenizers`, as `tokenizer.json` or as `vocab.json` + `merges.txt`.
"""

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel

from model_store import ModelStore

EOS = "<|endoftext|>"
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Serving language models means batching requests that arrive at different times.",
    "Tokens, positions and caches: every sequence decodes at its own position.",
    "Caf\u00e9 na\u00efve fa\u00e7ade \u2014 r\u00e9sum\u00e9. "
    "\U0001f600\U0001f680 \u4f60\u597d\uff0c\u4e16\u754c\u3002",
    "def forward(self, x):\n    return self.proj(self.act(self.fc(x)))\n",
] * 20
TINY = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, initializer_range=0.2)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A GPT-2-style byte-level BPE tokenizer (vocab ~400) saved both as tokenizer.json and vocab/merges."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out))  # vocab.json, merges.txt
    return out


@pytest.fixture(scope="session")
def make_hf_model(tmp_path_factory, tokenizer_dir) -> Callable[..., Path]:
    """Build a random GPT2LMHeadModel and save it like a user's HF directory. Returns the directory."""

    def make(weights: str = "safetensors", tokenizer: str = "json", seed: int = 0, config: dict | None = None) -> Path:
        tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        eos = tok.token_to_id(EOS)
        overrides = {**TINY, "vocab_size": tok.get_vocab_size(), **(config or {})}
        cfg = GPT2Config(bos_token_id=eos, eos_token_id=eos, **overrides)
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(cfg).eval()
        out = tmp_path_factory.mktemp(f"hf-{weights}-{tokenizer}")
        save_weights(model, out, weights)
        copy_tokenizer(tokenizer_dir, out, tokenizer)
        return out

    return make


def save_weights(model: GPT2LMHeadModel, out: Path, weights: str) -> None:
    if weights == "safetensors":
        model.save_pretrained(out)
    elif weights == "sharded":
        model.save_pretrained(out, max_shard_size="200KB")
        assert (out / "model.safetensors.index.json").is_file()
    elif weights in ("bin", "sharded-bin"):
        # Legacy layout of the original hub checkpoints: no "transformer." prefix, mask buffers saved.
        model.config.save_pretrained(out)
        state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
        for i in range(model.config.n_layer):
            n = model.config.n_positions
            state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
            state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        if weights == "bin":
            torch.save(state, out / "pytorch_model.bin")
        else:
            keys = sorted(state)
            halves = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
            for name, part in halves.items():
                torch.save({k: state[k] for k in part}, out / name)
            weight_map = {k: name for name, part in halves.items() for k in part}
            index = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                "weight_map": weight_map,
            }
            (out / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    else:
        raise ValueError(weights)


def copy_tokenizer(src: Path, out: Path, kind: str) -> None:
    files = ["tokenizer.json"] if kind == "json" else ["vocab.json", "merges.txt"]
    for name in files:
        (out / name).write_bytes((src / name).read_bytes())


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path / "store")
