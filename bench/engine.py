"""Benchmark the engine beside HF `generate`, CTranslate2 and llama.cpp on the same weights, in one run, and
check the performance goals.

    make baselines                      # once per machine: build/ct2venv and build/llama-cpp (~20 min)
    .venv/bin/python bench/engine.py --ct2-python build/ct2venv/bin/python --llama-cpp build/llama-cpp \\
                                     [--quick] [--batches 1,8,32,64] [--rounds 3] [--json PATH]

GPT-2-small shape with random weights (seed 0, no download), token-id prompts of 32 tokens, 128 generated
tokens, greedy with ignore_eos, all requests arriving together; 2 threads (as many as this process may use)
for everyone. Measured, one timed run per point after a warm-up:

- ours (the synchronous engine, as the service runs it) in float32 at every --batches size, beside HF
  `generate` at the same batch; where the CPU has bf16 matrix units (AMX), also bfloat16 (what `dtype=auto`
  picks there) at 1 and 64; int8 (QUANTIZATION=int8, DTYPE=auto: float32 activations) at 1 and 64;
  scoring 64 x 256-token texts (prompt logprobs of every token) against an HF
  forward + log_softmax, with the max |difference|; prefix reuse (time to first token of a 512-token prompt
  whose first 480 tokens were just served, against nothing cached);
- CTranslate2 (--ct2-python: the baselines' venv runs bench/ct2_runner.py): `generate_batch` float32 and
  int8 at batch 1 and 64, and float32 `score_batch` (max_batch_size 8);
- llama.cpp (--llama-cpp: the binaries bench/llama_cpp.py built): the same weights as GGUF f32 and q8_0,
  `llama-bench -p 32 -n 128` (batch 1) and `llama-batched-bench -npp 32 -ntg 128 -npl 64`; its batch-64
  figure counts prefill, as ours does.

Every figure a goal compares (batch 1, 64 concurrent, scoring) is then measured again in --rounds rounds,
ours (a fresh engine each time) and each baseline in turn, in another order each round (float32 beside
their float32, int8 beside their int8), and each one's median over those rounds is what the goals use:
memory bandwidth and clock drift by 20 % or more within minutes on a shared machine, and the first pass
measures each system minutes apart. The per-batch table shows the first pass.

Then a table of the goals (ours, theirs, ratio, goal, met), the CPU model and flags, and the GEMM path the
engine chose; --json writes `{"machine": ..., "targets": [{"name", "ours", "theirs", "ratio", "goal",
"met"}]}`. A baseline that is not given shows as n/a. Figures are noisy on a shared machine: compare ratios
from one run, and repeat the run minutes later. Not part of the test suite.
"""

import argparse
import copy
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

from model_store.hardware import has_bf16_matrix_units
from service.engine import Engine, EngineConfig, EngineRequest, SamplingParams, SchedulerConfig
from service.model import KVCache, load_model

sys.path.insert(0, str(Path(__file__).parent))
import llama_cpp  # noqa: E402
from common import cpu_flags, machine, random_gpt2_small  # noqa: E402

PROMPT_LEN = 32
SCORE_SHAPE = (64, 256)
CT2_SCORE_BATCH = 8  # score_batch max_batch_size
CT2_RUNNER = Path(__file__).resolve().parent / "ct2_runner.py"


# ---- ours and HF ----------------------------------------------------------------------------------------


def run_engine(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[float]]:
    """Generated tokens/s (prefill included) and each request's time to first token."""
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


def score_hf(model: GPT2LMHeadModel, texts: list[list[int]]) -> list[list[float]]:
    ids = torch.tensor(texts)
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(ids).logits.float(), -1)  # (B, L, V)
    return logprobs[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2).tolist()  # (B, L - 1)


def time_to_first_token(engine: Engine, prompt: list[int], rid: str) -> float:
    start = time.perf_counter()
    engine.add(EngineRequest(rid, prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)))
    while engine.has_work:
        engine.step()
    return time.perf_counter() - start


