"""Benchmark the HTTP service under streaming load, beside the hand-written server baseline, in one run.

    .venv/bin/python bench/http_load.py [--quick] [--dtype float32|bfloat16|auto] [--concurrency 64]
                                        [--requests 128] [--new-tokens 128] [--servers ours,naive]
                                        [--naive-python PYTHON] [--before DIR] [--rounds N]

The full measurement (the engine benchmark, bench/engine.py, repeated through HTTP) is the defaults:

    .venv/bin/python bench/http_load.py

and a smoke test (16 clients, 32 requests, 32 generated tokens) is `--quick`. To compare this checkout with
an earlier version of the service in one run, serve both: check the earlier commit out beside this one
(`git worktree add /tmp/before COMMIT`) and run with `--before /tmp/before --servers ours,before --rounds 2`.

One GPT-2-small-shape model with random weights (bench/common.py `random_gpt2_small`, no download) is
served by each server in turn, one at a time, on 127.0.0.1 only:

- ours: `python -m service` (this interpreter) with MODEL=bench from the temporary store, DTYPE=--dtype,
  MAX_NUM_SEQS=64, a KV budget that holds every client's full sequence, NUM_THREADS as this process;
- before: the same, but the service's code from the checkout at --before (run from that directory, with
  this interpreter and its packages);
- naive: bench/naive_server.py (FastAPI, one HF `generate` at a time under a lock, float32) run by
  --naive-python (default: this interpreter) on the same weights saved in HF format, with --threads as this
  process.

With --rounds N every server is started and measured N times, in turn (ours, before, ..., ours, before,
...), so slow drifts of a shared machine fall on all of them; the figures are medians over every pass.

The same load generator (asyncio + httpx, here) drives both: --concurrency clients pull from a fixed list of
--requests requests, each a prompt of 32 random token ids (the same ids for both servers; a different list
per pass, so no pass reuses another's prefix cache) and exactly --new-tokens generated tokens, greedy: ours
gets `POST /v1/completions` with `stream: true`, `ignore_eos`, `min_tokens` = `max_tokens` and
`stream_options.include_usage`; the naive server gets its own `POST /generate {input_ids, max_new_tokens}`,
which forces `min_new_tokens` = `max_new_tokens`. Every response is checked for the exact token count. One
untimed warm-up request per server start, then --repeats timed passes (median reported).

Per server: generated tokens/s (all generated tokens / wall time of the pass), requests/s, time to first
token p50/p95, end-to-end latency p50/p95, errors; then ours/naive and ours/before. TTFT for ours is the arrival of the
first SSE event (it carries the first token); the naive server does not stream, so its "TTFT" is the full
latency, marked as such. The client runs on the same CPUs as the server (it parses every SSE event of
ours), and other processes on a shared machine add noise: the CPU share used by others during each pass is
printed. Bounded: --req-timeout per request, --deadline-s per pass, --start-timeout per server start; the
servers run in their own sessions and are stopped (SIGTERM, then SIGKILL) at the end, also on failure or
Ctrl-C. Not part of the test suite. Named http_load.py, not http.py: Python puts bench/ first on sys.path
for every script in it, and a bench/http.py would shadow the standard library's `http` for them all.
"""

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).resolve().parent.parent)]  # bench/, the repo
from common import machine, random_gpt2_small  # noqa: E402

from reliability.figures import pct  # noqa: E402
from reliability.server import free_port  # noqa: E402

PROMPT_LEN = 32
VOCAB = 50256  # prompt ids in [0, 50256): EOS excluded
REPO = Path(__file__).resolve().parent.parent
NAIVE_SERVER = Path(__file__).resolve().parent / "naive_server.py"
HOST = "127.0.0.1"


# ---- CPU noise: busy CPU time of everything but the server and this process ----------------------------


def _cpu_total_busy() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v[:8]), sum(v[:8]) - (v[3] + v[4])


