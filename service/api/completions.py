"""`POST /v1/completions`: OpenAI-compatible legacy completions, streaming or not; and the choices both
completion routes (this one and chat's) assemble from engine outputs.

Each prompt becomes one engine request with `n` samples; their outputs are assembled into choices
(non-streaming) or forwarded as SSE chunks (streaming, ending in `data: [DONE]`, errors as an error event).
With `echo` and `logprobs`, the prompt's entries come first (the first one null), then the generated
tokens': the shape lm-evaluation-harness's `local-completions` relies on.
"""

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service.config import ServiceConfig
from service.engine import EngineOutput, EngineRequest, RequestHandle, TokenLogprob
from service.serving import ServedModel

from .errors import invalid
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
from .schemas import CompletionRequest
from .streams import EventStream, abort_on_disconnect, sse, submit

router = APIRouter()


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request) -> Response:
    server = request.app.state.server
    with server.lease() as lease:
        model = lease.model
        target = check_model(req.model, model)
        prompts = prompt_inputs(req.prompt, model.tokenizer, model.vocab_size)
        jobs = [
            EngineRequest(
                server.request_id("cmpl"), p.token_ids, _params(req, p, model, server.config), adapter=target.adapter
            )
            for p in prompts
        ]
        reply = await submit_reply(request, model, prompts, jobs, req.n, target.model_id)
        if req.stream:
            return EventStream(_completion_chunks(req, reply), lease.hand_over(), reply.handle)
        async with abort_on_disconnect(request, reply.handle):
            choices = await collect_choices(reply)
    return JSONResponse(_completion_body(req, reply, choices))


def _params(req: CompletionRequest, prompt: PromptInput, model: ServedModel, config: ServiceConfig):
    max_tokens = max_new_tokens(req.max_tokens, len(prompt.token_ids), model.max_model_len, req.echo)
    echo_logprobs = req.echo and req.logprobs is not None
    return sampling_params(
        req,
        config,
        model.vocab_size,
        max_tokens=max_tokens,
        logprobs=req.logprobs,
        prompt_logprobs=req.logprobs if echo_logprobs else None,
    )


def max_new_tokens(max_tokens: int | None, prompt_len: int, max_model_len: int, echo: bool) -> int:
    """The request's `max_tokens` (default: the rest of the context), checked against the context."""
    if max_tokens is None:
        max_tokens = max(max_model_len - prompt_len, 0)
    if max_tokens < (0 if echo else 1):
        raise invalid(
            f"max_tokens must be at least {0 if echo else 1}{'' if echo else ' (0 only with echo)'}, got {max_tokens}",
            "max_tokens",
        )
    check_context(prompt_len, max_tokens, max_model_len)
    return max_tokens


async def submit_reply(
    request: Request, model: ServedModel, prompts: list[PromptInput], jobs: list[EngineRequest], n: int, model_id: str
) -> "Reply":
    """Queue the jobs (more sequences than the waiting queue holds: 400; refused: 429 / 400 / 503), and the
    reply to build from them; its usage is logged with the request."""
    limit = request.app.state.server.config.max_waiting_requests
    if len(jobs) * n > limit:
        raise invalid(f"the request asks for {len(jobs) * n} sequences (prompts × n); the limit is {limit}", "n")
    reply = Reply(model, prompts, jobs, n, await submit(request, model, jobs), model_id)
    request.state.usage = reply.usage
    return reply


@dataclass
class Choice:
    prompt: PromptInput
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    entries: list[LogprobEntry] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None

    def add(self, out: EngineOutput) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        self.entries += output_entries(out)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.finish_reason = finish_reason(out) or self.finish_reason


@dataclass
class Reply:
    """What the reply to one completion request is built from: its engine requests (one per prompt, each
    with `n` samples: choice `i * n + sample`) and their outputs, and the usage logged once the response is
    complete."""

    model: ServedModel
    prompts: list[PromptInput]
    jobs: list[EngineRequest]
    n: int
    handle: RequestHandle
    model_id: str  # what the response reports: the served model's, or the adapter's the request named
    created: int = field(default_factory=lambda: int(time.time()))
    usage: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._position = {job.request_id: i for i, job in enumerate(self.jobs)}

    @property
    def id(self) -> str:
        return self.jobs[0].request_id

    def choices(self) -> list[Choice]:
        return [Choice(self.prompts[i // self.n]) for i in range(len(self.jobs) * self.n)]

    def index(self, out: EngineOutput) -> int:
        return self._position[out.request_id] * self.n + out.index

    def count_usage(self, choices: list[Choice]) -> None:
        prompt_tokens = sum(len(p.token_ids) for p in self.prompts)
        completion_tokens = sum(len(c.token_ids) for c in choices)
        self.usage.update(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


async def collect_choices(reply: Reply) -> list[Choice]:
    """Every output, assembled into the reply's choices; the usage counted."""
    choices = reply.choices()
    async for out in reply.handle:
        choices[reply.index(out)].add(out)
    if reply.handle.aborted:  # the client left: no usage to log
        return choices
    if reply.jobs[0].params.max_tokens == 0:  # scoring only: one engine sequence stands for every sample
        for i in range(len(reply.jobs)):
            for j in range(1, reply.n):
                choices[i * reply.n + j] = choices[i * reply.n]
    reply.count_usage(choices)
    return choices


def finish_reason(out: EngineOutput) -> str | None:
    return None if out.finish_reason is None else out.finish_reason.value


def output_entries(out: EngineOutput) -> list[LogprobEntry]:
    return [LogprobEntry(t, lp, top) for t, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs)]


def _completion_body(req: CompletionRequest, reply: Reply, choices: list[Choice]) -> dict:
    return {
        "id": reply.id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": reply.model_id,
        "usage": reply.usage,
        "choices": [_completion_choice(i, c, req, reply.model) for i, c in enumerate(choices)],
    }


def _completion_choice(index: int, c: Choice, req: CompletionRequest, model: ServedModel) -> dict:
    text = (c.prompt.text if req.echo else "") + c.text
    logprobs = None
    if req.logprobs is not None:
        entries = (prompt_entries(c.prompt.token_ids, c.prompt_logprobs) if req.echo else []) + c.entries
        logprobs = logprobs_object(entries, model.token_strings)
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason or "length"}


async def _completion_chunks(req: CompletionRequest, reply: Reply) -> AsyncIterator[bytes]:
    strings = reply.model.token_strings

    head = {"id": reply.id, "object": "text_completion", "created": reply.created, "model": reply.model_id}

    def chunk(choices: list[dict], **extra) -> bytes:
        return sse({**head, "choices": choices, **extra})

    choices = reply.choices()
    started: set[int] = set()
    async for out in reply.handle:
        index = reply.index(out)
        choice = choices[index]
        prefix, entries = "", []
        if index not in started and req.echo:
            prefix = choice.prompt.text
            if req.logprobs is not None:
                entries = prompt_entries(choice.prompt.token_ids, out.prompt_logprobs)
        started.add(index)
        choice.add(out)
        entries += output_entries(out)
        logprobs = logprobs_object(entries, strings) if req.logprobs is not None else None
        if prefix or out.text or out.token_ids or out.finished:
            text = prefix + out.text
            yield chunk([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(out)}])
    reply.count_usage(choices)
    if req.stream_options and req.stream_options.include_usage:
        yield chunk([], usage=reply.usage)