def p95(values: list[float]) -> float:
    return values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]


@dataclass
class Ours:
    dtype: str
    gen: dict[int, float]  # batch -> generated tok/s
    hf: dict[int, float]
    ttft: dict[int, tuple[float, float]]  # batch -> (p50, p95) seconds
    backend: str
    again: dict = dataclasses.field(default_factory=dict)  # batch 1, 64 -> () -> tok/s, the same run once more


def measure_generation(
    store, dtype: str, hf, batches: list[int], new_tokens: int, with_hf: bool, quantization: str = "none"
) -> Ours:
    loaded = load_model(store, "bench", dtype=dtype, quantization=quantization)
    hf = copy.deepcopy(hf).to(loaded.dtype)  # a copy: the float32 model must stay float32 for the others
    config = dataclasses.replace(engine_config(loaded, batches, new_tokens), quantization=quantization)
    rng = torch.Generator().manual_seed(1)
    name = "int8" if quantization == "int8" else dtype
    result = Ours(name, {}, {}, {}, "")
    for batch in batches:
        prompts = torch.randint(0, 50257, (batch, PROMPT_LEN), generator=rng).tolist()
        engine = Engine(loaded, config)
        result.backend = engine.kernels
        run_engine(engine, prompts[:1], 4)  # warm-up
        result.gen[batch], ttft = run_engine(engine, prompts, new_tokens)
        result.ttft[batch] = (statistics.median(ttft), p95(ttft))
        if batch in (1, 64):  # once more as above: a fresh engine (nothing cached), warmed up the same way
            result.again[batch] = lambda prompts=prompts: measure_once(loaded, config, prompts, new_tokens)
        line = f"  ours {name} batch {batch}: {result.gen[batch]:.1f} tok/s"
        if with_hf:
            run_hf(hf, prompts[:1], 4)
            result.hf[batch] = run_hf(hf, prompts, new_tokens)
            line += f", HF {result.hf[batch]:.1f} tok/s"
        print(line, flush=True)
    return result


def measure_once(loaded, config: EngineConfig, prompts: list[list[int]], new_tokens: int) -> float:
    engine = Engine(loaded, config)
    run_engine(engine, prompts[:1], 4)  # warm-up
    return run_engine(engine, prompts, new_tokens)[0]


def engine_config(loaded, batches: list[int], new_tokens: int) -> EngineConfig:
    kv_tokens = max(SCORE_SHAPE[0] * SCORE_SHAPE[1], max(batches, default=0) * (PROMPT_LEN + new_tokens)) + 1024
    kv_bytes = kv_tokens * KVCache.bytes_per_token(loaded.model.cfg, loaded.dtype)
    return EngineConfig(SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048), kv_bytes)


def measure_scoring(store, hf) -> tuple[float, float, Callable[[], float]]:
    """Ours float32 scoring tok/s, the max |logprob difference| against HF float32, and a function that
    measures the tok/s once more."""
    loaded = load_model(store, "bench", dtype="float32")
    config = engine_config(loaded, [], 0)
    texts = torch.randint(0, 50257, SCORE_SHAPE, generator=torch.Generator().manual_seed(2)).tolist()
    score_engine(Engine(loaded, config), texts[:2])  # warm-up
    tok_s, ours = score_engine(Engine(loaded, config), texts)
    theirs = score_hf(hf, texts)
    again = lambda: score_engine(Engine(loaded, config), texts)[0]  # noqa: E731
    return tok_s, max(abs(a - b) for x, y in zip(ours, theirs) for a, b in zip(x, y)), again


def measure_prefix_reuse(store) -> tuple[float, float]:
    loaded = load_model(store, "bench", dtype="float32")
    config = engine_config(loaded, [], 0)
    prompt = torch.randint(0, 50257, (512,), generator=torch.Generator().manual_seed(3)).tolist()
    engine = Engine(loaded, config)
    time_to_first_token(engine, prompt[:8], "warm")
    cold = time_to_first_token(engine, prompt, "cold")
    engine = Engine(loaded, config)
    time_to_first_token(engine, prompt[:480] + [1] * 32, "first")  # serves the first 480 tokens
    return time_to_first_token(engine, prompt, "reuse"), cold


