"""`POST /v1/chat/completions`: OpenAI-compatible chat, streaming or not, and chat messages to prompt token
ids: the model's chat template when its tokenizer has one (rendered in a sandbox, as transformers does),
else the DialoGPT convention: each turn's text followed by EOS, so the model continues with the next
(assistant) turn.
"""

import time
from collections.abc import AsyncIterator
from functools import lru_cache

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from service.engine import EngineRequest
from service.serving import ServedModel

from .completions import Choice, Reply, collect_choices, finish_reason, max_new_tokens, output_entries, submit_reply
from .errors import invalid
from .protocol import LogprobEntry, PromptInput, check_model, encode, sampling_params
from .schemas import ChatCompletionRequest, ChatMessage
from .streams import EventStream, abort_on_disconnect, sse

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
    server = request.app.state.server
    with server.lease() as lease:
        model = lease.model
        target = check_model(req.model, model)
        ids = chat_prompt(req.messages, model)
        max_tokens = max_new_tokens(req.max_completion_tokens or req.max_tokens, len(ids), model.max_model_len, False)
        top = (req.top_logprobs or 0) if req.logprobs else None  # `logprobs: true` alone: each token's own
        params = sampling_params(
            req, server.config, model.vocab_size, max_tokens=max_tokens, logprobs=top, prompt_logprobs=None
        )
        jobs = [EngineRequest(server.request_id("chatcmpl"), ids, params, adapter=target.adapter)]
        reply = await submit_reply(request, model, [PromptInput(ids, "")], jobs, req.n, target.model_id)
        if req.stream:
            return EventStream(_chat_chunks(req, reply), lease.hand_over(), reply.handle)
        async with abort_on_disconnect(request, reply.handle):
            choices = await collect_choices(reply)
    return JSONResponse(_chat_body(req, reply, choices))


@lru_cache(maxsize=8)
def _template(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(source)


def chat_prompt(messages: list[ChatMessage], model: ServedModel) -> list[int]:
    tokenizer, eos_id = model.tokenizer, model.eos_token_id
    eos = tokenizer.id_to_token(eos_id) if eos_id is not None else None
    if model.chat_template:
        try:
            text = _template(model.chat_template).render(
                messages=[m.model_dump() for m in messages],
                add_generation_prompt=True,
                eos_token=eos or "",
                bos_token=eos or "",
            )
        except (TemplateError, ArithmeticError, LookupError, TypeError, ValueError) as exc:
            # A sandbox refusal (SecurityError is a TemplateError), an over-long range() (OverflowError), a
            # template indexing or calling what these messages lack: the template cannot render them.
            raise invalid(f"the model's chat template failed on these messages: {exc}", "messages") from None
        ids = encode(tokenizer, text)
    else:
        if eos_id is None:
            raise invalid("this model has neither a chat template nor an EOS token to join turns", "messages")
        ids = []
        for message in messages:
            ids += encode(tokenizer, message.content) + [eos_id]
    if not ids:
        raise invalid("the messages encode to no tokens", "messages")
    return ids


def _chat_body(req: ChatCompletionRequest, reply: Reply, choices: list[Choice]) -> dict:
    return {
        "id": reply.id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": reply.model_id,
        "usage": reply.usage,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": _chat_logprobs(c.entries, reply.model) if req.logprobs else None,
                "finish_reason": c.finish_reason or "length",
            }
            for i, c in enumerate(choices)
        ],
    }


def _chat_logprobs(entries: list[LogprobEntry], model: ServedModel) -> dict:
    strings = model.token_strings
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


async def _chat_chunks(req: ChatCompletionRequest, reply: Reply) -> AsyncIterator[bytes]:
    head = {"id": reply.id, "object": "chat.completion.chunk", "created": reply.created, "model": reply.model_id}

    def chunk(choices: list[dict], **extra) -> bytes:
        return sse({**head, "choices": choices, **extra})

    def delta(index: int, content: dict, reason: str | None, logprobs: dict | None = None) -> dict:
        return {"index": index, "delta": content, "logprobs": logprobs, "finish_reason": reason}

    choices = reply.choices()
    for i in range(req.n):
        yield chunk([delta(i, {"role": "assistant", "content": ""}, None)])
    pending: dict[int, list] = {}  # logprob entries of tokens whose text is held back (part of a character)
    async for out in reply.handle:
        choices[out.index].add(out)
        if req.logprobs:
            pending.setdefault(out.index, []).extend(output_entries(out))
        if out.text or out.finished:
            content = {"content": out.text} if out.text else {}
            logprobs = _chat_logprobs(pending.pop(out.index, []), reply.model) if req.logprobs else None
            yield chunk([delta(out.index, content, finish_reason(out), logprobs)])
    reply.count_usage(choices)
    if req.stream_options and req.stream_options.include_usage:
        yield chunk([], usage=reply.usage)
