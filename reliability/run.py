"""The long reliability suites: `python -m service` as operators run it, under load and under faults.

    .venv/bin/python -m reliability.run soak --duration 1200  # mixed traffic at 2x the admitted concurrency
    .venv/bin/python -m reliability.run overload  # baseline at C, then 4x C, then recovery
    .venv/bin/python -m reliability.run faults    # SIGTERM, kill -9 export, corrupt weights, reload, engine fault
    .venv/bin/python -m reliability.run all       # the three, one after the other

Common options: --model REF [--store DIR] (default: the bundled default@prod when models/ has it, else a
tiny random GPT-2 built in a temporary store), --concurrency C (the admitted concurrency, MAX_NUM_SEQS;
default 8), --json FILE (the figures), --keep DIR (keep the work directory: server logs, stores).

Each suite starts its own server(s) on 127.0.0.1 and a free port, with MAX_NUM_SEQS = C and a small
MAX_WAITING_REQUESTS, so "admitted" is explicit: C running plus a few waiting; the rest get 429. Load is
bounded in time and in requests; every server is stopped at the end, on failure too. A suite prints a
summary table and PASS/FAIL per check, and the process exits 1 if any check failed.

- soak: 2C closed-loop clients for --duration seconds sending random valid requests (completions and chat,
  streaming or not; scoring of texts, context + continuations and rolling), 10% of the streams hanging up
  mid-stream. Pass: no 5xx and no other error (every request completes, gets 429 with Retry-After, or was
  aborted by its own client); afterwards the running/waiting gauges and KV usage return to 0; the server's
  RSS (VmRSS, sampled every second) grows < 10% from the end of warm-up (the first 10% of the run, at
  least 60 s, at most half) to the end, each the median of a window of 10% of the run (at least 5 s).
- overload: C clients for --baseline-duration (latency baseline at exactly the admitted concurrency), then
  4C clients for --overload-duration, all sending the same shape of request (non-streaming, random prompt ids, 32
  generated tokens +-50% so that the clients do not run in lockstep, started within 1 s; a refused client waits as
  Retry-After says, times 0.5-1.5, or --retry-pause-min/max seconds). Pass: the excess gets 429 with Retry-After with
  p95 client-side latency <= 50 ms; admitted requests' p95 <= 1.5x the baseline p95; no 5xx or other error; right after
  the load stops a single request succeeds within 1.5x the baseline p95; the gauges return to 0.
- faults: (a) SIGTERM with 32 streams in flight: each ends with `data: [DONE]` after its final chunk or an
  explicit error event, within DRAIN_TIMEOUT (+2 s), and the exit status is 0; (b) `kill -9` of
  `python -m model_store finetune` during its export (frozen with SIGSTOP the moment its staging directory
  reaches a stage, then killed), at three stages: `list` is unchanged, `verify` passes for every version,
  and a `--resume` then publishes a complete version; (c) a flipped byte in model.safetensors of a store
  copy: `python -m service` exits non-zero naming the file; (d) POST /admin/reload switching versions
  several times under streaming and non-streaming load: zero failed requests; (e) an engine step raising
  (injected by a launcher that wraps `Engine.step`; the service has no such hook): the requests in flight
  get an error, and the service either keeps serving or exits non-zero, never stays ready while failing.
"""

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from reliability.figures import as_json, failures, pct, rss_growth, summarize, table
from reliability.load import LoadReport, drive, execute
from reliability.scenarios import Check
from reliability.scenarios.engine_fault import engine_fault
from reliability.scenarios.finetune_kill import STAGES, finetune_kill
from reliability.scenarios.sigterm import sigterm_streams
from reliability.server import FAULTY_SERVER, ServerProcess, model_info, wait_idle
from reliability.stores import add_version_copy, choose_model, copy_model
from reliability.traffic import fixed_request, mixed_request


@dataclass
class Suite:
    name: str
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    figures: dict = field(default_factory=dict)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append((name, bool(ok), detail))
        return ok

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(ok for _, ok, _ in self.checks)

    def report(self) -> str:
        lines = [
            f"  {'PASS' if ok else 'FAIL'}  {name}" + (f"  ({detail})" if detail else "")
            for name, ok, detail in self.checks
        ]
        return "\n".join(lines + [f"{self.name}: {'PASS' if self.passed else 'FAIL'}"])

    def as_dict(self) -> dict:
        return {
            "passed": self.passed,
            "checks": [{"name": n, "passed": ok, "detail": d} for n, ok, d in self.checks],
            "figures": self.figures,
        }


