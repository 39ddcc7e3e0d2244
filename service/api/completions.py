"""`POST /v1/completions` and `POST /v1/chat/completions`: OpenAI-compatible, streaming or not.

Each prompt (× `n`) becomes engine requests; their outputs are assembled into choices (non-streaming) or
forwarded as SSE chunks (streaming, ending in `data: [DONE]`, errors as an error event). With `echo` and
`logprobs`, the prompt's entries come first (the first one null), then the generated tokens': the shape
lm-evaluation-harness's `local-completions` relies on.
"""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from service.engine.engine import EngineOutput
from service.engine.types import TokenLogprob

from .chat import chat_prompt
from .errors import APIError, invalid
from .protocol import (
    LogprobEntry,
    PromptInput,
    check_context,
    check_model,
    logprobs_object,
    prompt_entries,
    prompt_inputs,
    sampling_params,
)
from .schemas import ChatCompletionRequest, CompletionRequest
from .streams import Job, complete, engine_error, merged, read_until_admitted, sse, sse_error

router = APIRouter()


@dataclass
class Choice:
    prompt: PromptInput
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    entries: list[LogprobEntry] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


def _finish_reason(out: EngineOutput) -> str | None:
    return None if out.finish_reason is None else out.finish_reason.value


def _add(choice: Choice, out: EngineOutput) -> None:
    choice.text += out.text
    choice.token_ids += out.token_ids
    for token, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs):
        choice.entries.append(LogprobEntry(token, lp, top))
    if out.prompt_logprobs is not None:
        choice.prompt_logprobs = out.prompt_logprobs
    choice.finish_reason = _finish_reason(out) or choice.finish_reason


@dataclass
class _Call:
    """One HTTP request's engine work, as the streaming and non-streaming paths share it."""

    backend: object
    metrics: object
    request_id: str
    prompts: list[PromptInput]
    jobs: list[Job]
    usage: dict = field(default_factory=dict)  # logged with the request once the response is complete
    admitted: asyncio.Event = field(default_factory=asyncio.Event)  # set once the engine queued every job


async def _serve(request: Request, req, prepare, stream, body) -> Response:
    """Both routes: hold a backend session for the whole response; `prepare(server, backend)` validates
    and returns (prompts, jobs); then stream (`stream(req, call)` yields SSE chunks) or collect (`body(req,
    call, choices)` builds the JSON)."""
    server = request.app.state.server
    stack = contextlib.AsyncExitStack()
    backend = await stack.enter_async_context(server.session())
    try:
        check_model(req.model, backend)
        prompts, jobs = prepare(server, backend)
        _check_total(len(jobs) * req.n, server.config.max_waiting_requests)
    except BaseException:
        await stack.aclose()
        raise
    call = _Call(backend, server.metrics, jobs[0].request_id, prompts, jobs)
    request.state.usage = call.usage
    if req.stream:
        chunks = stream(req, call)
        try:  # refused at admission (queue full, too large): a plain HTTP error, not a 200 with an error event
            read, pending = await read_until_admitted(chunks, call.admitted)
        except BaseException as exc:
            await chunks.aclose()
            await stack.aclose()
            if isinstance(exc, APIError) or not isinstance(exc, Exception):
                raise
            raise engine_error(exc) from exc
        return StreamingResponse(_sse_stream(stack, _resumed(read, pending, chunks)), media_type="text/event-stream")
    async with stack:
        choices = await complete(request, _collect(call, req.n))
    call.usage.update(_usage(prompts, choices))
    return JSONResponse(body(req, call, choices))


