"""Benchmark the engine: generated tokens/s at 1, 8, 32 and 64 concurrent requests, beside HF `generate`
at the same batch sizes and, optionally, CTranslate2, all in the same run.

    .venv/bin/python bench/engine.py [--quick] [--dtype float32|bfloat16|auto] [--batches 1,8,32,64]
                                     [--ct2-python VENV/bin/python --ct2-scripts DIR]

GPT-2-small shape with random weights (no download), token-id prompts of 32 tokens, 128 generated tokens,
greedy with ignore_eos, all requests arriving together. Also prints time to first token (median and p95)
under each load, scoring throughput on 64 x 256-token texts (prompt logprobs of every token, against an HF
forward + log_softmax, with the max |difference|), and prefix reuse: time to first token of a 512-token
prompt whose first 480 tokens were just served, against the same prompt with nothing cached. One timed run
per point after a warm-up; figures are noisy on a shared machine, so read the ratio, measured minutes apart
on the same machine. Not part of the test suite. `--dtype auto` resolves as the service does (bfloat16 where
the hardware has bf16 matrix units, else float32); HF then runs in the resolved dtype.

CTranslate2 baselines. The CTranslate2 scripts (convert_ct2.py, ct2_generate.py, scoring.py, in the
directory given as --ct2-scripts; they are not part of this repository) need a virtual environment of their
own, outside the project's dependencies; create it once:

    python3 -m venv ../ct2venv && ../ct2venv/bin/pip install -r bench/baselines-requirements.txt

With --ct2-python, this benchmark converts the same random model (saved in HF format) to CTranslate2 float32
and int8 with convert_ct2.py, then runs ct2_generate.py (float32 at --batches, when the run's dtype resolves
to float32; int8 at --ct2-int8-batches, for the best int8 figure) and scoring.py --ct2 (float32
score_batch, 64 x 256, max_batch_size 8), each as a subprocess of the baseline venv's python with --json,
--threads torch.get_num_threads() and --runs 1 (one timed run, as ours). This module never imports
ctranslate2 or the baseline scripts. The baseline scripts wait (up to 2 min each) for other processes to go quiet
before timing. A "targets" table follows the others: one row per performance goal, with ours, theirs, the
ratio, the goal and whether it is met. The full measurement is two runs, one per dtype:

    .venv/bin/python bench/engine.py --dtype float32 --ct2-python ../ct2venv/bin/python --ct2-scripts DIR
    .venv/bin/python bench/engine.py --dtype auto --ct2-python ../ct2venv/bin/python --ct2-scripts DIR

CTranslate2 sees token ids as the synthetic strings "t<id>" (id 50256 as "<|endoftext|>"), which
convert_ct2.py puts at vocabulary index <id>, so its ids are ours; its prompts are its own random ids of the
same shapes (bench_common.make_prompts), which does not matter with random weights and forced lengths.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

from service.engine import Engine, EngineConfig, EngineRequest, SamplingParams, SchedulerConfig
from service.model import KVCache, load_model

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, random_gpt2_small  # noqa: E402

PROMPT_LEN = 32
CT2_RUNS = 1  # timed runs per CTranslate2 point: as many as ours
CT2_SCORE_BATCH = 8  # score_batch max_batch_size, as the reference CTranslate2 figures were taken


def run_engine(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[float]]:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add(EngineRequest(f"r{i}", p, params))
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
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    elapsed = time.perf_counter() - start
    assert out.shape[1] == PROMPT_LEN + new_tokens
    return len(prompts) * new_tokens / elapsed


def score_engine(engine: Engine, texts: list[list[int]]) -> tuple[float, list[list[float]]]:
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    start = time.perf_counter()
    for i, t in enumerate(texts):
        engine.add(EngineRequest(f"s{i}", t, params))
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
    engine.add(EngineRequest(rid, prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)))
    while engine.has_work:
        engine.step()
    return time.perf_counter() - start


def p95(values: list[float]) -> float:
    return values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]


def run_baseline(python: str, script: Path, *args: object, json_path: Path | None = None) -> list[dict]:
    """Run one baseline script in its own venv, echoing its output indented; return its JSON records
    (the scripts append one JSON object per line to --json)."""
    cmd = [python, str(script), *map(str, args)]
    if json_path is not None:
        json_path.unlink(missing_ok=True)
        cmd += ["--json", str(json_path)]
    print(f"  $ {' '.join(cmd)}", flush=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(f"    | {line.rstrip()}", flush=True)
    if proc.returncode:
        raise SystemExit(f"baseline failed (exit {proc.returncode}): {' '.join(cmd)}")
    if json_path is None:
        return []
    return [json.loads(line) for line in json_path.read_text().splitlines() if line.strip()]


def ct2_baselines(
    args: argparse.Namespace, hf_dir: Path, work: Path, fp32: bool, batches: list[int], new_tokens: int
) -> dict:
    """CTranslate2 figures, from the baseline scripts run in the baseline venv: generated tok/s per
    (quantization, batch), and float32 score_batch tok/s."""
    py, scripts = args.ct2_python, Path(args.ct2_scripts)
    threads = torch.get_num_threads()
    quants = (["float32"] if fp32 else []) + ["int8"]
    print(f"\nCTranslate2 baselines ({', '.join(quants)}), {threads} threads, {CT2_RUNS} timed run(s)", flush=True)
    models = {}
    for q in quants:
        models[q] = work / f"ct2-{q}"
        run_baseline(py, scripts / "convert_ct2.py", "--model", hf_dir, "--out", models[q], "--quantization", q)
    common = ["--prompt-len", PROMPT_LEN, "--new-tokens", new_tokens, "--threads", threads, "--runs", CT2_RUNS]
    gen: dict[tuple[str, int], float] = {}
    compute: dict[str, str] = {}
    int8_batches = [int(b) for b in args.ct2_int8_batches.split(",") if b]
    for q, qb in (("float32", batches if fp32 else []), ("int8", int8_batches)):
        if not qb:
            continue
        recs = run_baseline(
            py,
            scripts / "ct2_generate.py",
            "--model",
            models[q],
            "--batch",
            ",".join(map(str, qb)),
            *common,
            json_path=work / f"gen-{q}.jsonl",
        )
        for r in recs:
            gen[(q, r["batch"])] = statistics.median(r["tok_s"])
            compute[q] = r["compute_type"]
    score = None
    if fp32:
        recs = run_baseline(
            py,
            scripts / "scoring.py",
            "--model",
            hf_dir,
            "--n-seqs",
            64,
            "--seq-len",
            256,
            "--skip-hf",
            "--ct2",
            models["float32"],
            "--ct2-batch",
            CT2_SCORE_BATCH,
            "--threads",
            threads,
            "--runs",
            CT2_RUNS,
            json_path=work / "score.jsonl",
        )
        (r,) = recs
        score = r["n_seqs"] * r["seq_len"] / statistics.median(r["s"])
    return {"gen": gen, "compute": compute, "score": score}


def print_targets(
    dtype: str,
    ours_gen: dict[int, float],
    ours_score: float,
    max_diff: float,
    warm: float,
    cold: float,
    ct2: dict | None,
) -> None:
    """One row per performance goal: ours, theirs, ratio, goal, met."""
    gen = ct2["gen"] if ct2 else {}
    fp32 = dtype == "float32"
    na = "n/a"
    rows = []  # (what, ours, theirs, ratio, target, met)

    def row(what, ours, theirs, ratio, target, ok, fmt_=".1f"):
        show = lambda v: na if v is None else f"{v:{fmt_}}"  # noqa: E731
        rows.append(
            (
                what,
                show(ours),
                show(theirs),
                na if ratio is None else f"{ratio:.2f}x",
                target,
                na if ok is None else ("yes" if ok else "no"),
            )
        )

    def both(a, b):
        return a is not None and b is not None

    ours, theirs = (ours_gen.get(64) if fp32 else None), gen.get(("float32", 64))
    ratio = ours / theirs if both(ours, theirs) else None
    row(
        "float32 c64 tok/s vs CT2 float32 b64", ours, theirs, ratio, ">= 1.30x", None if ratio is None else ratio >= 1.3
    )

    int8 = {b: v for (q, b), v in gen.items() if q == "int8"}
    best_b = max(int8, key=int8.get) if int8 else None
    ours, theirs = ours_gen.get(64), (int8[best_b] if int8 else None)
    ratio = ours / theirs if both(ours, theirs) else None
    row(
        f"{dtype} c64 tok/s vs best CT2 int8" + (f" (b{best_b})" if int8 else ""),
        ours,
        theirs,
        ratio,
        ">= 2.00x",
        None if ratio is None else ratio >= 2.0,
    )

    ours_t, theirs_t = (ours_gen.get(1) if fp32 else None), gen.get(("float32", 1))
    ours, theirs = (1000 / ours_t if ours_t else None), (1000 / theirs_t if theirs_t else None)
    ratio = ours / theirs if both(ours, theirs) else None  # latency ratio = their tok/s / our tok/s
    row("b1 float32 ms/token vs CT2 float32", ours, theirs, ratio, "<= 1.10x", None if ratio is None else ratio <= 1.1)

    ours, theirs = (ours_score if fp32 else None), (ct2["score"] if ct2 else None)
    ratio = ours / theirs if both(ours, theirs) else None
    row(
        "scoring float32 64x256 tok/s vs CT2 score_batch",
        ours,
        theirs,
        ratio,
        ">= 1.20x",
        None if ratio is None else ratio >= 1.2,
    )
    diff = max_diff if fp32 else None
    rows.append(
        (
            "  with max |d logprob| vs HF float32",
            na if diff is None else f"{diff:.1e}",
            "-",
            "-",
            "<= 1e-4",
            na if diff is None else ("yes" if diff <= 1e-4 else "no"),
        )
    )

    row(
        f"prefix reuse TTFT ms ({dtype}), 480/512 cached vs none",
        warm * 1000,
        cold * 1000,
        warm / cold,
        "<= 0.25x",
        warm / cold <= 0.25,
        ".0f",
    )

    print(
        f"\ntargets, run dtype {dtype}"
        + ("" if ct2 else "; no CTranslate2: pass --ct2-python")
        + ("" if fp32 else "; float32 rows need --dtype float32")
    )
    header = ("measure", "ours", "theirs", "ratio", "target", "met")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(6)]
    for r in [header, *rows]:
        print(f"{r[0]:<{widths[0]}} " + " ".join(f"{c:>{w}}" for c, w in zip(r[1:], widths[1:])))


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 generated tokens instead of 128")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "auto"))
    parser.add_argument("--batches", default="1,8,32,64", help="concurrency levels; empty to skip generation")
    parser.add_argument("--ct2-python", default=None, help="python of the baseline venv: runs CTranslate2 too")
    parser.add_argument("--ct2-scripts", default=None, help="the CTranslate2 baseline scripts' directory")
    parser.add_argument("--ct2-int8-batches", default="1,8,32,64", help="CTranslate2 int8 batch sizes (best wins)")
    args = parser.parse_args()
    new_tokens = 32 if args.quick else 128
    batches = [int(b) for b in args.batches.split(",") if b]
    if args.ct2_python and not (args.ct2_scripts and (Path(args.ct2_scripts) / "ct2_generate.py").is_file()):
        parser.error(f"no ct2_generate.py in --ct2-scripts {args.ct2_scripts}")
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        store, hf = random_gpt2_small(Path(tmp))
        loaded = load_model(store, "bench", dtype=args.dtype)
        dtype = str(loaded.dtype).removeprefix("torch.")
        if args.dtype == "auto":
            print(f"dtype auto -> {dtype}")
        hf = hf.to(loaded.dtype)
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
        del engine

        ct2 = None
        if args.ct2_python:
            ct2 = ct2_baselines(args, Path(tmp) / "hf", Path(tmp), dtype == "float32", batches, new_tokens)

    print(
        f"\nscoring 64 x 256 tokens, {dtype}: ours {ours_score:.1f} tok/s, HF {hf_score:.1f} tok/s, "
        f"ours/HF {ours_score / hf_score:.2f}x, max |d logprob| vs HF {max_diff:.2e}"
    )
    print(
        f"prefix reuse, 512-token prompt with 480 cached: TTFT {warm * 1000:.0f} ms vs {cold * 1000:.0f} ms "
        f"uncached ({warm / cold:.2f}x)"
    )
    if rows:
        print(f"\nGPT-2-small shape, {dtype}, prompt {PROMPT_LEN}, {new_tokens} generated, greedy, ignore_eos")
        print(
            f"{'concurrent':>10} {'ours tok/s':>11} {'HF tok/s':>9} {'ours/HF':>8} "
            f"{'TTFT p50 s':>11} {'TTFT p95 s':>11}"
        )
        for batch, ours, theirs, t50, t95 in rows:
            print(f"{batch:>10} {ours:>11.1f} {theirs:>9.1f} {ours / theirs:>7.2f}x {t50:>11.3f} {t95:>11.3f}")
    if ct2:
        gen, compute = ct2["gen"], ct2["compute"]
        print(
            f"\nCTranslate2 generate_batch tok/s, prompt {PROMPT_LEN}, {new_tokens} generated "
            f"(compute types: {', '.join(f'{q} -> {c}' for q, c in compute.items())})"
        )
        print(f"{'batch':>10} {'float32':>9} {'int8':>9}")
        for b in sorted({b for _, b in gen}):
            cells = [gen.get((q, b)) for q in ("float32", "int8")]
            print(f"{b:>10} " + " ".join(f"{'-' if v is None else f'{v:.1f}':>9}" for v in cells))
        if ct2["score"] is not None:
            print(
                f"CTranslate2 float32 score_batch 64 x 256 (max_batch_size {CT2_SCORE_BATCH}): {ct2['score']:.1f} tok/s"
            )
    print_targets(dtype, {b: ours for b, ours, *_ in rows}, ours_score, max_diff, warm, cold, ct2)


if __name__ == "__main__":
    main()