def _proc_cpu(pid: int) -> int:
    """utime + stime (ticks) of a process, all its threads included; 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


class CpuMeter:
    def __init__(self, server_pid: int) -> None:
        self.pids = (server_pid, os.getpid())

    def __enter__(self) -> "CpuMeter":
        self.t0 = _cpu_total_busy()
        self.p0 = [_proc_cpu(p) for p in self.pids]
        return self

    def __exit__(self, *exc) -> None:
        total, busy = (b - a for a, b in zip(self.t0, _cpu_total_busy()))
        server, client = (_proc_cpu(p) - p0 for p, p0 in zip(self.pids, self.p0))
        total = max(total, 1)
        self.server, self.client = server / total, client / total
        self.others = max(0, busy - server - client) / total


# ---- servers ------------------------------------------------------------------------------------------


class Server:
    """A server subprocess in its own session, its output in a log file; stopped by `stop()`."""

    def __init__(
        self, name: str, cmd: list[str], env: dict[str, str], log: Path, ready_path: str, port: int, cwd: Path
    ) -> None:
        self.name, self.log, self.base = name, log, f"http://{HOST}:{port}"
        self.ready_url = self.base + ready_path
        print(f"  $ {' '.join(cmd)}", flush=True)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                env=env,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float) -> float:
        start = time.perf_counter()
        deadline = start + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} server exited with {self.proc.returncode} while starting\n" + self.log_tail()
                )
            try:
                if httpx.get(self.ready_url, timeout=2).status_code == 200:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} server not ready after {timeout:.0f} s\n" + self.log_tail())

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n".join(f"    | {line}" for line in text)

    def stop(self, grace: float = 15) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        print(f"  {self.name} server (pid {self.proc.pid}) stopped, exit {self.proc.returncode}", flush=True)


def start_ours(
    args: argparse.Namespace, store_root: Path, work: Path, kv_bytes: int, threads: int, name: str = "ours"
) -> Server:
    """`python -m service` from this checkout (`ours`) or from the one at --before (`before`)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("API_KEYS",)}
    env.update(
        HOST=HOST,
        PORT=str(port),
        MODEL="bench",
        MODEL_STORE_ROOT=str(store_root),
        DEVICE="cpu",
        DTYPE=args.dtype,
        MAX_NUM_SEQS="64",
        MAX_NUM_BATCHED_TOKENS="2048",
        KV_CACHE_MEMORY=str(kv_bytes),
        MAX_WAITING_REQUESTS=str(max(256, args.requests)),
        NUM_THREADS=str(threads),
        LOG_LEVEL="info",
        DRAIN_TIMEOUT="5",
    )
    tree = REPO if name == "ours" else Path(args.before).resolve()
    env["PYTHONPATH"] = str(tree)  # that checkout's service, whatever the venv's editable install points at
    return Server(name, [sys.executable, "-m", "service"], env, work / f"{name}.log", "/ready", port, tree)


def start_naive(args: argparse.Namespace, hf_dir: Path, work: Path, threads: int) -> Server:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    cmd = [
        args.naive_python,
        str(Path(args.naive_script).resolve()),
        "--model",
        str(hf_dir),
        "--host",
        HOST,
        "--port",
        str(port),
        "--threads",
        str(threads),
    ]
    return Server("naive", cmd, env, work / "naive.log", "/health", port, Path(args.naive_script).resolve().parent)


# ---- load ---------------------------------------------------------------------------------------------


class Result:
    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.latency: list[float] = []
        self.tokens = 0
        self.errors: list[str] = []


