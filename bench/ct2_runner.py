"""CTranslate2 as a baseline beside the engine benchmark. Runs in its own virtual environment (the baselines'
requirements, bench/baselines-requirements.txt: `make baselines` creates it in build/ct2venv), never in the
project's; bench/engine.py --ct2-python calls it as a subprocess and reads its JSON line.

    PY=build/ct2venv/bin/python
    $PY bench/ct2_runner.py convert --model HF_DIR --out DIR --quantization float32|int8
    $PY bench/ct2_runner.py generate --model DIR --batch 64 --prompt-len 32 --new-tokens 128 --threads 2
    $PY bench/ct2_runner.py score --model DIR --n-seqs 64 --seq-len 256 --max-batch-size 8 --threads 2

The random-weight benchmark model has no real tokenizer, so the converter gets a stand-in vocabulary of
the strings `t<id>` (id 50256 is `<|endoftext|>`), and token ids cross as those strings. `generate` times
`Generator.generate_batch` (greedy, exactly --new-tokens new tokens, asserted) after one warm-up call;
`score` times `Generator.score_batch`. Prompts are random ids from --seed: their values do not matter with
random weights and forced lengths. Each command prints one JSON object on its last line.
"""

import argparse
import json
import os
import statistics
import time

import ctranslate2
import numpy as np
from ctranslate2.converters import TransformersConverter

EOS = "<|endoftext|>"


def to_tokens(ids: list[int], vocab_size: int) -> list[str]:
    return [EOS if i == vocab_size - 1 else f"t{i}" for i in ids]


class _StandInTokenizer:
    bos_token = eos_token = unk_token = EOS

    def __init__(self, vocab_size: int) -> None:
        self._vocab = {t: i for i, t in enumerate(to_tokens(list(range(vocab_size)), vocab_size))}

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)


class _IdsOnlyConverter(TransformersConverter):
    def __init__(self, model: str, vocab_size: int) -> None:
        super().__init__(model)
        self._vocab_size = vocab_size

    def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
        return _StandInTokenizer(self._vocab_size)


def prompts(n: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    return np.random.default_rng(seed).integers(0, vocab_size - 1, size=(n, length)).tolist()


def timed(fn, runs: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def convert(args: argparse.Namespace) -> dict:
    vocab_size = json.load(open(os.path.join(args.model, "config.json")))["vocab_size"]
    out = _IdsOnlyConverter(args.model, vocab_size).convert(args.out, quantization=args.quantization, force=True)
    return {"out": out, "quantization": args.quantization}


def _generator(args: argparse.Namespace) -> ctranslate2.Generator:
    return ctranslate2.Generator(args.model, device="cpu", compute_type="default", intra_threads=args.threads)


def generate(args: argparse.Namespace) -> dict:
    gen = _generator(args)
    vocab_size = args.vocab_size
    batch = [to_tokens(p, vocab_size) for p in prompts(args.batch, args.prompt_len, vocab_size, args.seed)]

    def run() -> None:
        results = gen.generate_batch(
            batch,
            max_length=args.new_tokens,
            min_length=args.new_tokens,
            sampling_topk=1,
            beam_size=1,
            include_prompt_in_result=False,
        )
        assert all(len(r.sequences_ids[0]) == args.new_tokens for r in results)

    times = timed(run, args.runs)
    seconds = statistics.median(times)
    return {
        "batch": args.batch,
        "compute_type": gen.compute_type,
        "seconds": times,
        "tok_s": args.batch * args.new_tokens / seconds,
        "ms_per_token": 1000 * seconds / args.new_tokens,
    }


def score(args: argparse.Namespace) -> dict:
    gen = _generator(args)
    vocab_size = args.vocab_size
    texts = [to_tokens(t, vocab_size) for t in prompts(args.n_seqs, args.seq_len, vocab_size, args.seed)]
    times = timed(lambda: gen.score_batch(texts, max_batch_size=args.max_batch_size), args.runs)
    return {
        "compute_type": gen.compute_type,
        "seconds": times,
        "tok_s": args.n_seqs * args.seq_len / statistics.median(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert")
    c.add_argument("--model", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--quantization", default="float32")
    for name in ("generate", "score"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--runs", type=int, default=1)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--vocab-size", type=int, default=50257)
    g = sub.choices["generate"]
    g.add_argument("--batch", type=int, default=64)
    g.add_argument("--prompt-len", type=int, default=32)
    g.add_argument("--new-tokens", type=int, default=128)
    s = sub.choices["score"]
    s.add_argument("--n-seqs", type=int, default=64)
    s.add_argument("--seq-len", type=int, default=256)
    s.add_argument("--max-batch-size", type=int, default=8)
    args = parser.parse_args()
    result = {"convert": convert, "generate": generate, "score": score}[args.command](args)
    print(json.dumps({"command": args.command, "ctranslate2": ctranslate2.__version__, **result}))


if __name__ == "__main__":
    main()
