"""Benchmark the engine: generated tokens/s at 1, 8, 32 and 64 concurrent requests, beside HF `generate`
at the same batch sizes, in the same run.

    .venv/bin/python bench/engine.py [--quick] [--dtype float32|bfloat16] [--batches 1,8,32,64]

GPT-2-small shape with random weights (no download), token-id prompts of 32 tokens, 128 generated tokens,
greedy with ignore_eos, all requests arriving together. Also prints time to first token (median and p95)
under each load. One timed run per point after a warm-up; figures are noisy on a shared machine, so read
the ratio, measured minutes apart on the same machine. Not part of the test suite.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

from service.engine.engine import Engine, EngineConfig
from service.engine.scheduler import SchedulerConfig
from service.engine.types import SamplingParams
from service.model import load_model

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, random_gpt2_small  # noqa: E402

PROMPT_LEN = 32


def run_engine(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[float]]:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add(f"r{i}", p, params)
    first: dict[str, float] = {}
    generated = 0
    while engine.has_work:
        for out in engine.step():
            first.setdefault(out.request_id, time.perf_counter() - start)
            generated += len(out.token_ids)
    elapsed = time.perf_counter() - start
    assert generated == len(prompts) * new_tokens
    return generated / elapsed, sorted(first.values())


def run_hf(model: GPT2LMHeadModel, prompts: list[list[int]], new_tokens: int) -> float:
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)  # fmt: skip
    elapsed = time.perf_counter() - start
    assert out.shape[1] == PROMPT_LEN + new_tokens
    return len(prompts) * new_tokens / elapsed


def p95(values: list[float]) -> float:
    return values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 generated tokens instead of 128")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--batches", default="1,8,32,64")
    args = parser.parse_args()
    new_tokens = 32 if args.quick else 128
    batches = [int(b) for b in args.batches.split(",")]
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        store, hf = random_gpt2_small(Path(tmp))
        loaded = load_model(store, "bench", dtype=args.dtype)
        hf = hf.to(getattr(torch, args.dtype))
        kv_tokens = max(batches) * (PROMPT_LEN + new_tokens) + 1024
        kv_bytes = kv_tokens * 2 * 12 * 768 * getattr(torch, args.dtype).itemsize
        config = EngineConfig(SchedulerConfig(max_num_seqs=max(batches), max_num_batched_tokens=2048), kv_bytes)
        rng = torch.Generator().manual_seed(1)
        rows = []
        for batch in batches:
            prompts = torch.randint(0, 50257, (batch, PROMPT_LEN), generator=rng).tolist()
            engine = Engine(loaded, config)
            run_engine(engine, prompts[:1], 4)  # warm-up
            ours, ttft = run_engine(engine, prompts, new_tokens)
            run_hf(hf, prompts[:1], 4)
            theirs = run_hf(hf, prompts, new_tokens)
            rows.append((batch, ours, theirs, statistics.median(ttft), p95(ttft)))
            print(f"  batch {batch}: ours {ours:.1f} tok/s, HF {theirs:.1f} tok/s", flush=True)

    print(f"\nGPT-2-small shape, {args.dtype}, prompt {PROMPT_LEN}, {new_tokens} generated, greedy, ignore_eos")
    print(f"{'concurrent':>10} {'ours tok/s':>11} {'HF tok/s':>9} {'ours/HF':>8} {'TTFT p50 s':>11} {'TTFT p95 s':>11}")
    for batch, ours, theirs, t50, t95 in rows:
        print(f"{batch:>10} {ours:>11.1f} {theirs:>9.1f} {ours / theirs:>7.2f}x {t50:>11.3f} {t95:>11.3f}")


if __name__ == "__main__":
    main()
