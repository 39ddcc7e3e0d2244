"""(a) SIGTERM with streams in flight: every stream ends with its final chunk or an error event, then
`data: [DONE]`, within DRAIN_TIMEOUT; a request meanwhile gets 503; the exit status is 0.
"""

import asyncio
import json
import random
import signal
import subprocess
import threading
import time

import httpx

from reliability.scenarios import Check
from reliability.server import ServerProcess, model_info
from reliability.traffic import random_token


def _stream_until_end(url: str, body: dict, admitted: threading.Event, out: dict, start: threading.Barrier) -> None:
    """A streaming request in a thread: its status, its events, when it ended. `admitted` is set when the
    response starts (the service starts a stream once the engine has queued it). The request is sent once
    every thread has its client ready (`start`): a client costs tens of ms to set up, in which the first
    streams of a tiny model could finish before the last are sent."""
    try:
        with httpx.Client(timeout=300) as client:
            start.wait(60)
            with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                out["status"] = r.status_code
                out["events"] = []
                admitted.set()
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        out["events"].append(line[6:])
    except (httpx.HTTPError, threading.BrokenBarrierError) as exc:
        out["exception"] = f"{type(exc).__name__}: {exc}"
    finally:
        out["end"] = time.monotonic()
        admitted.set()


def stream_ending(out: dict) -> str:
    """'done' (final chunk, then [DONE]), 'error' (an error event, then [DONE]) or 'bad: ...'."""
    events = out.get("events") or []
    if out.get("status") != 200 or not events or events[-1] != "[DONE]":
        last = events[-1][:120] if events else None
        return f"bad: status {out.get('status')}, last event {last}, {out.get('exception', '')}"
    last = json.loads(events[-2]) if len(events) >= 2 else {}
    if "error" in last:
        return "error"
    if last.get("choices") and last["choices"][0].get("finish_reason"):
        return "done"
    return "bad: no final chunk"


def sigterm_streams(
    server: ServerProcess, streams: int, drain_timeout: float, seed: int = 0
) -> tuple[dict, list[Check]]:
    """(a) Start `streams` streams (half to half the context, half to all of it) on a server started with
    DRAIN_TIMEOUT = `drain_timeout` that admits them all (MAX_NUM_SEQS + MAX_WAITING_REQUESTS >= streams); once each has
    started (admitted: running or waiting), SIGTERM the server. Every stream must end with its final chunk or an error
    event, then [DONE], within DRAIN_TIMEOUT (+2 s); a new request meanwhile gets 503; the exit status is 0."""
    info = asyncio.run(_info(server.url))
    rng = random.Random(seed)
    outs: list[dict] = [{} for _ in range(streams)]
    admitted = [threading.Event() for _ in range(streams)]
    start = threading.Barrier(streams)
    threads = []
    for i in range(streams):
        body = {
            "prompt": [random_token(rng, info["vocab_size"], info["eos_token_id"]) for _ in range(8)],
            "max_tokens": info["max_model_len"] // (2 if i % 2 == 0 else 1) - 8,
            "ignore_eos": True,
            "stream": True,
        }
        threads.append(
            threading.Thread(
                target=_stream_until_end, args=(server.url, body, admitted[i], outs[i], start), daemon=True
            )
        )
    for t in threads:
        t.start()
    for e in admitted:
        e.wait(120)
    in_flight = sum(1 for o in outs if "end" not in o and o.get("status") == 200)
    t_sig = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    refused = None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and refused is None:
        try:
            r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=5)
            refused = r.status_code if r.status_code != 200 else None
        except httpx.HTTPError:
            break
    for t in threads:
        t.join(drain_timeout + 60)
    try:
        code = server.proc.wait(drain_timeout + 60)
    except subprocess.TimeoutExpired:
        code = None
    t_exit = time.monotonic()
    endings = [stream_ending(o) for o in outs]
    late = [round(o["end"] - t_sig, 2) for o in outs if o["end"] - t_sig > drain_timeout + 2]
    bad = [e for e in endings if e.startswith("bad")]
    fig = {
        "streams": streams,
        "in_flight_at_sigterm": in_flight,
        "drain_timeout_s": drain_timeout,
        "finished": endings.count("done"),
        "cut_with_error_event": endings.count("error"),
        "bad": bad[:3],
        "last_stream_end_s": round(max(o["end"] for o in outs) - t_sig, 2),
        "exit_code": code,
        "exit_after_s": round(t_exit - t_sig, 2),
        "new_request_while_draining": refused,
    }
    checks = [
        ("(a) every stream was admitted and in flight at SIGTERM", in_flight == streams, f"{in_flight}/{streams}"),
        ("(a) every stream ended with its final chunk or an error event, then [DONE]", not bad, str(bad[:3])),
        ("(a) all ended within DRAIN_TIMEOUT (+2 s)", not late, f"late: {late}"),
        ("(a) a new request while draining gets 503", refused == 503, f"got {refused}"),
        ("(a) exit status 0", code == 0, f"exit {code} after {fig['exit_after_s']} s"),
    ]
    return fig, checks


async def _info(url: str) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return await model_info(client)