async def request_ours(
    client: httpx.AsyncClient, base: str, prompt: list[int], new_tokens: int, timeout: float
) -> tuple[float, float, int]:
    """One streamed completion; returns (time to first event, latency, completion tokens)."""
    body = {
        "prompt": prompt,
        "max_tokens": new_tokens,
        "min_tokens": new_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = None
    buf = bytearray()
    async with client.stream("POST", base + "/v1/completions", json=body, timeout=timeout) as r:
        if r.status_code != 200:
            await r.aread()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        async for data in r.aiter_bytes():
            if first is None and data:
                first = time.perf_counter() - start
            buf += data
    latency = time.perf_counter() - start
    events = [e.removeprefix("data: ") for e in buf.decode().split("\n\n") if e.strip()]
    if not events or events[-1] != "[DONE]":
        raise RuntimeError(f"stream did not end with [DONE]: {events[-1:]!r}")
    chunks = [json.loads(e) for e in events[:-1]]
    errors = [c for c in chunks if "error" in c]
    if errors:
        raise RuntimeError(f"error event: {errors[0]}")
    if not chunks[0].get("choices"):
        raise RuntimeError(f"first event carries no token: {chunks[0]}")
    usage = chunks[-1].get("usage") or {}
    n = usage.get("completion_tokens")
    if n != new_tokens:
        raise RuntimeError(f"{n} completion tokens, expected {new_tokens}")
    return first, latency, n


async def request_naive(
    client: httpx.AsyncClient, base: str, prompt: list[int], new_tokens: int, timeout: float
) -> tuple[float, float, int]:
    """One /generate; it does not stream, so the "time to first token" is the full latency."""
    start = time.perf_counter()
    r = await client.post(base + "/generate", json={"input_ids": prompt, "max_new_tokens": new_tokens}, timeout=timeout)
    latency = time.perf_counter() - start
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
    n = r.json()["n_new"]
    if n != new_tokens:
        raise RuntimeError(f"{n} new tokens, expected {new_tokens}")
    return latency, latency, n


async def one_pass(send, base: str, prompts: list[list[int]], args: argparse.Namespace) -> tuple[float, Result]:
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    res = Result()
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)

    async with httpx.AsyncClient(limits=limits) as client:

        async def worker() -> None:
            while True:
                try:
                    p = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                try:
                    ttft, latency, n = await send(client, base, p, args.new_tokens, args.req_timeout)
                except Exception as exc:  # record it and go on
                    res.errors.append(f"{type(exc).__name__}: {exc}"[:300])
                    continue
                res.ttft.append(ttft)
                res.latency.append(latency)
                res.tokens += n

        start = time.perf_counter()
        workers = [asyncio.ensure_future(worker()) for _ in range(args.concurrency)]
        try:
            await asyncio.wait_for(asyncio.gather(*workers), timeout=args.deadline_s)
        except TimeoutError:
            res.errors.append(f"pass deadline {args.deadline_s:.0f} s reached; {queue.qsize()} requests not sent")
        wall = time.perf_counter() - start
    return wall, res


def measure(
    server: Server, send, passes: list[list[list[int]]], warmup: list[int], args: argparse.Namespace
) -> list[dict]:
    async def warm() -> None:
        async with httpx.AsyncClient() as client:
            await send(client, server.base, warmup, args.new_tokens, args.req_timeout)

    t0 = time.perf_counter()
    asyncio.run(warm())
    print(f"  warm-up request: {time.perf_counter() - t0:.1f} s", flush=True)
    records = []
    for i, prompts in enumerate(passes):
        with CpuMeter(server.proc.pid) as cpu:
            wall, res = asyncio.run(one_pass(send, server.base, prompts, args))
        ok = len(res.latency)
        rec = {
            "wall_s": wall,
            "ok": ok,
            "errors": len(res.errors),
            "tok_s": res.tokens / wall,
            "req_s": ok / wall,
            "ttft_p50": pct(res.ttft, 50),
            "ttft_p95": pct(res.ttft, 95),
            "lat_p50": pct(res.latency, 50),
            "lat_p95": pct(res.latency, 95),
            "cpu_server": cpu.server,
            "cpu_client": cpu.client,
            "cpu_others": cpu.others,
        }
        records.append(rec)
        print(
            f"  pass {i}: {ok} ok / {len(res.errors)} errors in {wall:.1f} s | {rec['tok_s']:.1f} gen tok/s | "
            f"{rec['req_s']:.2f} req/s | TTFT p50 {rec['ttft_p50']:.2f} s p95 {rec['ttft_p95']:.2f} s | "
            f"latency p50 {rec['lat_p50']:.2f} s p95 {rec['lat_p95']:.2f} s | CPU share: server "
            f"{cpu.server:.0%}, client {cpu.client:.0%}, others {cpu.others:.0%}",
            flush=True,
        )
        for err in res.errors[:3]:
            print(f"    error: {err}", flush=True)
    return records


