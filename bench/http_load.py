"""Benchmark the HTTP service under streaming load, beside its own engine called directly and llama.cpp's
server, in one run, and check the serving goals.

    make baselines                      # once per machine: builds llama-server too (build/llama-cpp)
    .venv/bin/python bench/http_load.py --llama-cpp build/llama-cpp [--concurrency 1,16,64,256]
                                        [--rounds 2] [--new-tokens 128] [--servers ours,engine,llama]
                                        [--dtype float32] [--json PATH] [--quick]

One GPT-2-small-shape model with random weights and a GPT-2-sized byte-level vocabulary (bench/common.py,
no download) is measured, one system at a time, on 127.0.0.1 only, under the same closed-loop load at each
--concurrency level: that many clients pull from a list of requests (8 at 1 client, twice the clients up to
64, one per client beyond; --requests overrides), each a prompt of 32 random token ids and exactly
--new-tokens generated tokens, greedy, ignore_eos, streamed; a different list per level and round (no
prefix cache helps), the same lists for every system. Every response is checked for its token count.

- ours: `python -m service` (this interpreter) with DTYPE=--dtype, MAX_NUM_SEQS = max(64, clients), a KV
  budget that holds every client's sequence, NUM_THREADS as this process; `POST /v1/completions` with
  `stream`, `ignore_eos`, `min_tokens` = `max_tokens` and `stream_options.include_usage`;
- engine: the same model and engine configuration (built from the same settings by ServiceConfig), called
  directly in this process with the same closed loop: what the service would do without HTTP. At 1 client
  the two take the requests in turn, one each, on one server start and one engine (the server idles while
  the engine runs, and the other way round): this machine's slow spells last seconds to minutes and would
  otherwise fall on one of them;
- llama: `llama-server` (bench/llama_cpp.py builds it) on the same weights as GGUF f32, `-np` = the clients,
  `--cont-batching`, the same threads; its `POST /v1/completions` with the same body;
- before (optional, --before DIR): ours from another checkout, for A/B runs of a change;
- naive (optional): bench/naive_server.py, one HF `generate` at a time (it does not stream: its TTFT is its
  latency).

Per system and level: generated tokens/s (all generated tokens / wall time of the pass), time to first
token p50/p95 (first SSE event carrying a token), inter-token time p50/p95 (between a stream's successive
token events), time per output token (each request's (latency - TTFT) / (tokens - 1), median), errors,
and the CPU share others used meanwhile. With --rounds N every level is measured N times, the systems in
another order each round, a fresh server each time, and the figures are medians over rounds.

Then the burst: 100 requests at once against ours with MAX_NUM_SEQS=4 and MAX_WAITING_REQUESTS=8 while it
generates, each on a connection opened beforehand, written by a client of raw asyncio streams (httpx itself
needs ~100 ms for 100 concurrent requests here); every refusal must be a 429 with Retry-After, and its
latency from the client's side is reported (p50, p95).

Then the goals table (ours, theirs, ratio, goal, met); --json writes `{"machine": ..., "results": [...],
"burst": {...}, "targets": [{"name", "ours", "theirs", "ratio", "goal", "met"}]}`. The client runs on the
same CPUs as the servers; its share and others' are printed per pass. Bounded: --req-timeout per request,
--deadline-s per pass, --start-timeout per server start; servers run in their own sessions and are stopped
(SIGTERM, then SIGKILL) at the end, also on failure or Ctrl-C. Not part of the test suite. Named
http_load.py, not http.py: Python puts bench/ first on sys.path for every script in it, and a bench/http.py
would shadow the standard library's `http` for them all.
"""

import argparse
import asyncio
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
import uvloop

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).resolve().parent.parent)]  # bench/, the repo
import llama_cpp  # noqa: E402
from common import cpu_flags, machine, random_gpt2_small  # noqa: E402

from model_store import ModelStore  # noqa: E402
from reliability.figures import pct  # noqa: E402
from reliability.server import free_port  # noqa: E402
from service.config import ServiceConfig  # noqa: E402
from service.engine import Engine, EngineRequest, SamplingParams  # noqa: E402
from service.model import load_model  # noqa: E402

