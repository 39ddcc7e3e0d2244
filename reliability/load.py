"""Sending requests and judging their answers: `execute` one `Spec` (bounded by a timeout), `drive` closed-loop
clients for a while (a client told 429 waits before its next request), sampling the server's RSS.

Outcomes of a request, as the suites count them (`Result.outcome`):

- `ok`: 200 and a well-formed body (a stream: every choice finished, no error event, `data: [DONE]` last);
- `429`: 429 with a `Retry-After` header (and its client-side latency, send to response);
- `client_abort`: the client hung up mid-stream on purpose;
- `5xx`: a 5xx status, or a stream's error event with a 5xx code;
- `error`: anything else (another status, a malformed body, a stream error event, a timeout, a transport
  error), with the reason in `detail`.
"""

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from reliability.server import ServerProcess
from reliability.traffic import Spec


@dataclass
class Result:
    kind: str
    outcome: str  # ok, 429, client_abort, 5xx, error
    status: int | None
    latency: float
    start: float
    detail: str = ""
    retry_after: float | None = None  # a 429's Retry-After, in seconds


def _error_outcome(status: int | None) -> str:
    return "5xx" if status is not None and status >= 500 else "error"


def _check_body(spec: Spec, data: dict) -> str:
    """'' when a complete non-streaming answer looks right, else what is wrong."""
    if spec.path == "/v1/score":
        results = data.get("results")
        if not isinstance(results, list) or len(results) != spec.expect:
            return f"score: {spec.expect} results expected, got {None if results is None else len(results)}"
        return ""
    choices = data.get("choices")
    if not isinstance(choices, list) or len(choices) != spec.expect:
        return f"{spec.expect} choices expected, got {None if choices is None else len(choices)}"
    if any(c.get("finish_reason") not in ("stop", "length") for c in choices):
        return f"finish reasons {[c.get('finish_reason') for c in choices]}"
    return "" if "usage" in data else "no usage"


def _check_stream(spec: Spec, events: list[str]) -> tuple[str, str]:
    """(outcome, detail) of a stream read to its end."""
    if not events or events[-1] != "[DONE]":
        return "error", f"the stream did not end with [DONE] (last: {events[-1][:200] if events else 'nothing'})"
    finished: dict[int, str | None] = {}
    for raw in events[:-1]:
        try:
            event = json.loads(raw)
        except json.JSONDecodeError:
            return "error", f"an event is not JSON: {raw[:200]}"
        if "error" in event:
            err = event["error"]
            code = err.get("code")
            outcome = "5xx" if code in ("internal_error", "service_unavailable") else "error"
            return outcome, f"error event: {code}: {err.get('message', '')[:200]}"
        for choice in event.get("choices", []):
            finished.setdefault(choice["index"], None)
            if choice.get("finish_reason"):
                finished[choice["index"]] = choice["finish_reason"]
    if len(finished) != spec.expect or None in finished.values():
        return "error", f"choices finished: {finished} ({spec.expect} expected)"
    return "ok", ""


async def execute(client: httpx.AsyncClient, spec: Spec, t0: float, timeout: float = 120.0) -> Result:
    start = time.monotonic()

    def result(outcome: str, status: int | None, detail: str = "", headers=None) -> Result:
        retry_after = None
        if headers is not None and "retry-after" in headers:
            with contextlib.suppress(ValueError):
                retry_after = float(headers["retry-after"])
        return Result(spec.kind, outcome, status, time.monotonic() - start, start - t0, detail, retry_after)

    try:
        async with asyncio.timeout(timeout):
            if not spec.stream:
                r = await client.post(spec.path, json=spec.body)
                if r.status_code == 429:
                    return result(
                        "429" if "retry-after" in r.headers else "error",
                        429,
                        "" if "retry-after" in r.headers else "429 without Retry-After",
                        r.headers,
                    )
                if r.status_code != 200:
                    return result(_error_outcome(r.status_code), r.status_code, r.text[:300])
                problem = _check_body(spec, r.json())
                return result("error" if problem else "ok", 200, problem)
            async with client.stream("POST", spec.path, json=spec.body) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode(errors="replace")
                    if r.status_code == 429:
                        ok = "retry-after" in r.headers
                        return result("429" if ok else "error", 429, "" if ok else "429 without Retry-After", r.headers)
                    return result(_error_outcome(r.status_code), r.status_code, text[:300])
                events: list[str] = []
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if spec.abort_after is not None and len(events) >= spec.abort_after and events[-1] != "[DONE]":
                            return result("client_abort", 200)  # leaving the block closes the connection
                outcome, detail = _check_stream(spec, events)
                return result(outcome, 200, detail)
    except TimeoutError:
        return result("error", None, f"no complete answer within {timeout:.0f} s")
    except httpx.HTTPError as exc:
        return result("error", None, f"{type(exc).__name__}: {exc}")


@dataclass
class LoadReport:
    results: list[Result] = field(default_factory=list)
    duration: float = 0.0
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, KiB)


async def drive(
    url: str,
    clients: int,
    duration: float,
    make: Callable[[random.Random], Spec],
    *,
    max_requests: int = 1_000_000,
    seed: int = 0,
    retry_pause: tuple[float, float] | None = None,
    request_timeout: float = 120.0,
    server: ServerProcess | None = None,
    stagger: float = 0.0,
    rss_every: float = 1.0,
    report: LoadReport | None = None,
) -> LoadReport:
    """`clients` closed-loop clients send `make(rng)` requests until `duration` seconds have passed or
    `max_requests` were sent; a client that got 429 waits before its next request, as told by Retry-After
    (times a random factor in [0.5, 1.5], so retries spread), or for a random time in `retry_pause`.
    Requests in flight at the deadline run to their end (bounded by `request_timeout`). Each client starts
    after a random delay of up to `stagger` seconds. Samples the server's RSS every `rss_every` seconds."""
    report = report or LoadReport()
    t0 = time.monotonic()
    deadline = t0 + duration
    sent = 0
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)

    async with httpx.AsyncClient(base_url=url, timeout=request_timeout, limits=limits) as client:

        async def worker(i: int) -> None:
            nonlocal sent
            rng = random.Random(seed * 100_003 + i)
            if stagger:
                await asyncio.sleep(rng.uniform(0, stagger))
            while time.monotonic() < deadline and sent < max_requests:
                sent += 1
                res = await execute(client, make(rng), t0, request_timeout)
                report.results.append(res)
                if res.outcome == "429":
                    pause = (
                        rng.uniform(*retry_pause) if retry_pause else (res.retry_after or 1.0) * rng.uniform(0.5, 1.5)
                    )
                    await asyncio.sleep(pause)

        async def sample_rss() -> None:
            while server is not None:
                rss = server.rss_kib()
                if rss is not None:
                    report.rss.append((time.monotonic() - t0, rss))
                await asyncio.sleep(rss_every)

        sampler = asyncio.ensure_future(sample_rss())
        try:
            await asyncio.gather(*(worker(i) for i in range(clients)))
        finally:
            sampler.cancel()
    report.duration = time.monotonic() - t0
    if server is not None and (rss := server.rss_kib()) is not None:
        report.rss.append((report.duration, rss))
    return report