def summary(records: list[dict]) -> dict:
    out = {k: statistics.median(r[k] for r in records) for k in records[0] if k != "errors"}
    out["errors"] = sum(r["errors"] for r in records)
    return out


def baseline_versions(python: str) -> str:
    code = "import torch, transformers; print(f'torch {torch.__version__}, transformers {transformers.__version__}')"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    try:
        out = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        return out.stdout.strip() or out.stderr.strip()[-200:]
    except (OSError, subprocess.TimeoutExpired) as exc:
        return repr(exc)


def serve_and_measure(
    name: str, args: argparse.Namespace, store_root: Path, work: Path, kv_bytes: int, threads: int, passes, warmup
) -> list[dict] | None:
    """Start one server, measure its passes, stop it; None (and its log's tail) if it failed."""
    server = None
    try:
        if name == "naive":
            server, send = start_naive(args, work / "hf", work, threads), request_naive
        else:
            server, send = start_ours(args, store_root, work, kv_bytes, threads, name), request_ours
        print(f"  ready after {server.wait_ready(args.start_timeout):.1f} s", flush=True)
        if name != "naive":
            info = httpx.get(server.base + "/v1/models", timeout=10).json()["data"][0]
            print(
                f"  serving {info.get('id')} dtype {info.get('dtype')}, KV budget {kv_bytes / 2**20:.0f} MiB",
                flush=True,
            )
        return measure(server, send, passes, warmup, args)
    except Exception as exc:
        print(f"  {name} FAILED: {exc}", flush=True)
        if server is not None:
            print(server.log_tail(), flush=True)
        return None
    finally:
        if server is not None:
            server.stop()


