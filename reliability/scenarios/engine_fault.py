"""(e) An engine step raising, on a server started with reliability.server's FAULTY_SERVER: the requests in
flight get an explicit error, then the service exits non-zero or keeps serving, never ready while failing.
"""

import asyncio
import random
import subprocess
import time
from pathlib import Path

import httpx

from reliability.load import execute
from reliability.scenarios import Check
from reliability.server import ServerProcess, model_info, read_gauges
from reliability.traffic import Spec, random_token


def engine_fault(
    server: ServerProcess, trigger: Path, concurrency: int, seed: int = 0, settle: float = 20.0
) -> tuple[dict, list[Check]]:
    """(e) On a server started with FAULTY_SERVER (RELIABILITY_FAULT_TRIGGER=`trigger`) and MAX_NUM_SEQS >=
    `concurrency`: `concurrency` long requests (half streaming) run, then the next engine step raises.
    Every one must get an explicit error (a 5xx, or a stream's error event); then, for up to `settle`
    seconds, the service must either exit non-zero or keep serving, and never answer /ready 200 while a
    request fails."""

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            info = await model_info(client)
            rng = random.Random(seed)

            def long(stream: bool) -> Spec:
                return Spec(
                    "completion",
                    "/v1/completions",
                    {
                        "prompt": [random_token(rng, info["vocab_size"], info["eos_token_id"]) for _ in range(8)],
                        "max_tokens": info["max_model_len"] - 8,
                        "ignore_eos": True,
                        "stream": stream,
                    },
                    stream,
                )

            t0 = time.monotonic()
            tasks = [asyncio.ensure_future(execute(client, long(i % 2 == 0), t0, 120)) for i in range(concurrency)]
            deadline = time.monotonic() + 60
            while read_gauges((await client.get("/metrics")).text)["gpt2_serve_num_requests_running"] < concurrency:
                assert time.monotonic() < deadline, "the requests never all ran"
                await asyncio.sleep(0.02)
            trigger.touch()
            t_fault = time.monotonic()
            results = await asyncio.gather(*tasks)
            ready_while_failing, probes = 0, []
            while time.monotonic() - t_fault < settle and server.proc.poll() is None:
                try:
                    ready = (await client.get("/ready", timeout=5)).status_code
                except httpx.HTTPError:
                    ready = None
                probe = await execute(
                    client, Spec("completion", "/v1/completions", {"prompt": "x", "max_tokens": 2}), t0, 30
                )
                probes.append((ready, probe.outcome))
                ready_while_failing += ready == 200 and probe.outcome != "ok"
                await asyncio.sleep(0.2)
            return results, time.monotonic() - t_fault, ready_while_failing, probes

    results, settled, ready_while_failing, probes = asyncio.run(main())
    try:
        code = server.proc.wait(30)
    except subprocess.TimeoutExpired:
        code = None
    outcomes = [r.outcome for r in results]
    serving = code is None and bool(probes) and probes[-1] == (200, "ok")
    fig = {
        "requests_in_flight": len(results),
        "their_outcomes": {o: outcomes.count(o) for o in sorted(set(outcomes))},
        "then": "exited" if code is not None else "kept serving" if serving else "neither",
        "exit_code": code,
        "ready_200_while_failing": ready_while_failing,
        "settled_after_s": round(settled, 2),
        "errors_seen": sorted({r.detail[:100] for r in results})[:2],
    }
    checks = [
        (
            "(e) every request in flight got an explicit error (5xx, or an error event)",
            all(o == "5xx" for o in outcomes),
            str(fig["their_outcomes"]),
        ),
        (
            "(e) then the service exits non-zero or keeps serving",
            code not in (None, 0) or serving,
            f"exit {code}, last probes {probes[-3:]}",
        ),
        ("(e) never /ready 200 while requests fail", ready_while_failing == 0, f"{ready_while_failing} probes"),
    ]
    return fig, checks
