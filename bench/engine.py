"""Benchmark the engine: generated tokens/s at 1, 8, 32 and 64 concurrent requests, beside HF `generate`
at the same batch sizes, in the same run.

    .venv/bin/python bench/engine.py [--quick] [--dtype float32|bfloat16] [--batches 1,8,32,64]

GPT-2-small shape with random weights (no download), token-id prompts of 32 tokens, 128 generated tokens,
greedy with ignore_eos, all requests arriving together. Also prints time to first token (median and p95)
under each load, scoring throughput on 64 x 256-token texts (prompt logprobs of every token, against an HF
forward + log_softmax, with the max |difference|), and prefix reuse: time to first token of a 512-token
prompt whose first 480 tokens were just served, against the same prompt with nothing cached. One timed run per point after a warm-up; figures are noisy on a shared machine, so read
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
from service.model import KVCache, load_model

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


def score_engine(engine: Engine, texts: list[list[int]]) -> tuple[float, list[list[float]]]:
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    start = time.perf_counter()
    for i, t in enumerate(texts):
        engine.add(f"s{i}", t, params)
    got: dict[str, list[float]] = {}
    while engine.has_work:
        for out in engine.step():
            got[out.request_id] = [e.logprob for e in out.prompt_logprobs]
    elapsed = time.perf_counter() - start
    return sum(len(t) for t in texts) / elapsed, [got[f"s{i}"] for i in range(len(texts))]


def score_hf(model: GPT2LMHeadModel, texts: list[list[int]]) -> tuple[float, list[list[float]]]:
    ids = torch.tensor(texts)
    start = time.perf_counter()
    logprobs = torch.log_softmax(model(ids).logits.float(), -1)  # (B, L, V)
    chosen = logprobs[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)  # (B, L - 1)
    elapsed = time.perf_counter() - start
    return ids.numel() / elapsed, chosen.tolist()


def time_to_first_token(engine: Engine, prompt: list[int], rid: str) -> float:
    start = time.perf_counter()
    engine.add(rid, prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    while engine.has_work:
        engine.step()
    return time.perf_counter() - start


def p95(values: list[float]) -> float:
    return values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 generated tokens instead of 128")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--batches", default="1,8,32,64", help="concurrency levels; empty to skip generation")
    args = parser.parse_args()
    new_tokens = 32 if args.quick else 128
    batches = [int(b) for b in args.batches.split(",") if b]
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        store, hf = random_gpt2_small(Path(tmp))
        loaded = load_model(store, "bench", dtype=args.dtype)
        hf = hf.to(getattr(torch, args.dtype))
        kv_tokens = max(64 * 256, max(batches, default=0) * (PROMPT_LEN + new_tokens)) + 1024
        kv_bytes = kv_tokens * KVCache.bytes_per_token(loaded.model.cfg, loaded.dtype)
        config = EngineConfig(SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048), kv_bytes)
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

        texts = torch.randint(0, 50257, (64, 256), generator=rng).tolist()
        score_engine(Engine(loaded, config), texts[:2])  # warm-up
        ours_score, ours_lp = score_engine(Engine(loaded, config), texts)
        hf_score, hf_lp = score_hf(hf, texts)
        max_diff = max(abs(a - b) for x, y in zip(ours_lp, hf_lp) for a, b in zip(x, y))
        prompt = torch.randint(0, 50257, (512,), generator=rng).tolist()
        engine = Engine(loaded, config)
        time_to_first_token(engine, prompt[:8], "warm")
        cold = time_to_first_token(engine, prompt, "cold")
        engine = Engine(loaded, config)
        time_to_first_token(engine, prompt[:480] + [1] * 32, "first")  # serves the first 480 tokens
        warm = time_to_first_token(engine, prompt, "reuse")

    print(f"\nscoring 64 x 256 tokens, {args.dtype}: ours {ours_score:.1f} tok/s, HF {hf_score:.1f} tok/s, "
          f"ours/HF {ours_score / hf_score:.2f}x, max |d logprob| vs HF {max_diff:.2e}")
    print(f"prefix reuse, 512-token prompt with 480 cached: TTFT {warm * 1000:.0f} ms vs {cold * 1000:.0f} ms "
          f"uncached ({warm / cold:.2f}x)")
    if not rows:
        return
    print(f"\nGPT-2-small shape, {args.dtype}, prompt {PROMPT_LEN}, {new_tokens} generated, greedy, ignore_eos")
    print(f"{'concurrent':>10} {'ours tok/s':>11} {'HF tok/s':>9} {'ours/HF':>8} {'TTFT p50 s':>11} {'TTFT p95 s':>11}")
    for batch, ours, theirs, t50, t95 in rows:
        print(f"{batch:>10} {ours:>11.1f} {theirs:>9.1f} {ours / theirs:>7.2f}x {t50:>11.3f} {t95:>11.3f}")


if __name__ == "__main__":
    main()