@dataclass
class Context:
    args: argparse.Namespace
    workdir: Path
    root: Path
    ref: str

    def settings(self, **overrides) -> dict[str, object]:
        base: dict[str, object] = {"DTYPE": self.args.dtype, "LOG_LEVEL": "info"}
        if self.args.threads:
            base["NUM_THREADS"] = self.args.threads
        return {**base, **{k.upper(): v for k, v in overrides.items()}}

    def log(self, name: str) -> Path:
        path = self.workdir / "logs" / f"{name}.log"
        path.parent.mkdir(exist_ok=True)
        return path


def kv_budget(root: Path, ref: str, sequences: int, dtype: str) -> str:
    """A KV budget holding `sequences` full-context sequences, plus a quarter: enough for the admitted
    load and small enough that the RSS check is not diluted by an unused gigabyte."""
    import torch

    from model_store import ModelStore
    from service.model import KVCache

    cfg = ModelStore(root).resolve(ref).manifest.config
    # `auto` is counted at float32's width, the wider of what it can resolve to; the other dtypes are 2 bytes.
    width = torch.float32 if dtype in ("auto", "float32") else torch.bfloat16
    per_token = KVCache.bytes_per_token(cfg, width)
    return str(max(16 << 20, int(1.25 * sequences * cfg.n_positions * per_token)))


def load_table(title: str, fig: dict) -> str:
    rows = [
        ("requests sent", fig["sent"]),
        ("completed", fig["completed"]),
        ("429s", fig["rejected_429"]),
        ("client aborts", fig["client_aborts"]),
        ("5xx", fig["5xx"]),
        ("other errors", fig["other_errors"]),
        (
            "latency p50 / p95 / max (s)",
            f"{fig['latency_p50_s']:.3f} / {fig['latency_p95_s']:.3f} / {fig['latency_max_s']:.3f}",
        ),
        (
            "429 latency p50 / p95 / max (ms)",
            f"{fig['latency_429_p50_ms']:.1f} / {fig['latency_429_p95_ms']:.1f} / {fig['latency_429_max_ms']:.1f}",
        ),
    ]
    if "rss_start_mib" in fig:
        rows.append(
            (
                "RSS start / end / growth",
                f"{fig['rss_start_mib']:.1f} MiB / {fig['rss_end_mib']:.1f} MiB / {fig['rss_growth_pct']:+.2f}%",
            )
        )
    rows.append(("duration (s)", fig["duration_s"]))
    return table(title, rows)


# ---- soak --------------------------------------------------------------------------------------------------