async def _resumed(
    read: list[bytes], pending: asyncio.Future | None, chunks: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    """The stream from where `read_until_admitted` left it."""
    try:
        for chunk in read:
            yield chunk
        if pending is not None:
            try:
                yield await pending
            except StopAsyncIteration:
                return
        async for chunk in chunks:
            yield chunk
    finally:
        if pending is not None and not pending.done():  # the client left while the next chunk was on its way
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        await chunks.aclose()


async def _sse_stream(stack: contextlib.AsyncExitStack, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The session is held until the stream ends; a failure mid-stream is an error event; always [DONE]."""
    async with stack:
        try:
            async for chunk in chunks:
                yield chunk
        except Exception as exc:
            yield sse_error(exc)
        yield sse("[DONE]")


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request) -> Response:
    def prepare(server, backend) -> tuple[list[PromptInput], list[Job]]:
        prompts = prompt_inputs(req.prompt, backend.loaded.tokenizer, backend.vocab_size)
        echo_logprobs = req.echo and req.logprobs is not None
        jobs = []
        for prompt in prompts:
            max_tokens = _max_tokens(req.max_tokens, len(prompt.token_ids), backend.max_model_len, req.echo)
            params = sampling_params(
                req,
                server.config,
                backend.vocab_size,
                max_tokens=max_tokens,
                logprobs=req.logprobs,
                prompt_logprobs=req.logprobs if echo_logprobs else None,
            )
            jobs.append(Job(server.request_id("cmpl"), prompt.token_ids, params))
        return prompts, jobs

    return await _serve(request, req, prepare, _stream_completion, _completion_body)


def _completion_body(req: CompletionRequest, call: _Call, choices: list["Choice"]) -> dict:
    return {
        "id": call.request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": call.backend.model_id,
        "usage": call.usage,
        "choices": [_completion_choice(i, c, req, call.backend) for i, c in enumerate(choices)],
    }


def _max_tokens(max_tokens: int | None, prompt_len: int, max_model_len: int, echo: bool) -> int:
    if max_tokens is None:
        max_tokens = max(max_model_len - prompt_len, 0)
    if max_tokens < (0 if echo else 1):
        raise invalid(
            f"max_tokens must be at least {0 if echo else 1}{'' if echo else ' (0 only with echo)'}, got {max_tokens}",
            "max_tokens",
        )
    check_context(prompt_len, max_tokens, max_model_len)
    return max_tokens


def _check_total(num_sequences: int, limit: int) -> None:
    if num_sequences > limit:
        raise invalid(f"the request asks for {num_sequences} sequences (prompts × n); the limit is {limit}", "n")


async def _collect(call: _Call, n: int) -> list[Choice]:
    jobs = call.jobs
    choices = [Choice(call.prompts[i // n]) for i in range(len(jobs) * n)]
    async for i, out in merged(call.backend, call.metrics, jobs):
        _add(choices[i * n + out.index], out)
    if jobs and jobs[0].params.max_tokens == 0:  # scoring only: one engine sequence stands for every sample
        for i in range(len(jobs)):
            for j in range(1, n):
                choices[i * n + j] = choices[i * n]
    return choices


def _completion_choice(index: int, c: Choice, req: CompletionRequest, backend) -> dict:
    text = (c.prompt.text if req.echo else "") + c.text
    logprobs = None
    if req.logprobs is not None:
        entries = (prompt_entries(c.prompt.token_ids, c.prompt_logprobs) if req.echo else []) + c.entries
        logprobs = logprobs_object(entries, backend.token_strings)
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason or "length"}


def _usage(prompts: list[PromptInput], choices: list[Choice]) -> dict:
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    completion_tokens = sum(len(c.token_ids) for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def _stream_completion(req: CompletionRequest, call: _Call) -> AsyncIterator[bytes]:
    created, model, n, backend = int(time.time()), call.backend.model_id, req.n, call.backend
    choices = [Choice(call.prompts[i // n]) for i in range(len(call.jobs) * n)]

    def chunk(index: int, text: str, logprobs, finish_reason) -> bytes:
        return sse(
            {
                "id": call.request_id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
            }
        )

    started: set[int] = set()
    async for i, out in merged(backend, call.metrics, call.jobs, on_admitted=call.admitted.set):
        index = i * n + out.index
        choice = choices[index]
        prefix, entries = "", []
        if index not in started and req.echo:
            prefix = choice.prompt.text
            if req.logprobs is not None:
                entries = prompt_entries(choice.prompt.token_ids, out.prompt_logprobs)
        started.add(index)
        _add(choice, out)
        entries += [LogprobEntry(t, lp, top) for t, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs)]
        logprobs = logprobs_object(entries, backend.token_strings) if req.logprobs is not None else None
        if prefix or out.text or out.token_ids or out.finished:
            yield chunk(index, prefix + out.text, logprobs, _finish_reason(out))
    call.usage.update(_usage(call.prompts, choices))
    if req.stream_options and req.stream_options.include_usage:
        yield sse(
            {
                "id": call.request_id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [],
                "usage": call.usage,
            }
        )


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
    def prepare(server, backend) -> tuple[list[PromptInput], list[Job]]:
        ids = chat_prompt(req.messages, backend)
        max_tokens = _max_tokens(req.max_completion_tokens or req.max_tokens, len(ids), backend.max_model_len, False)
        top = req.top_logprobs if req.logprobs else None
        params = sampling_params(
            req, server.config, backend.vocab_size, max_tokens=max_tokens, logprobs=top, prompt_logprobs=None
        )
        return [PromptInput(ids, "")], [Job(server.request_id("chatcmpl"), ids, params)]

    return await _serve(request, req, prepare, _stream_chat, _chat_body)


def _chat_body(req: ChatCompletionRequest, call: _Call, choices: list[Choice]) -> dict:
    return {
        "id": call.request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": call.backend.model_id,
        "usage": call.usage,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": _chat_logprobs(c.entries, call.backend) if req.logprobs else None,
                "finish_reason": c.finish_reason or "length",
            }
            for i, c in enumerate(choices)
        ],
    }


def _chat_logprobs(entries: list[LogprobEntry], backend) -> dict:
    strings = backend.token_strings
    return {
        "content": [
            {
                "token": strings(e.token_id),
                "logprob": e.logprob,
                "bytes": list(strings.raw(e.token_id)),
                "top_logprobs": [
                    {"token": strings(t), "logprob": lp, "bytes": list(strings.raw(t))} for t, lp in e.top or []
                ],
            }
            for e in entries
        ]
    }


async def _stream_chat(req: ChatCompletionRequest, call: _Call) -> AsyncIterator[bytes]:
    created, model = int(time.time()), call.backend.model_id
    choices = [Choice(call.prompts[0]) for _ in range(req.n)]

    def chunk(index: int, delta: dict, finish_reason, logprobs=None) -> bytes:
        return sse(
            {
                "id": call.request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
            }
        )

    for i in range(req.n):
        yield chunk(i, {"role": "assistant", "content": ""}, None)
    async for _, out in merged(call.backend, call.metrics, call.jobs, on_admitted=call.admitted.set):
        _add(choices[out.index], out)
        entries = [LogprobEntry(t, lp, top) for t, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs)]
        logprobs = _chat_logprobs(entries, call.backend) if req.logprobs else None
        if out.text or out.finished:
            yield chunk(out.index, {"content": out.text} if out.text else {}, _finish_reason(out), logprobs)
    call.usage.update(_usage(call.prompts, choices))
    if req.stream_options and req.stream_options.include_usage:
        yield sse(
            {
                "id": call.request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": call.usage,
            }
        )