PROMPT_LEN = 32
VOCAB = 50256  # prompt ids in [0, 50256): EOS excluded
REPO = Path(__file__).resolve().parent.parent
NAIVE_SERVER = Path(__file__).resolve().parent / "naive_server.py"
HOST = "127.0.0.1"
BURST = dict(requests=100, max_num_seqs=4, max_waiting=8)


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

    def stop(self, grace: float = 15, quiet: bool = False) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        if not quiet:
            print(f"  {self.name} server (pid {self.proc.pid}) stopped, exit {self.proc.returncode}", flush=True)


def ours_settings(args: argparse.Namespace, clients: int, store_root: Path, threads: int, **overrides) -> dict:
    """The service's settings for `clients` streams: what ours runs with and what `engine` is built from."""
    kv_tokens = max(clients, 64) * (PROMPT_LEN + args.new_tokens) + 2048
    kv_bytes = int(kv_tokens * args.kv_bytes_per_token * 1.25)
    settings = dict(
        MODEL="bench",
        MODEL_STORE_ROOT=str(store_root),
        DEVICE="cpu",
        DTYPE=args.dtype,
        MAX_NUM_SEQS=str(max(64, clients)),
        MAX_NUM_BATCHED_TOKENS="2048",
        KV_CACHE_MEMORY=str(kv_bytes),
        MAX_WAITING_REQUESTS=str(max(256, 2 * clients)),
        NUM_THREADS=str(threads),
    )
    return {**settings, **{k: str(v) for k, v in overrides.items()}}


def start_ours(args: argparse.Namespace, settings: dict, work: Path, name: str = "ours") -> Server:
    """`python -m service` from this checkout (`ours`) or from the one at --before (`before`)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("API_KEYS",)}
    env.update(settings, HOST=HOST, PORT=str(port), LOG_LEVEL="warning", DRAIN_TIMEOUT="5")
    tree = REPO if name == "ours" else Path(args.before).resolve()
    env["PYTHONPATH"] = str(tree)  # that checkout's service, whatever the venv's editable install points at
    return Server(name, [sys.executable, "-m", "service"], env, work / f"{name}.log", "/ready", port, tree)


def start_llama(args: argparse.Namespace, gguf: Path, work: Path, clients: int, threads: int) -> Server:
    port = free_port()
    cmd = llama_cpp.serve_command(
        Path(args.llama_cpp).resolve(), gguf, HOST, port, clients, PROMPT_LEN + args.new_tokens + 16, threads
    )
    return Server("llama", cmd, dict(os.environ), work / "llama.log", "/health", port, work)


def start_naive(args: argparse.Namespace, hf_dir: Path, work: Path, threads: int) -> Server:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    cmd = [args.naive_python, str(NAIVE_SERVER), "--model", str(hf_dir), "--host", HOST, "--port", str(port)]
    return Server("naive", cmd + ["--threads", str(threads)], env, work / "naive.log", "/health", port, work)


# ---- load ---------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """One request's figures: time to first token, latency, tokens, and the gaps between token events."""

    ttft: float
    latency: float
    tokens: int
    gaps: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float:
        return (self.latency - self.ttft) / max(self.tokens - 1, 1)