def _commit(tree: Path) -> str:
    done = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    )
    return (done.stdout.strip() or "?") + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 16 clients, 32 requests, 32 new tokens")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "auto"),
        help="ours (the naive server is always float32)",
    )
    parser.add_argument("--concurrency", type=int, default=None, help="concurrent streaming clients (default 64)")
    parser.add_argument("--requests", type=int, default=None, help="requests per pass (default 128)")
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens per request (default 128)")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes per server (median reported)")
    parser.add_argument("--servers", default="ours,naive", help="which to run, in order: ours, before, naive")
    parser.add_argument("--before", default=None, help="another checkout of this repository, served as `before`")
    parser.add_argument("--rounds", type=int, default=1, help="start and measure every server this many times")
    parser.add_argument("--naive-python", default=sys.executable, help="python for naive_server.py (default: this)")
    parser.add_argument("--naive-script", default=str(NAIVE_SERVER))
    parser.add_argument("--req-timeout", type=float, default=2400, help="seconds per request")
    parser.add_argument("--deadline-s", type=float, default=3600, help="seconds per timed pass")
    parser.add_argument("--start-timeout", type=float, default=300, help="seconds for a server to become ready")
    parser.add_argument("--json", default=None, help="append the per-server summaries as JSON lines here")
    args = parser.parse_args()
    quick = dict(concurrency=16, requests=32, new_tokens=32) if args.quick else {}
    full = dict(concurrency=64, requests=128, new_tokens=128)
    for k, v in full.items():
        if getattr(args, k) is None:
            setattr(args, k, quick.get(k, v))
    servers = [s for s in args.servers.split(",") if s]
    if not servers or set(servers) - {"ours", "before", "naive"} or len(set(servers)) < len(servers):
        parser.error("--servers takes a comma-separated list of ours, before and naive")
    if "naive" in servers and not Path(args.naive_script).is_file():
        parser.error(f"no naive server script at {args.naive_script}")
    if "before" in servers and not (args.before and (Path(args.before) / "service" / "__main__.py").is_file()):
        parser.error("--servers before needs --before DIR, a checkout of this repository")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the servers

    threads = torch.get_num_threads()
    print(machine())
    print(
        f"GPT-2-small shape, random weights; {args.concurrency} concurrent streaming clients, {args.requests} "
        f"requests per pass x {args.repeats} pass(es) x {args.rounds} round(s), prompt {PROMPT_LEN} token ids, "
        f"{args.new_tokens} generated (forced), greedy; ours DTYPE={args.dtype}, naive float32; {threads} threads each",
        flush=True,
    )
    if "naive" in servers:
        print(f"naive server python: {args.naive_python} ({baseline_versions(args.naive_python)})", flush=True)
    if "before" in servers:
        print(f"before: {Path(args.before).resolve()} at {_commit(Path(args.before))}; ours at {_commit(REPO)}")

    gen = torch.Generator().manual_seed(1)

    def prompts(n: int) -> list[list[int]]:
        return torch.randint(0, VOCAB, (n, PROMPT_LEN), generator=gen).tolist()

    warmup = prompts(1)[0]
    passes = [prompts(args.requests) for _ in range(args.repeats)]
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        work = Path(tmp)
        store, hf = random_gpt2_small(work)
        bytes_per_token = 2 * hf.config.n_layer * hf.config.n_embd * 4  # float32: an upper bound
        del hf
        kv_tokens = max(args.concurrency, 64) * (PROMPT_LEN + args.new_tokens) + 2048
        kv_bytes = int(kv_tokens * bytes_per_token * 1.25)
        records: dict[str, list[dict]] = {}
        broken: set[str] = set()  # servers that failed in some round
        for round_ in range(args.rounds):
            for name in servers:
                print(f"\n{name}" + (f", round {round_ + 1}" if args.rounds > 1 else ""), flush=True)
                got = serve_and_measure(name, args, store.root, work, kv_bytes, threads, passes, warmup)
                if got is None:
                    broken.add(name)
                else:
                    records.setdefault(name, []).extend(got)
        results = {name: summary(records[name]) for name in servers if name in records}

    print(
        f"\n{args.concurrency} concurrent clients, {args.requests} requests x {args.repeats} pass(es), prompt "
        f"{PROMPT_LEN}, {args.new_tokens} generated; medians over passes"
    )
    header = (
        "server",
        "gen tok/s",
        "req/s",
        "TTFT p50 s",
        "TTFT p95 s",
        "e2e p50 s",
        "e2e p95 s",
        "errors",
        "others' CPU",
    )
    print(f"{header[0]:<7}" + "".join(f"{h:>12}" for h in header[1:]))
    for name, r in results.items():
        cells = [
            f"{r['tok_s']:.1f}",
            f"{r['req_s']:.2f}",
            f"{r['ttft_p50']:.2f}",
            f"{r['ttft_p95']:.2f}",
            f"{r['lat_p50']:.2f}",
            f"{r['lat_p95']:.2f}",
            str(r["errors"]),
            f"{r['cpu_others']:.0%}",
        ]
        print(f"{name:<7}" + "".join(f"{c:>12}" for c in cells))
        if args.json:
            with open(args.json, "a") as f:
                f.write(
                    json.dumps(
                        {
                            "server": name,
                            "dtype": "float32" if name == "naive" else args.dtype,
                            "concurrency": args.concurrency,
                            "requests": args.requests,
                            "new_tokens": args.new_tokens,
                            "prompt_len": PROMPT_LEN,
                            **r,
                        }
                    )
                    + "\n"
                )
    if "naive" in results:
        print("naive: no streaming, so its TTFT is the full request latency")
    for other in ("before", "naive"):
        if {"ours", other} <= results.keys():
            o, t = results["ours"], results[other]
            print(
                f"ours/{other}: generated tok/s {o['tok_s'] / t['tok_s']:.2f}x, req/s {o['req_s'] / t['req_s']:.2f}x; "
                f"TTFT p50 {o['ttft_p50']:.2f} s vs {t['ttft_p50']:.2f} s, e2e latency p50 {o['lat_p50']:.2f} s "
                f"vs {t['lat_p50']:.2f} s"
            )
    failed = [s for s in servers if s in broken or s not in results or results[s]["errors"]]
    if failed:
        print(f"FAILED or with errors: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
