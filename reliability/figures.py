"""The suites' figures: percentiles, a run's outcome counts and latencies (`summarize`), RSS growth after
warm-up, the first failures, a printed table, and JSON (dataclasses, paths and non-finite floats made
plain).
"""

import json
import math
from dataclasses import asdict
from pathlib import Path

from reliability.load import Result


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return math.nan
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    f = int(k)
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


def summarize(results: list[Result], duration: float) -> dict:
    count = lambda o: sum(1 for r in results if r.outcome == o)  # noqa: E731
    ok = [r.latency for r in results if r.outcome == "ok"]
    rejected = [r.latency for r in results if r.outcome == "429"]
    return {
        "sent": len(results),
        "completed": count("ok"),
        "rejected_429": count("429"),
        "client_aborts": count("client_abort"),
        "5xx": count("5xx"),
        "other_errors": count("error"),
        "duration_s": round(duration, 1),
        "latency_p50_s": pct(ok, 50),
        "latency_p95_s": pct(ok, 95),
        "latency_max_s": max(ok, default=math.nan),
        "latency_429_p50_ms": pct(rejected, 50) * 1000,
        "latency_429_p95_ms": pct(rejected, 95) * 1000,
        "latency_429_max_ms": max(rejected, default=math.nan) * 1000,
        "by_kind": {k: sum(1 for r in results if r.kind == k) for k in sorted({r.kind for r in results})},
    }


def rss_growth(samples: list[tuple[float, int]], duration: float) -> dict:
    """RSS just after warm-up (the first 10 % of the run, at least 60 s, at most half of it) and at the end
    of the load, each the median of a window of samples (10 % of the run, at least 5 s): single samples
    swing by several percent with the allocator's high-water marks. Growth between them, in percent."""
    if not samples:
        return {"rss_start_mib": math.nan, "rss_end_mib": math.nan, "rss_growth_pct": math.nan}
    warmup = min(max(0.1 * duration, 60.0), 0.5 * duration)
    window = max(0.1 * duration, 5.0)
    start_w = [kib for t, kib in samples if warmup <= t <= warmup + window] or [samples[-1][1]]
    end_w = [kib for t, kib in samples if t >= samples[-1][0] - window]
    start, end = pct(start_w, 50), pct(end_w, 50)
    return {
        "warmup_s": round(warmup, 1),
        "window_s": round(window, 1),
        "rss_first_mib": samples[0][1] / 1024,
        "rss_start_mib": start / 1024,
        "rss_end_mib": end / 1024,
        "rss_peak_mib": max(k for _, k in samples) / 1024,
        "rss_growth_pct": 100.0 * (end - start) / start,
    }


def failures(results: list[Result], outcomes: tuple[str, ...] = ("5xx", "error"), limit: int = 3) -> list[str]:
    """The first few failed requests of the given outcomes, with what went wrong."""
    bad = [r for r in results if r.outcome in outcomes]
    return [f"{r.kind} {r.status}: {r.detail}" for r in bad[:limit]]


def table(title: str, rows: list[tuple[str, object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * len(title)] + [f"  {k:<{width}}  {fmt(v)}" for k, v in rows]
    return "\n".join(lines)


def as_json(obj) -> str:
    def default(o):
        if isinstance(o, Path):
            return str(o)
        if hasattr(o, "__dataclass_fields__"):
            return asdict(o)
        return repr(o)

    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    return json.dumps(clean(obj), indent=2, default=default)