def completion_body(prompt: list[int], new_tokens: int) -> dict:
    return {
        "prompt": prompt,
        "max_tokens": new_tokens,
        "min_tokens": new_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


class StaleConnection(Exception):
    """A kept-alive connection the server had closed: nothing of the response came; sent again once."""


class _Reception(asyncio.Protocol):
    """The bytes of one kept-alive connection, framed as they arrive (status line and headers, then either
    a sized body or chunks split into SSE events, each with its arrival time) and nothing more. The event
    loop calls `data_received` with what one read returned: no stream reader, future or task wakes per
    chunk. Everything else is parsed once the response has ended."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.begin()

    def begin(self) -> None:
        self.buffer = bytearray()
        self.status, self.headers, self.chunked, self.length = 0, {}, False, 0
        self.arrivals: list[tuple[float, bytes]] = []
        self.pending = b""
        self.sized = b""
        self.received = False
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.done.done():
            self.done.set_exception(exc or ConnectionResetError("the server closed the connection"))

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.received = True
        self.buffer += data
        if not self.status:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buffer[:end].decode("latin-1").lower().split("\r\n")
            del self.buffer[: end + 4]
            self.status = int(lines[0].split()[1])
            self.headers = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            self.chunked = self.headers.get("transfer-encoding") == "chunked"
            self.length = int(self.headers.get("content-length", 0))
        if self.chunked:
            self._chunks(now)
        elif len(self.buffer) >= self.length:
            self.sized = bytes(self.buffer[: self.length])
            self._finish()

    def _chunks(self, now: float) -> None:
        buffer, at = self.buffer, 0
        while True:
            line_end = buffer.find(b"\r\n", at)
            if line_end < 0:
                break
            size = int(buffer[at:line_end].split(b";")[0], 16)
            if len(buffer) < line_end + 2 + size + 2:
                break
            data = bytes(buffer[line_end + 2 : line_end + 2 + size])
            at = line_end + 2 + size + 2
            if not size:  # the last chunk (no trailers)
                del buffer[:at]
                self._finish()
                return
            *events, self.pending = (self.pending + data).split(b"\n\n")
            self.arrivals += [(now, e) for e in events if e.strip()]
        del buffer[:at]

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class RawConnection:
    """One kept-alive HTTP/1.1 connection of the load generator: a request written whole, the response's
    bytes framed by an asyncio protocol as they come (`_Reception`). With httpx the load generator took 2-5 %
    of the two cores under these loads; with asyncio streams ~140 us per SSE event at 1 client (2-core Zen 5
    EPYC), about 1.5 % of a 9 ms token; with the protocol less. What it takes, it takes from the server under
    test, and the engine called directly pays nothing of it."""

    def __init__(self, base: str) -> None:
        self.host, port = base.removeprefix("http://").split(":")
        self.port = int(port)
        self.reception: _Reception | None = None

    async def post(self, path: str, payload: dict) -> tuple[int, list[tuple[float, bytes]], bytes]:
        """(status, [(arrival, SSE event)] of a chunked response, body of a sized one)."""
        reused = self.reception is not None and not self.reception.lost
        if reused:
            self.reception.begin()
        else:
            self.close()
            loop = asyncio.get_running_loop()
            _, self.reception = await loop.create_connection(_Reception, self.host, self.port)
        reception = self.reception
        body = json.dumps(payload).encode()
        head = f"POST {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: application/json\r\n"
        reception.transport.write(head.encode() + f"content-length: {len(body)}\r\n\r\n".encode() + body)
        try:
            await reception.done
        except ConnectionError as exc:
            received = reception.received
            self.close()
            if reused and not received:
                raise StaleConnection() from exc
            raise
        if reception.headers.get("connection") == "close":
            self.close()
        return reception.status, reception.arrivals, reception.sized

    def close(self) -> None:
        if self.reception is not None and self.reception.transport is not None:
            self.reception.transport.close()
        self.reception = None


def run_client(coro):
    """Run the load generator on uvloop (the service's own event loop): its per-event work is C, not the
    Python of asyncio's loop, which is time taken from the server under test."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


async def request_stream(conn: RawConnection, prompt: list[int], args) -> Timing:
    """One streamed `/v1/completions` (ours or llama-server): each SSE event's arrival time, the events
    parsed after the response ends; the usage's completion tokens (or, without usage, the token events)
    must be exactly --new-tokens."""
    start = time.perf_counter()
    status, arrivals, sized = await conn.post("/v1/completions", completion_body(prompt, args.new_tokens))
    latency = time.perf_counter() - start
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {(sized or b''.join(e for _, e in arrivals))[:200]!r}")
    if not arrivals or arrivals[-1][1].strip() != b"data: [DONE]":
        raise RuntimeError(f"stream did not end with [DONE]: {arrivals[-1:]!r}")
    token_times, usage = [], None
    for at, event in arrivals[:-1]:
        chunk = json.loads(event.removeprefix(b"data: "))
        if "error" in chunk:
            raise RuntimeError(f"error event: {chunk}")
        usage = chunk.get("usage") or usage
        if any(c.get("text") for c in chunk.get("choices") or ()):
            token_times.append(at)
    n = usage["completion_tokens"] if usage else len(token_times)
    if n != args.new_tokens or not token_times:
        raise RuntimeError(f"{n} completion tokens ({len(token_times)} token events), expected {args.new_tokens}")
    gaps = [b - a for a, b in zip(token_times, token_times[1:])]
    return Timing(token_times[0] - start, latency, n, gaps)


async def request_naive(conn: RawConnection, prompt: list[int], args) -> Timing:
    """One /generate; it does not stream, so the "time to first token" is the full latency."""
    start = time.perf_counter()
    status, _, body = await conn.post("/generate", {"input_ids": prompt, "max_new_tokens": args.new_tokens})
    latency = time.perf_counter() - start
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
    n = json.loads(body)["n_new"]
    if n != args.new_tokens:
        raise RuntimeError(f"{n} new tokens, expected {args.new_tokens}")
    return Timing(latency, latency, n)


async def closed_loop(send, base: str, prompts: list[list[int]], clients: int, args) -> tuple[float, list, list]:
    """`clients` workers, a connection each, pull from `prompts` until it is empty; (wall time, timings,
    errors). A request that finds its kept-alive connection closed by the server (llama-server closes idle
    ones) is sent again once on a new connection, as browsers do."""
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    timings, errors = [], []

    async def worker() -> None:
        conn = RawConnection(base)
        try:
            while not queue.empty():
                prompt = queue.get_nowait()
                for attempt in (0, 1):
                    try:
                        timings.append(await asyncio.wait_for(send(conn, prompt, args), args.req_timeout))
                    except StaleConnection:
                        if attempt == 0:
                            continue
                        errors.append("the server closed the connection twice without a response")
                    except Exception as exc:  # record it and go on, on a new connection
                        conn.close()
                        errors.append(f"{type(exc).__name__}: {exc}"[:300])
                    break
        finally:
            conn.close()

    start = time.perf_counter()
    workers = [asyncio.ensure_future(worker()) for _ in range(clients)]
    try:
        await asyncio.wait_for(asyncio.gather(*workers), timeout=args.deadline_s)
    except TimeoutError:
        errors.append(f"pass deadline {args.deadline_s:.0f} s reached; {queue.qsize()} requests not sent")
    wall = time.perf_counter() - start
    return wall, timings, errors


def engine_loop(engine: Engine, prompts: list[list[int]], clients: int, new_tokens: int) -> tuple[float, list]:
    """The same closed loop on the engine called directly: `clients` requests in flight, the next one added
    (before the next step) as one finishes; each request's times taken when its step's outputs return."""
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)
    todo = list(enumerate(prompts))[::-1]
    added: dict[str, float] = {}
    token_times: dict[str, list[float]] = {}
    timings = []

    def add() -> None:
        i, prompt = todo.pop()
        rid = f"r{i}"
        added[rid] = time.perf_counter()
        token_times[rid] = []
        engine.add(EngineRequest(rid, prompt, params))

    start = time.perf_counter()
    for _ in range(min(clients, len(todo))):
        add()
    while engine.has_work:
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            token_times[out.request_id] += [now] * len(out.token_ids)
            if out.finished:
                times = token_times.pop(out.request_id)
                t0 = added.pop(out.request_id)
                gaps = [b - a for a, b in zip(times, times[1:]) if b > a]
                timings.append(Timing(times[0] - t0, now - t0, len(times), gaps))
                if todo:
                    add()
    wall = time.perf_counter() - start
    assert all(t.tokens == new_tokens for t in timings) and len(timings) == len(prompts)
    return wall, timings


def record(system: str, clients: int, wall: float, timings: list[Timing], errors: list[str], cpu=None) -> dict:
    gaps = [g for t in timings for g in t.gaps]
    rec = {
        "system": system,
        "clients": clients,
        "wall_s": wall,
        "ok": len(timings),
        "errors": len(errors),
        "tok_s": sum(t.tokens for t in timings) / wall,
        "ttft_p50": pct([t.ttft for t in timings], 50),
        "ttft_p95": pct([t.ttft for t in timings], 95),
        "itl_p50": pct(gaps, 50),
        "itl_p95": pct(gaps, 95),
        "tpot": statistics.median(t.tpot for t in timings) if timings else float("nan"),
        "cpu_client": cpu.client if cpu else None,
        "cpu_others": cpu.others if cpu else None,
    }
    share = f" | CPU: client {cpu.client:.0%}, others {cpu.others:.0%}" if cpu else ""
    print(
        f"  {system} x{clients}: {len(timings)} ok / {len(errors)} errors in {wall:.1f} s | {rec['tok_s']:.1f} tok/s "
        f"| TTFT p50 {rec['ttft_p50']:.3f} s p95 {rec['ttft_p95']:.3f} s | inter-token p50 "
        f"{rec['itl_p50'] * 1e3:.1f} ms p95 {rec['itl_p95'] * 1e3:.1f} ms | TPOT {rec['tpot'] * 1e3:.1f} ms{share}",
        flush=True,
    )
    for err in errors[:3]:
        print(f"    error: {err}", flush=True)
    return rec


@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    store_root: Path
    threads: int
    gguf: Path | None = None

    def run(self, system: str, clients: int, prompts: list[list[int]], warmup: list[int]) -> dict | None:
        """One system at one level: start it, warm it up with one request, one timed pass, stop it. None
        (and the log's tail) if it failed to start or to warm up."""
        if system == "engine":
            return self.run_engine(clients, prompts, warmup)
        settings = ours_settings(self.args, clients, self.store_root, self.threads)
        server, send = None, request_stream
        try:
            if system in ("ours", "before"):
                server = start_ours(self.args, settings, self.work, system)
            elif system == "llama":
                server = start_llama(self.args, self.gguf, self.work, clients, self.threads)
            else:
                server, send = start_naive(self.args, self.work / "hf", self.work, self.threads), request_naive
            server.wait_ready(self.args.start_timeout)
            run_client(closed_loop(send, server.base, [warmup], 1, self.args))
            with CpuMeter(server.proc.pid) as cpu:
                wall, timings, errors = run_client(closed_loop(send, server.base, prompts, clients, self.args))
            return record(system, clients, wall, timings, errors, cpu)
        except Exception as exc:
            print(f"  {system} FAILED: {exc}", flush=True)
            if server is not None:
                print(server.log_tail(), flush=True)
            return None
        finally:
            if server is not None:
                server.stop(quiet=True)

    def engine(self, clients: int, warmup: list[int]) -> Engine:
        """The engine as ours builds it for this level, in this process, warmed up."""
        config = ServiceConfig.from_env(ours_settings(self.args, clients, self.store_root, self.threads))
        loaded = load_model(ModelStore(self.store_root), config.model, dtype=config.dtype)
        engine = Engine(loaded, config.engine_config(loaded.model.cfg.n_positions))
        engine_loop(engine, [warmup], 1, self.args.new_tokens)
        return engine

    def run_engine(self, clients: int, prompts: list[list[int]], warmup: list[int]) -> dict:
        engine = self.engine(clients, warmup)
        wall, timings = engine_loop(engine, prompts, clients, self.args.new_tokens)
        del engine
        gc.collect()
        return record("engine", clients, wall, timings, [])

    def run_alternating(self, prompts: list[list[int]], warmup: list[int], engine_first: bool) -> dict:
        """1 client: ours and the engine called directly take the requests in turn, one each (the server idles
        while the engine runs in this process, and the other way round), so that the machine's slow spells,
        which last seconds to minutes here, fall on both; each system's figures are over its own requests.
        {"ours": record or None, "engine": record}."""
        settings = ours_settings(self.args, 1, self.store_root, self.threads)
        server = start_ours(self.args, settings, self.work, "ours")
        try:
            server.wait_ready(self.args.start_timeout)
            run_client(closed_loop(request_stream, server.base, [warmup], 1, self.args))
            engine = self.engine(1, warmup)
            got: dict[str, list] = {"ours": [0.0, [], []], "engine": [0.0, [], []]}  # wall, timings, errors
            for prompt in prompts:
                for system in ("engine", "ours") if engine_first else ("ours", "engine"):
                    if system == "ours":
                        wall, timings, errors = run_client(
                            closed_loop(request_stream, server.base, [prompt], 1, self.args)
                        )
                    else:
                        (wall, timings), errors = engine_loop(engine, [prompt], 1, self.args.new_tokens), []
                    got[system][0] += wall
                    got[system][1] += timings
                    got[system][2] += errors
            del engine
            gc.collect()
            return {system: record(system, 1, *got[system]) for system in ("ours", "engine")}
        except Exception as exc:
            print(f"  ours FAILED: {exc}", flush=True)
            print(server.log_tail(), flush=True)
            return {"ours": None, "engine": None}
        finally:
            server.stop(quiet=True)

    def burst(self) -> dict:
        """100 requests at once past the queue limit while the engine generates: each refusal's latency."""
        settings = ours_settings(
            self.args, 4, self.store_root, self.threads, MAX_NUM_SEQS=BURST["max_num_seqs"],
            MAX_WAITING_REQUESTS=BURST["max_waiting"],
        )  # fmt: skip
        server = start_ours(self.args, settings, self.work, "ours")
        try:
            server.wait_ready(self.args.start_timeout)
            return run_client(burst_refusals(server.base, self.args))
        finally:
            server.stop(quiet=True)


async def burst_refusals(base: str, args: argparse.Namespace) -> dict:
    """The burst: every request written at once on its own connection, opened beforehand (as a proxy's pool
    keeps them), by a client of raw asyncio streams, so that what is timed is the server's answer rather
    than TCP setup or an HTTP client's own cost (httpx: ~100 ms p95 for 100 concurrent GET /health here);
    after one unmeasured burst (a fresh server's first-time paths)."""
    host, port = base.removeprefix("http://").split(":")
    gen = torch.Generator().manual_seed(7)

    async def one(reader, writer, request: bytes) -> tuple[int, float, bool]:
        start = time.perf_counter()
        writer.write(request)
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        length = int(head.split("content-length:")[1].split("\r\n")[0]) if "content-length:" in head else 0
        body = await reader.readexactly(length)
        took = time.perf_counter() - start
        status = int(head.split()[1])
        return status, took, status != 429 or ("retry-after:" in head and b'"error"' in body)

    for _ in range(2):  # the first unmeasured
        conns = [await asyncio.open_connection(host, int(port)) for _ in range(BURST["requests"])]
        requests = []
        for prompt in torch.randint(0, VOCAB, (BURST["requests"], PROMPT_LEN), generator=gen).tolist():
            body = json.dumps({**completion_body(prompt, args.new_tokens), "stream": False}).encode()
            head = f"POST /v1/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
            requests.append(head.encode() + f"content-length: {len(body)}\r\n\r\n".encode() + body)
        results = await asyncio.gather(*(one(r, w, q) for (r, w), q in zip(conns, requests)))
        for _, writer in conns:
            writer.close()
    refused = [(took, ok) for status, took, ok in results if status == 429]
    return {
        "requests": len(results),
        "ok": sum(1 for status, _, _ in results if status == 200),
        "refused": len(refused),
        "other": sum(1 for status, _, _ in results if status not in (200, 429)),
        "retry_after_all": all(ok for _, ok in refused),
        "p50": pct([took for took, _ in refused], 50),
        "p95": pct([took for took, _ in refused], 95),
    }


# ---- goals ----------------------------------------------------------------------------------------------


def goals(med: Callable[[str, int, str], float], burst_result: dict | None, errors: Callable[[str, int], int]) -> list:
    rows = []

    def row(name, ours, theirs, goal, met_if):
        ratio = ours / theirs if ours == ours and theirs == theirs and theirs else float("nan")
        rows.append({"name": name, "ours": ours, "theirs": theirs, "ratio": ratio, "goal": goal, "met": met_if(ratio)})

    nan = float("nan")
    row("64 clients: tok/s, ours / engine direct", med("ours", 64, "tok_s"), med("engine", 64, "tok_s"), ">= 0.9",
        lambda r: r >= 0.9)  # fmt: skip
    for c in (64, 256):
        row(f"{c} clients: tok/s, ours / llama-server", med("ours", c, "tok_s"), med("llama", c, "tok_s"), ">= 1.3",
            lambda r: r >= 1.3)  # fmt: skip
        row(f"{c} clients: TTFT p50 s, ours / llama-server", med("ours", c, "ttft_p50"), med("llama", c, "ttft_p50"),
            "<= 1.0", lambda r: r <= 1.0)  # fmt: skip
        errs = errors("ours", c)
        if med("ours", c, "tok_s") == med("ours", c, "tok_s"):  # measured at this level
            row(f"{c} clients: errors (ours)", errs, nan, "0", lambda r, e=errs: e == 0)
    row("1 client: time per output token ms, ours / engine", med("ours", 1, "tpot") * 1e3,
        med("engine", 1, "tpot") * 1e3, "<= 1.05", lambda r: r <= 1.05)  # fmt: skip
    if burst_result is not None:
        b = burst_result
        every = b["refused"] > 0 and b["other"] == 0 and b["retry_after_all"]
        row("burst: refusals are 429 + Retry-After", b["refused"], nan, "all", lambda r: every)
        row("burst: refusal p95 ms", b["p95"] * 1e3, nan, "<= 100", lambda r: b["p95"] <= 0.1)
    return [r for r in rows if r["ours"] == r["ours"]]  # a goal whose figure was not measured is left out


def show(value, digits: str = ".2f") -> str:
    return "n/a" if value is None or value != value else format(value, digits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 and 16 clients, 32 new tokens")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "auto"), help="ours and engine")
    parser.add_argument("--concurrency", default=None, help="client counts, comma-separated (default 1,16,64,256)")
    parser.add_argument("--requests", type=int, default=None, help="requests per pass (default: 8 or 2x clients)")
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens per request (default 128)")
    parser.add_argument("--servers", default="ours,engine,llama", help="of ours, engine, llama, before, naive")
    parser.add_argument("--llama-cpp", default=None, help="llama.cpp's binaries (bench/llama_cpp.py build)")
    parser.add_argument("--before", default=None, help="another checkout of this repository, served as `before`")
    parser.add_argument("--naive-python", default=sys.executable, help="python for naive_server.py (default: this)")
    parser.add_argument("--rounds", type=int, default=2, help="measure every level this many times, in turn")
    parser.add_argument("--no-burst", action="store_true", help="skip the burst of refusals")
    parser.add_argument("--req-timeout", type=float, default=1200, help="seconds per request")
    parser.add_argument("--deadline-s", type=float, default=1800, help="seconds per timed pass")
    parser.add_argument("--start-timeout", type=float, default=300, help="seconds for a server to become ready")
    parser.add_argument("--json", default=None, help="write the results and goals here as JSON")
    args = parser.parse_args()
    levels = [int(c) for c in (args.concurrency or ("1,16" if args.quick else "1,16,64,256")).split(",")]
    args.new_tokens = args.new_tokens or (32 if args.quick else 128)
    servers = [s for s in args.servers.split(",") if s]
    known = {"ours", "engine", "llama", "before", "naive"}
    if not servers or set(servers) - known or len(set(servers)) < len(servers):
        parser.error(f"--servers takes a comma-separated list of {', '.join(sorted(known))}")
    if "llama" in servers and not args.llama_cpp:
        print("no --llama-cpp: llama-server left out (bench/llama_cpp.py build makes it)")
        servers.remove("llama")
    if "before" in servers and not (args.before and (Path(args.before) / "service" / "__main__.py").is_file()):
        parser.error("--servers before needs --before DIR, a checkout of this repository")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the servers

    threads = torch.get_num_threads()
    print(machine())
    print(f"CPU flags: {cpu_flags()}")
    print(
        f"GPT-2-small shape, random weights; clients {levels}, prompt {PROMPT_LEN} token ids, {args.new_tokens} "
        f"generated (forced), greedy, streamed; ours DTYPE={args.dtype}; {threads} threads each; {args.rounds} "
        f"round(s): {', '.join(servers)}",
        flush=True,
    )
    gen = torch.Generator().manual_seed(1)
    results: dict[tuple[str, int], list[dict]] = {}
    burst_result = None
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        work = Path(tmp)
        store, hf = random_gpt2_small(work)
        args.kv_bytes_per_token = 2 * hf.config.n_layer * hf.config.n_embd * 4  # float32: the most of any dtype
        bench = Bench(args, work, store.root, threads)
        if "llama" in servers:
            bins = llama_cpp.find_binaries(Path(args.llama_cpp))
            bench.gguf = llama_cpp.write_gguf(hf, work / "bench-f32.gguf", bins)
            llama_cpp.server_binary(Path(args.llama_cpp))
        del hf
        warmup = torch.randint(0, VOCAB, (PROMPT_LEN,), generator=gen).tolist()
        for round_ in range(args.rounds):
            for clients in levels:
                n = args.requests or (8 if clients == 1 else 2 * clients if clients <= 64 else clients)
                prompts = torch.randint(0, VOCAB, (n, PROMPT_LEN), generator=gen).tolist()
                order = servers[round_ % len(servers) :] + servers[: round_ % len(servers)]
                paired = clients == 1 and {"ours", "engine"} <= set(order)
                if paired:  # one entry for the two, where the first of them stood
                    first = min(order.index("ours"), order.index("engine"))
                    order = [s for s in order if s not in ("ours", "engine")]
                    order.insert(first, "ours+engine")
                print(f"\nround {round_ + 1}, {clients} client(s), {n} requests: {', '.join(order)}", flush=True)
                for system in order:
                    if system == "ours+engine":
                        got = bench.run_alternating(prompts, warmup, engine_first=round_ % 2 == 1)
                        for name in ("ours", "engine"):
                            results.setdefault((name, clients), []).append(got[name])
                        continue
                    got = bench.run(system, clients, prompts, warmup)
                    results.setdefault((system, clients), []).append(got)
        if "ours" in servers and not args.no_burst:
            print(f"\nburst: {BURST['requests']} requests at once, MAX_NUM_SEQS={BURST['max_num_seqs']}, "
                  f"MAX_WAITING_REQUESTS={BURST['max_waiting']}", flush=True)  # fmt: skip
            burst_result = bench.burst()
            print(f"  {burst_result}", flush=True)

    def med(system: str, clients: int, key: str) -> float:
        recs = [r for r in results.get((system, clients), []) if r is not None]
        return statistics.median(r[key] for r in recs) if recs else float("nan")

    def errors(system: str, clients: int) -> int:
        recs = results.get((system, clients), [])
        return sum(r["errors"] for r in recs if r is not None) + sum(1 for r in recs if r is None)

    print(f"\nmedians over {args.rounds} round(s); prompt {PROMPT_LEN}, {args.new_tokens} generated tokens")
    header = ("clients", "system", "tok/s", "TTFT p50", "TTFT p95", "ITL p50 ms", "ITL p95 ms", "TPOT ms", "errors")
    print(f"{header[0]:>7} {header[1]:<8}" + "".join(f"{h:>11}" for h in header[2:]))
    for clients in levels:
        for system in servers:
            cells = [
                show(med(system, clients, "tok_s"), ".1f"),
                show(med(system, clients, "ttft_p50"), ".3f"),
                show(med(system, clients, "ttft_p95"), ".3f"),
                show(med(system, clients, "itl_p50") * 1e3, ".1f"),
                show(med(system, clients, "itl_p95") * 1e3, ".1f"),
                show(med(system, clients, "tpot") * 1e3, ".1f"),
                str(errors(system, clients)),
            ]
            print(f"{clients:>7} {system:<8}" + "".join(f"{c:>11}" for c in cells))
        for other in ("engine", "llama", "before", "naive"):
            if other in servers and "ours" in servers:
                ratio = med("ours", clients, "tok_s") / med(other, clients, "tok_s")
                print(f"{clients:>7} ours/{other}: tok/s {show(ratio)}x")
    rows = goals(med, burst_result, errors)
    print(f"\n{'goal':<48}{'ours':>10}{'theirs':>10}{'ratio':>8}{'goal':>10}  met")
    for r in rows:
        print(f"{r['name']:<48}{show(r['ours']):>10}{show(r['theirs']):>10}{show(r['ratio']):>8}{r['goal']:>10}  "
              f"{'yes' if r['met'] else 'NO'}")  # fmt: skip
    print(f"goals met: {sum(r['met'] for r in rows)} of {len(rows)} ({machine()})")
    if args.json:
        flat = [r for recs in results.values() for r in recs if r is not None]
        doc = {"machine": machine(), "flags": cpu_flags(), "results": flat, "burst": burst_result, "targets": rows}
        Path(args.json).write_text(json.dumps(doc, indent=1))
    if any(errors(s, c) for s in servers for c in levels):
        print("FAILED or with errors: see above")
        sys.exit(1)


if __name__ == "__main__":
    main()
