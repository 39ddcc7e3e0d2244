"""The tests' tiny random GPT-2 checkpoints as a user's Hugging Face directory: what `save_pretrained` writes
(one file or sharded) or the legacy `pytorch_model.bin` layout (one file or sharded), with the tokenizer as
`tokenizer.json` or as `vocab.json` + `merges.txt`. The tokenizer and the model are reliability.stores'
(trained and initialised on the spot, never downloaded); the tests train the tokenizer on their own CORPUS
and default to 128 positions.
"""

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import GPT2LMHeadModel

from reliability.stores import TINY_CONFIG, random_gpt2, train_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Serving language models means batching requests that arrive at different times.",
    "Tokens, positions and caches: every sequence decodes at its own position.",
    "Caf\u00e9 na\u00efve fa\u00e7ade \u2014 r\u00e9sum\u00e9. "
    "\U0001f600\U0001f680 \u4f60\u597d\uff0c\u4e16\u754c\u3002",
    "def forward(self, x):\n    return self.proj(self.act(self.fc(x)))\n",
] * 20
TINY = {**TINY_CONFIG, "n_positions": 128}


def save_tokenizer(out: Path) -> Path:
    """A byte-level BPE (vocab 400) trained on CORPUS, saved in `out` as tokenizer.json and vocab/merges."""
    tok = train_tokenizer(CORPUS)
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out))  # vocab.json, merges.txt
    return out


def hf_checkpoint(
    out: Path,
    tokenizer_dir: Path,
    weights: str = "safetensors",
    tokenizer: str = "json",
    seed: int = 0,
    config: dict | None = None,
) -> Path:
    """A random GPT2LMHeadModel (TINY, then `config`) for the tokenizer in `tokenizer_dir`, saved in `out`."""
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    model = random_gpt2(tok, seed, **{**TINY, **(config or {})})
    save_weights(model, out, weights)
    copy_tokenizer(tokenizer_dir, out, tokenizer)
    return out


def save_weights(model: GPT2LMHeadModel, out: Path, weights: str) -> None:
    """`model` in `out` in the layout `weights` names: safetensors, sharded, bin or sharded-bin."""
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
    """The tokenizer files of `kind` (json: tokenizer.json; else vocab.json + merges.txt) from `src` to `out`."""
    files = ["tokenizer.json"] if kind == "json" else ["vocab.json", "merges.txt"]
    for name in files:
        (out / name).write_bytes((src / name).read_bytes())