# ---- baselines ------------------------------------------------------------------------------------------


def ct2(python: str, cmd: str, **options: object) -> dict:
    """One bench/ct2_runner.py command in the baselines' venv (options as its flags); its JSON result."""
    argv = [python, str(CT2_RUNNER), cmd]
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"CTranslate2 runner failed: {' '.join(argv)}\n{done.stdout}{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_ct2(python: str, hf_dir: Path, work: Path, new_tokens: int, threads: int) -> dict:
    """{(quantization, batch): tok/s}, "score": float32 score_batch tok/s, and ("again", quantization,
    batch) and ("again", "score"): functions that measure them once more."""
    out: dict = {}
    for quant in ("float32", "int8"):
        model = work / f"ct2-{quant}"
        ct2(python, "convert", model=hf_dir, out=model, quantization=quant)
        for batch in (1, 64):
            options = dict(model=model, batch=batch, prompt_len=PROMPT_LEN, new_tokens=new_tokens, threads=threads)
            r = ct2(python, "generate", **options)
            out[quant, batch] = r["tok_s"]
            out["again", quant, batch] = lambda options=options: ct2(python, "generate", **options)["tok_s"]
            print(f"  CTranslate2 {quant} ({r['compute_type']}) batch {batch}: {r['tok_s']:.1f} tok/s", flush=True)
    n, length = SCORE_SHAPE
    r = ct2(
        python,
        "score",
        model=work / "ct2-float32",
        n_seqs=n,
        seq_len=length,
        max_batch_size=CT2_SCORE_BATCH,
        threads=threads,
    )
    out["score"] = r["tok_s"]
    score_options = dict(model=work / "ct2-float32", n_seqs=n, seq_len=length, max_batch_size=CT2_SCORE_BATCH)
    out["again", "score"] = lambda: ct2(python, "score", **score_options, threads=threads)["tok_s"]
    print(f"  CTranslate2 float32 score_batch {n} x {length}: {r['tok_s']:.1f} tok/s", flush=True)
    return out


def measure_llama(path: Path, hf, work: Path, new_tokens: int, threads: int) -> dict:
    """{(type, batch): tok/s} for f32 and q8_0, batch 1 (llama-bench) and 64 (llama-batched-bench), and
    ("again", type, batch): a function that measures it once more."""
    bins = llama_cpp.find_binaries(path)
    f32 = llama_cpp.write_gguf(hf, work / "bench-f32.gguf", bins)
    models = {"f32": f32, "q8_0": llama_cpp.quantize(bins, f32, work / "bench-q8_0.gguf")}
    out = {}
    for kind, model in models.items():
        ms, repacked_1 = llama_cpp.batch1_ms_per_token(bins, model, PROMPT_LEN, new_tokens, threads)
        out[kind, 1] = 1000 / ms
        out["again", kind, 1] = lambda model=model: (
            1000 / llama_cpp.batch1_ms_per_token(bins, model, PROMPT_LEN, new_tokens, threads)[0]
        )
        out["again", kind, 64] = lambda model=model: llama_cpp.batched_tok_s(
            bins, model, PROMPT_LEN, new_tokens, 64, threads
        )[0]
        out[kind, 64], repacked_64 = llama_cpp.batched_tok_s(bins, model, PROMPT_LEN, new_tokens, 64, threads)
        notes = [
            f"{n} without weight repacking, which crashed"
            for n, r in (("b1", repacked_1), ("b64", repacked_64))
            if not r
        ]
        print(
            f"  llama.cpp {kind}: batch 1 {ms:.1f} ms/token, 64 parallel {out[kind, 64]:.1f} tok/s"
            + (f" ({'; '.join(notes)})" if notes else ""),
            flush=True,
        )
    return out


