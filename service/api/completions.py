"""`POST /v1/completions` and `POST /v1/chat/completions`: OpenAI-compatible, streaming or not.

Each prompt (× `n`) becomes engine requests; their outputs are assembled into choices (non-streaming) or
forwarded as SSE chunks (streaming, ending in `data: [DONE]`, errors as an error event). With `echo` and
`logprobs`, the prompt's entries come first (the first one null), then the generated tokens': the shape
lm-evaluation-harness's `local-completions` relies on.
"""

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
    logprobs_object,
    prompt_entries,
    prompt_inputs,
    sampling_params,
)
from .schemas import ChatCompletionRequest, CompletionRequest
from .streams import ClientGone, Job, engine_error, merged, sse, sse_error, until_disconnect

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


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request) -> Response:
    server = request.app.state.server
    stack = contextlib.AsyncExitStack()
    backend = await stack.enter_async_context(server.session())
    try:
        _check_model(req.model, backend)
        prompts = prompt_inputs(req.prompt, backend.loaded.tokenizer, backend.vocab_size)
        echo_logprobs = req.echo and req.logprobs is not None
        jobs = []
        for i, prompt in enumerate(prompts):
            max_tokens = _max_tokens(req.max_tokens, len(prompt.token_ids), backend.max_model_len, req.echo)
            params = sampling_params(req, server.config, backend.vocab_size, max_tokens=max_tokens,
                                     logprobs=req.logprobs, prompt_logprobs=req.logprobs if echo_logprobs else None)  # fmt: skip
            jobs.append(Job(server.request_id("cmpl"), prompt.token_ids, params))
        _check_total(len(jobs) * req.n, server.config.max_waiting_requests)
    except BaseException:
        await stack.aclose()
        raise
    rid = jobs[0].request_id
    request.state.usage = usage = {}  # logged with the request once the response is complete
    if req.stream:
        stream = _stream_completion(req, prompts, jobs, backend, server.metrics, rid, stack, usage)
        return StreamingResponse(stream, media_type="text/event-stream")
    async with stack:
        try:
            choices = await until_disconnect(request, _collect(backend, server.metrics, jobs, prompts, req.n))
        except ClientGone:
            return Response(status_code=499)
        except APIError:
            raise
        except Exception as exc:
            raise engine_error(exc) from exc
    usage.update(_usage(prompts, choices))
    return JSONResponse({
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": _model_id(backend),
        "choices": [_completion_choice(i, c, req, backend) for i, c in enumerate(choices)], "usage": usage,
    })  # fmt: skip


def _check_model(model: str | None, backend) -> None:
    if model and model not in _model_names(backend):
        raise APIError(404, f"model {model!r} is not served here; this server serves {_model_id(backend)!r}",
                       "model", "model_not_found")  # fmt: skip


def _model_names(backend) -> set[str]:
    return {backend.name, f"{backend.name}@{backend.version}", _model_id(backend)}


def _model_id(backend) -> str:
    return f"{backend.name}@{backend.version}"


def _max_tokens(max_tokens: int | None, prompt_len: int, max_model_len: int, echo: bool) -> int:
    if max_tokens is None:
        max_tokens = max(max_model_len - prompt_len, 0)
    if max_tokens < (0 if echo else 1):
        raise invalid(f"max_tokens must be at least {0 if echo else 1}{'' if echo else ' (0 only with echo)'}, got {max_tokens}", "max_tokens")
    check_context(prompt_len, max_tokens, max_model_len)
    return max_tokens


def _check_total(num_sequences: int, limit: int) -> None:
    if num_sequences > limit:
        raise invalid(f"the request asks for {num_sequences} sequences (prompts × n); the limit is {limit}", "n")


