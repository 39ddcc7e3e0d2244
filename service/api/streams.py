"""The engine work of one HTTP request: admission, reading its outputs until done or until the client leaves,
and Server-Sent Events framing.

A route submits its engine requests with `submit` (a refusal raises here, before any response byte, as
the client's APIError), then either reads the handle under `abort_on_disconnect` (a non-streaming response)
or returns an `EventStream` over its chunks (a streaming one). Either way the engine requests are aborted
when the client goes, and the lease on the served model is held until the response is complete.
"""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import orjson
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from service.engine import EngineRequest, RequestHandle
from service.serving import Lease, ServedModel

from .errors import APIError, ClientGone, engine_error, error_body


async def submit(request: Request, model: ServedModel, requests: list[EngineRequest]) -> RequestHandle:
    """Queue `requests` on the model's engine, together; once this returns, every one of them is queued.
    A refusal (queue full, too large, engine gone) is raised as the client's APIError; a client that
    disconnects meanwhile (admission waits for the engine's current step) gets its requests aborted and
    ClientGone."""
    admission = asyncio.ensure_future(model.engine.submit(*requests))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({admission, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        admission.cancel()
        raise
    finally:
        gone.cancel()
    if not admission.done():
        admission.cancel()  # AsyncEngine.submit aborts what it queued
        await asyncio.wait({admission})
        raise ClientGone()
    try:
        return admission.result()
    except Exception as exc:
        raise engine_error(exc) from exc


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body is read by then: nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@contextlib.asynccontextmanager
async def abort_on_disconnect(request: Request, handle: RequestHandle) -> AsyncIterator[None]:
    """For a non-streaming response, around reading `handle`: if the client disconnects, the requests are
    aborted (the handle's iteration ends) and ClientGone is raised (the error handlers answer nobody); an
    engine failure becomes the client's APIError. Leaving early aborts too."""
    gone = asyncio.Event()

    async def watch() -> None:
        await _disconnected(request)
        gone.set()
        handle.abort()

    watcher = asyncio.ensure_future(watch())
    try:
        yield
    except Exception as exc:
        if gone.is_set():
            raise ClientGone() from None
        if isinstance(exc, APIError):
            raise
        raise engine_error(exc) from exc
    finally:
        watcher.cancel()
        handle.abort()
    if gone.is_set():
        raise ClientGone()


class EventStream(StreamingResponse):
    """An SSE response over `chunks`: a failure mid-stream becomes an error event, and it always ends with
    `data: [DONE]`. However the response ends (finished, client gone, never started), the requests still
    running are aborted and the lease is released."""

    def __init__(self, chunks: AsyncIterator[bytes], lease: Lease, handle: RequestHandle) -> None:
        super().__init__(_framed(chunks), media_type="text/event-stream")
        self._chunks, self._lease, self._handle = chunks, lease, handle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                self._handle.abort()
                for chunks in (self.body_iterator, self._chunks):
                    with contextlib.suppress(Exception):
                        await chunks.aclose()
            finally:
                self._lease.release()


async def _framed(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as exc:
        yield sse_error(exc)
    yield sse("[DONE]")


# Characters JSON leaves unescaped that str.splitlines treats as line breaks, in UTF-8: a client that reads
# the stream with httpx's iter_lines would cut an event in two at them (a model can generate U+0085 or
# U+2028 like any other character). Each byte sequence is that character and nothing else (a UTF-8 lead
# byte never continues another character).
_LINE_BREAKS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


def sse(data: dict | str) -> bytes:
    """One event. orjson writes a chunk ~20x faster than json.dumps (0.2 against 4.7 us for a token's chunk,
    2-core Zen 5 EPYC), which at one token per step is time the next step waits for; NaN becomes null."""
    if isinstance(data, str):
        return b"data: " + data.encode() + b"\n\n"
    try:
        body = orjson.dumps(data)
    except TypeError:  # what orjson refuses (a lone surrogate, an integer past 64 bits): escaped ASCII
        body = json.dumps(data).encode()
    for char, escaped in _LINE_BREAKS:
        if char in body:
            body = body.replace(char, escaped)
    return b"data: " + body + b"\n\n"


def sse_error(exc: BaseException) -> bytes:
    err = exc if isinstance(exc, APIError) else engine_error(exc)
    return sse(error_body(err.status, err.message, err.param, err.code))