def soak(ctx: Context) -> Suite:
    a = ctx.args
    suite = Suite("soak")
    c, w = a.concurrency, a.max_waiting or max(2, a.concurrency // 2)
    settings = ctx.settings(
        max_num_seqs=c,
        max_waiting_requests=w,
        max_n=2,
        kv_cache_memory=a.kv_cache_memory or kv_budget(ctx.root, ctx.ref, 2 * (c + w), a.dtype),
    )
    with ServerProcess(ctx.root, ctx.ref, settings, ctx.log("soak")) as server:
        print(
            f"soak: {ctx.ref}, MAX_NUM_SEQS={c}, MAX_WAITING_REQUESTS={w}, {2 * c} clients, {a.duration:.0f} s "
            f"(server pid {server.pid}, ready in {server.wait_ready():.1f} s)",
            flush=True,
        )

        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                info = await model_info(client)
                report = await drive(
                    server.url,
                    2 * c,
                    a.duration,
                    lambda rng: mixed_request(rng, info),
                    max_requests=a.max_requests,
                    seed=a.seed,
                    server=server,
                )
                idle = await wait_idle(client, timeout=60)
                return info, report, idle

        info, report, (idle, gauges, idle_s) = asyncio.run(main())
        suite.figures = {
            **summarize(report.results, report.duration),
            **rss_growth(report.rss, report.duration),
            "model": info["id"],
            "clients": 2 * c,
            "max_num_seqs": c,
            "max_waiting_requests": w,
            "idle_after_s": round(idle_s, 2),
            "gauges_after": gauges,
            "rss_samples": report.rss,
        }
        alive = server.proc.poll() is None
        code = server.stop(timeout=60)
    fig = suite.figures
    print(load_table(f"soak ({fig['model']}, {2 * c} clients)", fig))
    suite.check("requests were sent and completed", fig["completed"] > 0, f"{fig['completed']} of {fig['sent']}")
    suite.check("no 5xx", fig["5xx"] == 0, "; ".join(failures(report.results, ("5xx",))))
    suite.check(
        "no other errors (every request completed, got 429 or was aborted by its client)",
        fig["other_errors"] == 0,
        "; ".join(failures(report.results, ("error",))),
    )
    suite.check("running/waiting gauges and KV usage back to 0", idle, f"after {idle_s:.1f} s: {gauges}")
    growth = fig["rss_growth_pct"]
    suite.check(
        "RSS growth after warm-up < 10%",
        growth < 10.0,
        f"{fig['rss_start_mib']:.1f} -> {fig['rss_end_mib']:.1f} MiB, {growth:+.2f}%",
    )
    suite.check("server alive at the end, SIGTERM exit status 0", alive and code == 0, f"alive={alive} exit={code}")
    return suite


# ---- overload ----------------------------------------------------------------------------------------------


def overload(ctx: Context) -> Suite:
    a = ctx.args
    suite = Suite("overload")
    c, w = a.concurrency, a.max_waiting or max(1, a.concurrency // 8)
    settings = ctx.settings(
        max_num_seqs=c,
        max_waiting_requests=w,
        kv_cache_memory=a.kv_cache_memory or kv_budget(ctx.root, ctx.ref, 2 * (c + w), a.dtype),
    )
    with ServerProcess(ctx.root, ctx.ref, settings, ctx.log("overload")) as server:
        retry = f"{a.retry_pause_min:g}-{a.retry_pause_max:g} s" if a.retry_pause_max else "Retry-After x 0.5-1.5"
        print(
            f"overload: {ctx.ref}, MAX_NUM_SEQS={c}, MAX_WAITING_REQUESTS={w}; baseline {c} clients "
            f"{a.baseline_duration:.0f} s, overload {4 * c} clients {a.overload_duration:.0f} s, a refused client "
            f"waits {retry} "
            f"(server pid {server.pid}, ready in {server.wait_ready():.1f} s)",
            flush=True,
        )

        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                info = await model_info(client)
                make = lambda rng: fixed_request(rng, info, a.prompt_len, a.new_tokens, a.spread)  # noqa: E731
                await drive(server.url, c, a.warmup, make, seed=a.seed + 1)  # untimed warm-up
                base = await drive(
                    server.url, c, a.baseline_duration, make, seed=a.seed + 2, server=server, stagger=a.stagger
                )
                pause = (a.retry_pause_min, a.retry_pause_max) if a.retry_pause_max else None
                over = await drive(
                    server.url,
                    4 * c,
                    a.overload_duration,
                    make,
                    seed=a.seed + 3,
                    server=server,
                    retry_pause=pause,
                    stagger=a.stagger,
                )
                recovery = await execute(client, make(random.Random(a.seed + 4)), time.monotonic())
                idle = await wait_idle(client, timeout=60)
                return info, base, over, recovery, idle

        info, base, over, recovery, (idle, gauges, idle_s) = asyncio.run(main())
        code = server.stop(timeout=60)
    fb, fo = summarize(base.results, base.duration), summarize(over.results, over.duration)
    suite.figures = {
        "model": info["id"],
        "max_num_seqs": c,
        "max_waiting_requests": w,
        "baseline": fb,
        "overload": fo,
        "recovery": {"outcome": recovery.outcome, "latency_s": recovery.latency, "detail": recovery.detail},
        "idle_after_s": round(idle_s, 2),
        "gauges_after": gauges,
    }
    print(load_table(f"overload: baseline ({c} clients)", fb))
    print(load_table(f"overload: overload ({4 * c} clients)", fo))
    print(f"  recovery: {recovery.outcome} in {recovery.latency:.3f} s")
    inside = server_durations(ctx.log("overload"), 429)
    suite.figures["server_side_429_ms"] = inside
    print(
        "  429s as the server timed them (its request log, arrival to answer inside the app): "
        f"p50 {inside['p50']:.1f} / p95 {inside['p95']:.1f} / max {inside['max']:.1f} ms; "
        "the client-side figures above add the load generator's own delays on the same CPUs"
    )
    limit = 1.5 * fb["latency_p95_s"]
    suite.check(
        "baseline: every request completed",
        fb["completed"] > 0 and fb["completed"] == fb["sent"],
        f"{fb['completed']} of {fb['sent']}; " + "; ".join(failures(base.results)),
    )
    suite.check(
        "overload: the excess got 429 with Retry-After", fo["rejected_429"] > 0, f"{fo['rejected_429']} of {fo['sent']}"
    )
    suite.check(
        "overload: no 5xx, no other errors",
        fo["5xx"] == 0 and fo["other_errors"] == 0,
        "; ".join(failures(over.results)),
    )
    suite.check(
        "overload: 429 p95 latency <= 50 ms",
        fo["latency_429_p95_ms"] <= 50.0,
        f"p95 {fo['latency_429_p95_ms']:.1f} ms, max {fo['latency_429_max_ms']:.1f} ms",
    )
    suite.check(
        "overload: admitted p95 <= 1.5x baseline p95",
        fo["latency_p95_s"] <= limit,
        f"{fo['latency_p95_s']:.3f} s vs baseline {fb['latency_p95_s']:.3f} s "
        f"(ratio {fo['latency_p95_s'] / fb['latency_p95_s']:.2f})",
    )
    suite.check(
        "recovery: one request right after succeeds within 1.5x baseline p95",
        recovery.outcome == "ok" and recovery.latency <= limit,
        f"{recovery.outcome}, {recovery.latency:.3f} s",
    )
    suite.check("gauges back to 0, SIGTERM exit status 0", idle and code == 0, f"{gauges}, exit={code}")
    return suite


def server_durations(log: Path, status: int) -> dict:
    """p50/p95/max duration_ms of the server's request log lines with this status."""
    ms = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("msg") == "request" and entry.get("status") == status:
            ms.append(float(entry.get("duration_ms", "nan")))
    return {"count": len(ms), "p50": pct(ms, 50), "p95": pct(ms, 95), "max": max(ms, default=float("nan"))}


# ---- faults ------------------------------------------------------------------------------------------------


def fault_sigterm(ctx: Context, suite: Suite, streams: int, drain_timeout: float) -> None:
    settings = ctx.settings(max_num_seqs=streams, max_waiting_requests=streams, drain_timeout=drain_timeout)
    with ServerProcess(ctx.root, ctx.ref, settings, ctx.log("fault-sigterm")) as server:
        server.wait_ready()
        fig, checks = sigterm_streams(server, streams, drain_timeout, ctx.args.seed)
    _record(
        suite, "sigterm", f"(a) SIGTERM with {streams} streams in flight (DRAIN_TIMEOUT={drain_timeout:g})", fig, checks
    )


def _record(suite: Suite, key: str, title: str, fig: dict, checks: list[Check]) -> None:
    suite.figures[key] = fig
    print(table(title, list(fig.items())))
    for check in checks:
        suite.check(*check)


def fault_finetune_kill(ctx: Context, suite: Suite) -> None:
    root = copy_model(ctx.root, ctx.ref, ctx.workdir / "ft-store")
    fig, checks = finetune_kill(root, ctx.ref, ctx.workdir, list(STAGES), ctx.args.seed)
    rows = [
        (
            f"kill -9 at {k['stage']}",
            f"hit={k['hit']} rc={k['rc']} list unchanged={k['list_unchanged']} verify={k['verify']}",
        )
        for k in fig["kills"]
    ]
    rows.append(
        (
            "--resume afterwards",
            f"published {fig['resume_published']} (verify rc {fig['resume_verify_rc']}); "
            f"staging left: {fig['staging_leftovers']}",
        )
    )
    suite.figures["finetune_kill"] = fig
    print(table("(b) kill -9 of finetune during its export", rows))
    for check in checks:
        suite.check(*check)


def fault_corrupt(ctx: Context, suite: Suite) -> None:
    from model_store import ModelStore

    root = copy_model(ctx.root, ctx.ref, ctx.workdir / "corrupt-store")
    stored = ModelStore(root).resolve(ctx.ref)
    weights = stored.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    server = ServerProcess(root, stored.ref, ctx.settings(), ctx.log("fault-corrupt"))
    try:
        code = server.proc.wait(180)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        server.stop()
    lines = []
    for raw in server.log_tail(20000).splitlines():  # JSON log lines; a traceback is one line's "msg"
        try:
            lines += str(json.loads(raw).get("msg", "")).splitlines()
        except (json.JSONDecodeError, AttributeError):
            lines.append(raw)
    named = [line.strip() for line in lines if "model.safetensors" in line]
    text = "\n".join(lines)
    suite.figures["corrupt"] = {"exit_code": code, "message": named[-1][:300] if named else text[-300:]}
    print(table("(c) corrupted weights", list(suite.figures["corrupt"].items())))
    suite.check("(c) refuses to start: exit status != 0", code not in (None, 0), f"exit {code}")
    suite.check("(c) the message names the file", bool(named), suite.figures["corrupt"]["message"][:200])


def fault_reload(ctx: Context, suite: Suite, switches: int) -> None:
    from model_store import ModelStore

    root = copy_model(ctx.root, ctx.ref, ctx.workdir / "reload-store")
    store = ModelStore(root)
    name = ctx.ref.split("@", 1)[0]
    first = store.resolve(ctx.ref).ref
    others = [f"{name}@{v}" for v in store.versions(name) if f"{name}@{v}" != first]
    other = others[0] if others else add_version_copy(root, ctx.ref)
    c = ctx.args.concurrency
    settings = ctx.settings(max_num_seqs=c, max_waiting_requests=8 * c)  # never full: every request must succeed
    with ServerProcess(root, first, settings, ctx.log("fault-reload")) as server:
        server.wait_ready()

        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
                info = await model_info(client)

                def make(rng):  # never more in flight than admitted: every request must succeed
                    return mixed_request(rng, info, abort_fraction=0.0)

                report = LoadReport()
                load = asyncio.ensure_future(
                    drive(server.url, max(2, c // 2), 1e9, make, seed=ctx.args.seed, report=report)
                )
                switched = []
                for i in range(switches):
                    count = len(report.results)
                    while len(report.results) < count + 3 and not load.done():
                        await asyncio.sleep(0.05)
                    target = other if i % 2 == 0 else first
                    t = time.monotonic()
                    r = await client.post("/admin/reload", json={"model": target})
                    served = (await client.get("/v1/models")).json()["data"][0]["id"]
                    switched.append(
                        {
                            "to": target,
                            "status": r.status_code,
                            "seconds": round(time.monotonic() - t, 2),
                            "served": served,
                        }
                    )
                count = len(report.results)
                while len(report.results) < count + 3 and not load.done():
                    await asyncio.sleep(0.05)
                load.cancel()  # the clients stop now: in-flight ones are cut by the client, not counted
                with contextlib.suppress(asyncio.CancelledError):
                    await load
                idle = await wait_idle(client)
                return report, switched, idle

        report, switched, (idle, gauges, _) = asyncio.run(main())
        code = server.stop()
    fig = summarize(report.results, sum(s["seconds"] for s in switched))
    suite.figures["reload"] = {
        "switches": switched,
        **{k: fig[k] for k in ("sent", "completed", "rejected_429", "5xx", "other_errors")},
    }
    print(
        table(
            f"(d) hot reload x{switches} under load",
            [
                (
                    "requests",
                    f"{fig['sent']} sent, {fig['completed']} completed, "
                    f"{fig['rejected_429']} 429, {fig['5xx']} 5xx, {fig['other_errors']} other",
                )
            ]
            + [(f"reload -> {s['to']}", f"{s['status']} in {s['seconds']} s, serving {s['served']}") for s in switched],
        )
    )
    suite.check(
        "(d) every reload answered 200 and switched",
        all(s["status"] == 200 and s["served"] == s["to"] for s in switched),
    )
    suite.check(
        "(d) zero failed requests during the reloads",
        fig["sent"] > 0 and fig["completed"] == fig["sent"],
        "; ".join(failures(report.results)),
    )
    suite.check("(d) gauges back to 0, exit status 0", idle and code == 0, f"{gauges}, exit {code}")


def fault_engine(ctx: Context, suite: Suite) -> None:
    trigger = ctx.workdir / "engine-fault-trigger"
    c = ctx.args.concurrency
    with ServerProcess(
        ctx.root,
        ctx.ref,
        ctx.settings(max_num_seqs=c, max_waiting_requests=c),
        ctx.log("fault-engine"),
        argv=["-c", FAULTY_SERVER],
        extra_env={"RELIABILITY_FAULT_TRIGGER": str(trigger)},
    ) as server:
        server.wait_ready()
        fig, checks = engine_fault(server, trigger, c, ctx.args.seed)
    _record(suite, "engine_fault", "(e) an engine step raises", fig, checks)


FAULTS = ("sigterm", "finetune-kill", "corrupt", "reload", "engine")


def faults(ctx: Context) -> Suite:
    a = ctx.args
    suite = Suite("faults")
    only = a.only.split(",") if a.only else list(FAULTS)
    print(f"faults: {ctx.ref}: {', '.join(only)}", flush=True)
    steps = {
        "sigterm": lambda: fault_sigterm(ctx, suite, a.streams, a.drain_timeout),
        "finetune-kill": lambda: fault_finetune_kill(ctx, suite),
        "corrupt": lambda: fault_corrupt(ctx, suite),
        "reload": lambda: fault_reload(ctx, suite, a.switches),
        "engine": lambda: fault_engine(ctx, suite),
    }
    for name in only:
        start = time.monotonic()
        try:
            steps[name]()
        except Exception as exc:  # one fault's harness failure must not hide the others
            suite.check(f"{name}: ran", False, f"{type(exc).__name__}: {exc}")
        print(f"  ({name}: {time.monotonic() - start:.1f} s)", flush=True)
    return suite


# ---- command line ------------------------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m reliability.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("suite", choices=["soak", "overload", "faults", "all"])
    p.add_argument(
        "--model", help="store reference to serve (default: default@prod if bundled, else a tiny random GPT-2)"
    )
    p.add_argument("--store", help="store root for --model (default: MODEL_STORE_ROOT, else the repo's models/)")
    p.add_argument("--tiny", action="store_true", help="serve a tiny random GPT-2 built in the work directory")
    p.add_argument("--concurrency", type=int, default=8, help="admitted concurrency C = MAX_NUM_SEQS (default 8)")
    p.add_argument("--max-waiting", type=int, help="MAX_WAITING_REQUESTS (default: soak C/2, overload C/8, at least 1)")
    p.add_argument("--kv-cache-memory", help="KV_CACHE_MEMORY (default: 1.25x the full-context sequences admitted)")
    p.add_argument("--dtype", default="auto", help="DTYPE of the server (default auto)")
    p.add_argument("--threads", type=int, help="NUM_THREADS of the server (default: its cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--keep", type=Path, help="work directory to keep (logs, stores); default: a temporary one, removed")
    g = p.add_argument_group("soak")
    g.add_argument("--duration", type=float, default=1200, help="seconds of load (default 1200)")
    g.add_argument("--max-requests", type=int, default=500_000, help="stop after this many requests (default 500000)")
    g = p.add_argument_group("overload")
    g.add_argument("--warmup", type=float, default=10, help="untimed seconds at C clients first (default 10)")
    g.add_argument("--baseline-duration", type=float, default=60, help="seconds at exactly C clients (default 60)")
    g.add_argument("--overload-duration", type=float, default=120, help="seconds at 4C clients (default 120)")
    g.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per request (default 16)")
    g.add_argument("--new-tokens", type=int, default=32, help="generated tokens per request (default 32)")
    g.add_argument(
        "--spread",
        type=float,
        default=0.5,
        help="generated tokens vary uniformly within +- this fraction (default 0.5; 0: all equal, lockstep)",
    )
    g.add_argument("--stagger", type=float, default=1.0, help="clients start within this many seconds (default 1)")
    g.add_argument(
        "--retry-pause-min",
        type=float,
        default=0.0,
        help="a client that got 429 waits at least this many seconds ... (default: as Retry-After says)",
    )
    g.add_argument("--retry-pause-max", type=float, default=0.0, help="... and at most this before its next request")
    g = p.add_argument_group("faults")
    g.add_argument("--only", help=f"comma-separated subset of {','.join(FAULTS)}")
    g.add_argument("--streams", type=int, default=32, help="streams in flight at SIGTERM (default 32)")
    g.add_argument("--drain-timeout", type=float, default=5.0, help="DRAIN_TIMEOUT of the SIGTERM server (default 5)")
    g.add_argument("--switches", type=int, default=6, help="hot reloads under load (default 6)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="reliability-"))
    workdir.mkdir(parents=True, exist_ok=True)
    suites: list[Suite] = []
    try:
        root, ref = choose_model(args.model, args.store, workdir, tiny=args.tiny)
        ctx = Context(args, workdir, Path(root), ref)
        names = ["soak", "overload", "faults"] if args.suite == "all" else [args.suite]
        for name in names:
            start = time.monotonic()
            suite = {"soak": soak, "overload": overload, "faults": faults}[name](ctx)
            suite.figures["wall_s"] = round(time.monotonic() - start, 1)
            print(suite.report(), flush=True)
            suites.append(suite)
    finally:
        if args.json:
            args.json.write_text(as_json({s.name: s.as_dict() for s in suites}) + "\n")
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"work directory kept: {workdir}")
    ok = bool(suites) and all(s.passed for s in suites)
    print(
        f"\nreliability {args.suite}: {'PASS' if ok else 'FAIL'}"
        + "".join(f"  {s.name}={'PASS' if s.passed else 'FAIL'}" for s in suites)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