async def _collect(backend, metrics, jobs: list[Job], prompts: list[PromptInput], n: int) -> list[Choice]:
    choices = [Choice(prompts[i // n]) for i in range(len(jobs) * n)]
    async for i, out in merged(backend, metrics, jobs):
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
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


async def _stream_completion(req: CompletionRequest, prompts, jobs, backend, metrics, rid: str, stack, usage: dict) -> AsyncIterator[bytes]:
    created, model, n = int(time.time()), _model_id(backend), req.n
    choices = [Choice(prompts[i // n]) for i in range(len(jobs) * n)]

    def chunk(index: int, text: str, logprobs, finish_reason) -> bytes:
        return sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]})  # fmt: skip

    started: set[int] = set()
    async with stack:
        try:
            async for i, out in merged(backend, metrics, jobs):
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
            usage.update(_usage(prompts, choices))
            if req.stream_options and req.stream_options.include_usage:
                yield sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                           "choices": [], "usage": usage})  # fmt: skip
        except Exception as exc:
            yield sse_error(exc)
        yield sse("[DONE]")


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
    server = request.app.state.server
    stack = contextlib.AsyncExitStack()
    backend = await stack.enter_async_context(server.session())
    try:
        _check_model(req.model, backend)
        ids = chat_prompt(req.messages, backend)
        prompt = PromptInput(ids, "")
        max_tokens = _max_tokens(req.max_completion_tokens or req.max_tokens, len(ids), backend.max_model_len, False)
        top = req.top_logprobs if req.logprobs else None
        params = sampling_params(req, server.config, backend.vocab_size, max_tokens=max_tokens, logprobs=top, prompt_logprobs=None)
        jobs = [Job(server.request_id("chatcmpl"), ids, params)]
        _check_total(req.n, server.config.max_waiting_requests)
    except BaseException:
        await stack.aclose()
        raise
    rid = jobs[0].request_id
    request.state.usage = usage = {}
    if req.stream:
        stream = _stream_chat(req, prompt, jobs, backend, server.metrics, rid, stack, usage)
        return StreamingResponse(stream, media_type="text/event-stream")
    async with stack:
        try:
            choices = await until_disconnect(request, _collect(backend, server.metrics, jobs, [prompt], req.n))
        except ClientGone:
            return Response(status_code=499)
        except APIError:
            raise
        except Exception as exc:
            raise engine_error(exc) from exc
    usage.update(_usage([prompt], choices))
    return JSONResponse({
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": _model_id(backend),
        "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                     "logprobs": _chat_logprobs(c.entries, backend) if req.logprobs else None,
                     "finish_reason": c.finish_reason or "length"} for i, c in enumerate(choices)],
        "usage": usage,
    })  # fmt: skip


def _chat_logprobs(entries: list[LogprobEntry], backend) -> dict:
    strings = backend.token_strings
    return {"content": [{"token": strings(e.token_id), "logprob": e.logprob, "bytes": list(strings.raw(e.token_id)),
                         "top_logprobs": [{"token": strings(t), "logprob": lp, "bytes": list(strings.raw(t))} for t, lp in e.top or []]}
                        for e in entries]}  # fmt: skip


async def _stream_chat(req: ChatCompletionRequest, prompt, jobs, backend, metrics, rid: str, stack, usage: dict) -> AsyncIterator[bytes]:
    created, model = int(time.time()), _model_id(backend)
    choices = [Choice(prompt) for _ in range(req.n)]

    def chunk(index: int, delta: dict, finish_reason, logprobs=None) -> bytes:
        return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]})  # fmt: skip

    async with stack:
        try:
            for i in range(req.n):
                yield chunk(i, {"role": "assistant", "content": ""}, None)
            async for _, out in merged(backend, metrics, jobs):
                _add(choices[out.index], out)
                entries = [LogprobEntry(t, lp, top) for t, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs)]
                logprobs = _chat_logprobs(entries, backend) if req.logprobs else None
                if out.text or out.finished:
                    yield chunk(out.index, {"content": out.text} if out.text else {}, _finish_reason(out), logprobs)
            usage.update(_usage([prompt], choices))
            if req.stream_options and req.stream_options.include_usage:
                yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [], "usage": usage})  # fmt: skip
        except Exception as exc:
            yield sse_error(exc)
        yield sse("[DONE]")