def measure_in_turn(
    rounds: int, runs: dict[tuple, dict[str, Callable[[], float]]], first: dict[tuple, dict[str, float]]
) -> dict[tuple, dict[str, float]]:
    """The machine's memory bandwidth and clock drift by 20 % or more within minutes when it is shared, and
    the first pass measured each system minutes apart: measure every goal's figure again `rounds` times
    with ours and each baseline in turn (each round in another order), and return each one's median.
    runs: {figure: {system: () -> value}}, figure (dtype, batch) or ("scoring",); first: the first pass."""
    medians: dict[tuple, dict[str, float]] = {}
    for figure, systems in runs.items():
        if len(systems) < 2:  # nothing to compare in turn with
            continue
        names = list(systems)
        seen: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                seen[name].append(systems[name]())
        medians[figure] = {name: statistics.median(values) for name, values in seen.items()}
        ms = figure[-1] == 1
        show = (lambda v: f"{1000 / v:.1f}") if ms else (lambda v: f"{v:.1f}")
        line = ", ".join(f"{n} {' / '.join(show(v) for v in seen[n])}" for n in names)
        firsts = ", ".join(f"{n} {show(first[figure][n])}" for n in names if first.get(figure, {}).get(n))
        label = " ".join(str(part) for part in figure) + (" ms/token" if ms else " tok/s")
        print(f"  {label}, {rounds} rounds in turn: {line} (first pass: {firsts})", flush=True)
    return medians


# ---- goals ----------------------------------------------------------------------------------------------


def goals(fp32: Ours, bf16: Ours | None, int8: Ours | None, score: dict, reuse, ct, ll, medians) -> list:
    """One row per goal: name, ours, theirs, ratio, goal, met (None where a figure is missing). A figure
    measured in turn (`medians`) is its median there, else its first-pass value."""
    rows = []
    first = first_pass(fp32, bf16, int8, score, ct, ll)

    def fig(figure: tuple, system: str):
        return medians.get(figure, {}).get(system, first.get(figure, {}).get(system))

    def throughput(name, ours, theirs, at_least):
        ratio = ours / theirs if ours and theirs else None
        rows.append((name, ours, theirs, ratio, f">= {at_least:.2f}x", None if ratio is None else ratio >= at_least))

    def latency(name, ours_tok_s, theirs_tok_s, at_most):  # ms per token; ratio = ours / theirs
        ours, theirs = (1000 / ours_tok_s if ours_tok_s else None), (1000 / theirs_tok_s if theirs_tok_s else None)
        ratio = ours / theirs if ours and theirs else None
        rows.append((name, ours, theirs, ratio, f"<= {at_most:.2f}x", None if ratio is None else ratio <= at_most))

    def pair(figure: tuple, baseline: str) -> tuple:
        return fig(figure, "ours"), fig(figure, baseline)

    ct2, llama = "CTranslate2", "llama.cpp"
    throughput("fp32 c64 tok/s vs CTranslate2 fp32 b64", *pair(("float32", 64), ct2), 1.3)
    throughput("fp32 c64 tok/s vs llama.cpp f32 64 parallel", *pair(("float32", 64), llama), 1.3)
    latency("fp32 b1 ms/token vs CTranslate2 fp32", *pair(("float32", 1), ct2), 1.0)
    latency("fp32 b1 ms/token vs llama.cpp f32", *pair(("float32", 1), llama), 1.0)
    throughput("scoring fp32 64x256 tok/s vs CTranslate2 score_batch", *pair(("scoring",), ct2), 1.2)
    diff = score["diff"]
    rows.append(("  scoring max |d logprob| vs HF fp32", diff, None, None, "<= 1e-4", diff <= 1e-4))
    throughput("int8 c64 tok/s vs CTranslate2 int8 b64", *pair(("int8", 64), ct2), 1.2)
    throughput("int8 c64 tok/s vs llama.cpp q8_0 64 parallel", *pair(("int8", 64), llama), 1.2)
    latency("int8 b1 ms/token vs CTranslate2 int8", *pair(("int8", 1), ct2), 1.0)
    latency("int8 b1 ms/token vs llama.cpp q8_0", *pair(("int8", 1), llama), 1.0)
    if bf16 is not None:
        throughput("bf16 (AMX) c64 tok/s vs CTranslate2 int8 b64", *pair(("bfloat16", 64), "CTranslate2 int8"), 2.0)
    warm, cold = reuse
    rows.append(
        (
            "prefix reuse TTFT ms, 480/512 cached vs none",
            warm * 1000,
            cold * 1000,
            warm / cold,
            "<= 0.25x",
            warm / cold <= 0.25,
        )
    )
    return rows


