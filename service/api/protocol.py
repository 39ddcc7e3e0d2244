"""Between the OpenAI wire format and the engine: prompts to token ids, request fields to `SamplingParams`
(with every model- and configuration-dependent check, one exact message per rule), and engine outputs to
the legacy-completions `logprobs` object. Parse at the edge: the engine trusts what this module hands it.
"""

from dataclasses import dataclass

from tokenizers import Tokenizer

from service.config import ServiceConfig
from service.engine import SamplingParams, TokenLogprob, TokenStrings
from service.serving import ServedModel

from .errors import APIError, invalid
from .schemas import _Sampling

MAX_STOP_LENGTH = 512  # characters per stop string
MAX_PROMPTS = 1024  # prompts in one request


@dataclass(frozen=True)
class PromptInput:
    token_ids: list[int]
    text: str  # the prompt as text: as given, or decoded from the given ids (for echo)


def encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool = False) -> list[int]:
    """GPT-2 style: no BOS is added; special tokens written in the text (`<|endoftext|>`) map to their id.
    `add_special_tokens` applies the tokenizer's post-processor (which adds nothing for GPT-2's own)."""
    return tokenizer.encode(text, add_special_tokens=add_special_tokens).ids


def prompt_inputs(prompt, tokenizer: Tokenizer, vocab_size: int, param: str = "prompt") -> list[PromptInput]:
    """`prompt` as a string, list of strings, token ids or list of token-id lists -> one input per prompt."""
    if isinstance(prompt, str):
        items: list = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [list(prompt)]
    else:
        items = list(prompt)
    if not items:
        raise invalid("the prompt list is empty", param)
    if len(items) > MAX_PROMPTS:
        raise invalid(f"{len(items)} prompts in one request; the limit is {MAX_PROMPTS}", param)
    inputs = []
    for i, item in enumerate(items):
        where = param if len(items) == 1 else f"{param}[{i}]"
        if isinstance(item, str):
            ids, text = encode(tokenizer, item), item
        else:
            bad = [t for t in item if not 0 <= t < vocab_size]
            if bad:
                raise invalid(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", where)
            ids, text = list(item), tokenizer.decode(list(item), skip_special_tokens=False)
        if not ids:
            raise invalid("the prompt is empty: it must contain at least one token", where)
        inputs.append(PromptInput(ids, text))
    return inputs


@dataclass(frozen=True)
class Target:
    """What a request's `model` names: the served model (`adapter` None) or one of its LoRA adapters; its
    `model_id` is what the response reports."""

    model_id: str
    adapter: str | None = None


def check_model(name: str | None, model: ServedModel) -> Target:
    """A request may name the served model as `name`, `name@version` or not at all, or one of its adapters
    as `name@version` or `name` (its highest version served)."""
    if not name or name in (model.name, model.model_id):
        return Target(model.model_id)
    named = [a for a in model.adapters.values() if name in (a.name, a.model_id)]
    if named:
        adapter = model.use_adapter(max(named, key=lambda a: a.version).model_id).model_id
        return Target(adapter, adapter)
    served = ", ".join(repr(i) for i in (model.model_id, *model.adapters))
    raise APIError(404, f"model {name!r} is not served here; this server serves {served}", "model", "model_not_found")


def check_context(prompt_len: int, max_tokens: int, max_model_len: int, param: str = "max_tokens") -> None:
    if prompt_len + max_tokens > max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} "
            f"for the completion). Please reduce the prompt or the completion length.",
            param,
            "context_length_exceeded",
        )


def sampling_params(
    req: _Sampling,
    config: ServiceConfig,
    vocab_size: int,
    *,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None,
) -> SamplingParams:
    """Request fields -> engine parameters, after the checks that depend on the model or the config."""
    if req.n > config.max_n:
        raise invalid(f"n is {req.n}; this server allows at most {config.max_n}", "n")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > config.max_stop:
        raise invalid(f"{len(stop)} stop strings; this server allows at most {config.max_stop}", "stop")
    if any(not s for s in stop):
        raise invalid("stop strings must not be empty", "stop")
    if any(len(s) > MAX_STOP_LENGTH for s in stop):
        raise invalid(f"stop strings must be at most {MAX_STOP_LENGTH} characters", "stop")
    stop_ids = list(req.stop_token_ids or [])
    if len(stop_ids) > config.max_stop:
        raise invalid(f"{len(stop_ids)} stop token ids; this server allows at most {config.max_stop}", "stop_token_ids")
    if any(not 0 <= t < vocab_size for t in stop_ids):
        raise invalid(f"stop_token_ids must be in [0, {vocab_size})", "stop_token_ids")
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise invalid(f"logit_bias keys must be token ids, got {key[:40]!r}", "logit_bias") from None
        if not 0 <= token < vocab_size:
            raise invalid(f"logit_bias token id {token} is outside the vocabulary [0, {vocab_size})", "logit_bias")
        bias[token] = value
    if req.min_tokens > max_tokens:
        raise invalid(f"min_tokens ({req.min_tokens}) exceeds max_tokens ({max_tokens})", "min_tokens")
    return SamplingParams(
        temperature=req.temperature,
        top_k=max(req.top_k, 0),
        top_p=req.top_p,
        min_p=req.min_p,
        repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        logit_bias=bias,
        seed=req.seed,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        stop=tuple(stop),
        stop_token_ids=tuple(stop_ids),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        n=req.n,
    )


@dataclass
class LogprobEntry:
    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] | None


def prompt_entries(prompt_ids: list[int], scored: list[TokenLogprob] | None) -> list[LogprobEntry]:
    """The echoed prompt's entries: the first token has no logprob (nothing precedes it)."""
    entries = [LogprobEntry(prompt_ids[0], None, None)]
    entries += [LogprobEntry(e.token_id, e.logprob, list(e.top)) for e in scored or []]
    return entries


def logprobs_object(entries: list[LogprobEntry], strings: TokenStrings, text_start: int = 0) -> dict:
    """The legacy completions `logprobs`: tokens, token_logprobs, top_logprobs (dicts that always hold the
    argmax token, so a client can tell whether a token was the greedy choice), text_offset."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    raw, offset = b"", text_start
    for entry in entries:
        offsets.append(offset)
        tokens.append(strings(entry.token_id))
        token_logprobs.append(entry.logprob)
        if entry.top is None:
            top_logprobs.append(None)
        else:
            top: dict[str, float] = {}
            for token_id, lp in entry.top:
                key = strings(token_id)
                top[key] = max(lp, top.get(key, lp))  # distinct ids can share a display string
            top_logprobs.append(top)
        before = len(raw.decode("utf-8", errors="ignore"))
        raw += strings.raw(entry.token_id)
        offset += len(raw.decode("utf-8", errors="ignore")) - before
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}
