"""Running engine requests for one HTTP request: several prompts (and their `n` samples) merged into one
stream, abort on client disconnect, and Server-Sent Events framing.
"""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from starlette.requests import Request

from service.engine.async_engine import AsyncEngine, EngineDead
from service.engine.engine import EngineOutput
from service.engine.scheduler import QueueFull, TooLarge
from service.engine.types import SamplingParams
from service.metrics import Metrics

from .errors import APIError, ClientGone, error_body

T = TypeVar("T")


def engine_error(exc: BaseException) -> APIError:
    """What an engine-side failure means to the client."""
    if isinstance(exc, QueueFull):
        return APIError(
            429,
            f"the server is at capacity ({exc}); retry shortly",
            code="rate_limit_exceeded",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, TooLarge):
        return APIError(400, f"the request can never fit in this server's KV cache: {exc}", code="request_too_large")
    if isinstance(exc, EngineDead):
        return APIError(503, "the engine stopped; retry on another replica", code="service_unavailable")
    return APIError(500, f"internal error: {type(exc).__name__}", code="internal_error")


@dataclass(frozen=True)
class Job:
    """One engine request: `AsyncEngine.generate`'s arguments."""

    request_id: str
    token_ids: list[int]
    params: SamplingParams
    score_from: int | None = None
    shares_prefix_with: str | None = None


async def merged(
    backend, metrics: Metrics, jobs: list[Job], on_admitted: Callable[[], None] | None = None
) -> AsyncIterator[tuple[int, EngineOutput]]:
    """Outputs of several engine requests as they come: (position in `jobs`, output). Leaving early, or
    any request failing, aborts all of them; the first failure is raised. Finished sequences are counted
    in the metrics here, once for every endpoint. `on_admitted` is called once the engine has queued
    every one of them."""
    queue: asyncio.Queue = asyncio.Queue()
    engine: AsyncEngine = backend.engine
    left = len(jobs)

    def admitted() -> None:
        nonlocal left
        left -= 1
        if left == 0 and on_admitted is not None:
            on_admitted()

    async def pump(i: int, job: Job) -> None:
        try:
            async for out in engine.generate(
                job.request_id, job.token_ids, job.params, job.score_from, job.shares_prefix_with, on_admit=admitted
            ):
                if out.stats is not None:
                    metrics.sequence_finished(
                        backend.labels, out.stats, out.finish_reason, len(out.prompt_logprobs or ())
                    )
                queue.put_nowait((i, out))
        except asyncio.CancelledError:  # the client left, or a sibling failed: generate() aborted it
            metrics.aborts.labels(*backend.labels).inc()
            raise
        except BaseException as exc:
            queue.put_nowait((i, exc))
            raise
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, job)) for i, job in enumerate(jobs)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # their `finally` aborts the engine requests


async def read_until_admitted(
    chunks: AsyncIterator[bytes], admitted: asyncio.Event
) -> tuple[list[bytes], asyncio.Future | None]:
    """Read a stream's first chunks until its engine requests are admitted, so that a refusal at admission
    (queue full: 429 with Retry-After; too large: 400) raises here, before the response has started, and
    reaches the client as its HTTP status rather than as an error event in a 200 stream. Returns the chunks
    read and the next chunk's pending read (None when the stream ended or nothing is pending)."""
    read: list[bytes] = []
    while not admitted.is_set():
        nxt = asyncio.ensure_future(anext(chunks))
        waiter = asyncio.ensure_future(admitted.wait())
        try:
            await asyncio.wait({nxt, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not nxt.done():
            return read, nxt
        try:
            read.append(nxt.result())  # raises the admission failure
        except StopAsyncIteration:
            return read, None
    return read, None


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so aborting its engine requests) if the client disconnects."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientGone()


async def complete(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result for a non-streaming response: ClientGone if the client left first (its engine
    requests aborted; the error handlers answer nobody), engine failures as the client's APIError."""
    try:
        return await until_disconnect(request, work)
    except (APIError, ClientGone):
        raise
    except Exception as exc:
        raise engine_error(exc) from exc


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


def sse_error(exc: BaseException) -> bytes:
    err = exc if isinstance(exc, APIError) else engine_error(exc)
    return sse(error_body(err.status, err.message, err.param, err.code))