def first_pass(fp32: Ours, bf16: Ours | None, int8: Ours | None, score: dict, ct, ll) -> dict:
    """The first pass's figures, {(dtype, batch) or ("scoring",): {system: tok/s}}."""
    ct, ll = ct or {}, ll or {}
    out: dict[tuple, dict[str, float]] = {}
    for ours, quant, kind in ((fp32, "float32", "f32"), (int8, "int8", "q8_0")):
        for batch in (1, 64):
            systems = {"ours": ours.gen.get(batch), "CTranslate2": ct.get((quant, batch))}
            systems["llama.cpp"] = ll.get((kind, batch))
            out[quant, batch] = {k: v for k, v in systems.items() if v}
    if bf16 is not None:
        systems = {"ours": bf16.gen.get(64), "CTranslate2 int8": ct.get(("int8", 64))}
        out["bfloat16", 64] = {k: v for k, v in systems.items() if v}
    out["scoring",] = {k: v for k, v in {"ours": score["tok_s"], "CTranslate2": ct.get("score")}.items() if v}
    return out


def rerunners(fp32: Ours, bf16: Ours | None, int8: Ours | None, score: dict, ct, ll) -> dict:
    """What measures each first-pass figure once more, in the same shape as `first_pass`."""
    ct, ll = ct or {}, ll or {}
    out: dict[tuple, dict] = {}
    for ours, quant, kind in ((fp32, "float32", "f32"), (int8, "int8", "q8_0")):
        for batch in (b for b in (1, 64) if b in ours.gen):
            systems = {"ours": ours.again.get(batch), "CTranslate2": ct.get(("again", quant, batch))}
            systems["llama.cpp"] = ll.get(("again", kind, batch))
            out[quant, batch] = {k: v for k, v in systems.items() if v}
    if bf16 is not None and 64 in bf16.gen:
        systems = {"ours": bf16.again.get(64), "CTranslate2 int8": ct.get(("again", "int8", 64))}
        out["bfloat16", 64] = {k: v for k, v in systems.items() if v}
    systems = {"ours": score["again"], "CTranslate2": ct.get(("again", "score"))}
    out["scoring",] = {k: v for k, v in systems.items() if v}
    return out


def show(value, digits: str = ".1f") -> str:
    if value is None:
        return "n/a"
    return f"{value:.1e}" if 0 < abs(value) < 1e-2 else f"{value:{digits}}"


def print_goals(rows: list) -> None:
    table = [("goal", "ours", "theirs", "ratio", "goal", "met")]
    for name, ours, theirs, ratio, goal, met in rows:
        ratio_text = "n/a" if ratio is None else f"{ratio:.2f}x"
        table.append(
            (name, show(ours), show(theirs), ratio_text, goal, "n/a" if met is None else ("yes" if met else "no"))
        )
    widths = [max(len(r[i]) for r in table) for i in range(6)]
    for r in table:
        print(f"{r[0]:<{widths[0]}} " + " ".join(f"{c:>{w}}" for c, w in zip(r[1:], widths[1:])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 generated tokens instead of 128")
    parser.add_argument("--batches", default="1,8,32,64", help="float32 concurrency levels (1 and 64 are goals)")
    parser.add_argument("--no-hf", action="store_true", help="skip HF generate (faster)")
    parser.add_argument("--ct2-python", default=None, help="python of the baselines' venv (build/ct2venv/bin/python)")
    parser.add_argument("--llama-cpp", type=Path, default=None, help="llama.cpp binaries, or build/llama-cpp")
    parser.add_argument("--json", default=None, help="write the machine and the goals here")
    parser.add_argument(
        "--rounds", type=int, default=3, help="the goals' figures: this many rounds, ours and the baselines in turn"
    )
    args = parser.parse_args()
    new_tokens = 32 if args.quick else 128
    batches = [int(b) for b in args.batches.split(",") if b]
    threads = torch.get_num_threads()
    amx = has_bf16_matrix_units(torch.device("cpu"))
    print(machine())
    print(f"CPU flags: {cpu_flags()}; bf16 matrix units: {'yes' if amx else 'no'}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        store, hf = random_gpt2_small(work)
        fp32 = measure_generation(store, "float32", hf, batches, new_tokens, not args.no_hf)
        print(f"  float32 GEMM path: {fp32.backend}", flush=True)
        bf16 = measure_generation(store, "bfloat16", hf, [1, 64], new_tokens, not args.no_hf) if amx else None
        if bf16 is not None:
            print(f"  bfloat16 GEMM path: {bf16.backend}", flush=True)
        int8 = measure_generation(store, "auto", hf, [1, 64], new_tokens, False, quantization="int8")
        print(f"  int8 (QUANTIZATION=int8, DTYPE=auto) GEMM path: {int8.backend}", flush=True)
        tok_s, diff, again = measure_scoring(store, hf)
        score = {"tok_s": tok_s, "diff": diff, "again": again}
        print(
            f"  ours float32 scoring {SCORE_SHAPE[0]} x {SCORE_SHAPE[1]}: {tok_s:.1f} tok/s, "
            f"max |d logprob| vs HF {diff:.1e}",
            flush=True,
        )
        reuse = measure_prefix_reuse(store)
        ct = measure_ct2(args.ct2_python, work / "hf", work, new_tokens, threads) if args.ct2_python else None
        ll = measure_llama(args.llama_cpp, hf, work, new_tokens, threads) if args.llama_cpp else None
        runs = rerunners(fp32, bf16, int8, score, ct, ll)
        medians = measure_in_turn(args.rounds, runs, first_pass(fp32, bf16, int8, score, ct, ll))

    print(f"\nGPT-2-small shape, prompt {PROMPT_LEN}, {new_tokens} generated, greedy, ignore_eos, {threads} threads")
    print(
        f"{'dtype':>9} {'batch':>6} {'ours tok/s':>11} {'HF tok/s':>9} {'ours/HF':>8} {'TTFT p50':>9} {'TTFT p95':>9}"
    )
    for run in (fp32, bf16, int8):
        for batch in run.gen if run else ():
            hf_tok_s = run.hf.get(batch)
            ratio = f"{run.gen[batch] / hf_tok_s:.2f}x" if hf_tok_s else "n/a"
            t50, t95 = run.ttft[batch]
            print(
                f"{run.dtype:>9} {batch:>6} {run.gen[batch]:>11.1f} {show(hf_tok_s):>9} {ratio:>8} "
                f"{t50:>8.3f}s {t95:>8.3f}s"
            )
    print(f"\n{machine()}\ngoals (same run, same weights):")
    rows = goals(fp32, bf16, int8, score, reuse, ct, ll, medians)
    print_goals(rows)
    if args.json:
        names = ("name", "ours", "theirs", "ratio", "goal", "met")
        record = {"machine": machine(), "cpu_flags": cpu_flags(), "gemm": fp32.backend}
        record["targets"] = [dict(zip(names, r)) for r in rows]
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
