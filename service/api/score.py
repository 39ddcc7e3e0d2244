"""`POST /v1/score`: log-likelihoods through the engine's scheduler, the native endpoint users curl.

Three forms:
- `text` (one or a list): every token's logprob (float32), optional top-N alternatives and the greedy
  flag, with sum, mean, perplexity and count. With `add_bos` (default) the text is scored after an EOS, so
  its first token is scored too (GPT-2 has no BOS; EOS is its document separator).
- `context` + `continuations`: per continuation its summed logprob, token count and whether it is the
  greedy continuation; the context is computed once and shared through the prefix cache.
- `text` + `rolling: true`: texts longer than the context, in overlapping windows with a stride (default
  half the context); each token is scored once with the most context its window gives. Returns the total
  log-likelihood, perplexity and bits per byte.
"""

import math
import time
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from model_store.windows import rolling_windows
from service.engine import EngineRequest, SamplingParams, TokenLogprob, TokenStrings
from service.serving import ModelServer, ServedModel

from .errors import APIError, invalid
from .protocol import MAX_PROMPTS, check_context, check_model, encode
from .schemas import ScoreRequest
from .streams import abort_on_disconnect, submit

router = APIRouter()
ROLLING_WINDOWS_IN_FLIGHT = 8  # windows of one rolling request queued at once, so the queue limit holds


@router.post("/v1/score")
async def score(req: ScoreRequest, request: Request) -> Response:
    server = request.app.state.server
    with server.lease() as lease:
        model = lease.model
        target = check_model(req.model, model)
        texts = _texts(req)
        _check_queue(req, texts, server.config.max_waiting_requests)
        scorer = _Scorer(request, server, model, _bos(req, model), _params(req), target.adapter)
        if req.context is not None:
            body = await _continuations(req, scorer)
        elif req.rolling:
            body = await _rolling(req, texts, scorer)
        else:
            body = await _texts_scores(req, texts, scorer)
    request.state.usage = body["usage"]
    return JSONResponse({"object": "score", "created": int(time.time()), "model": target.model_id, **body})


@dataclass(frozen=True)
class _Scorer:
    """Runs the scoring requests of one HTTP request: prompt logprobs of token sequences, through the engine."""

    request: Request
    server: ModelServer
    model: ServedModel
    bos: list[int]  # what every scored text starts with: [EOS] with add_bos, else nothing
    params: SamplingParams
    adapter: str | None = None  # the LoRA adapter the request named

    def job(self, token_ids: list[int], score_from: int, shares_prefix_with: str | None = None) -> EngineRequest:
        request_id = self.server.request_id("score")
        return EngineRequest(request_id, token_ids, self.params, score_from, shares_prefix_with, self.adapter)

    async def run(self, jobs: list[EngineRequest]) -> list[list[TokenLogprob]]:
        """Each job's scored prompt tokens; the jobs are queued together (all admitted, or a 429)."""
        position = {job.request_id: i for i, job in enumerate(jobs)}
        results: list[list[TokenLogprob]] = [[] for _ in jobs]
        handle = await submit(self.request, self.model, jobs)
        async with abort_on_disconnect(self.request, handle):
            async for out in handle:
                if out.prompt_logprobs is not None:
                    results[position[out.request_id]] = out.prompt_logprobs
        return results


def _texts(req: ScoreRequest) -> list[str]:
    if req.context is not None:
        if req.text is not None or req.rolling:
            raise invalid("give either text (optionally rolling) or context + continuations, not both", "context")
        if not req.continuations:
            raise invalid("context needs a non-empty list of continuations", "continuations")
        if len(req.continuations) > MAX_PROMPTS:
            raise invalid(f"{len(req.continuations)} continuations; the limit is {MAX_PROMPTS}", "continuations")
        return []
    if req.text is None:
        raise invalid("give text (a string or a list of strings) or context + continuations", "text")
    texts = [req.text] if isinstance(req.text, str) else req.text
    if not texts:
        raise invalid("the text list is empty", "text")
    if len(texts) > MAX_PROMPTS:
        raise invalid(f"{len(texts)} texts; the limit is {MAX_PROMPTS}", "text")
    return texts


def _check_queue(req: ScoreRequest, texts: list[str], limit: int) -> None:
    """Texts or continuations are queued all at once: more than MAX_WAITING_REQUESTS can never be
    admitted, so refuse them here (400) rather than answer a 429 that no retry cures. Rolling windows are
    queued a few at a time."""
    if req.context is not None:
        count, param = len(req.continuations or []), "continuations"
    elif not req.rolling:
        count, param = len(texts), "text"
    else:
        return
    if count > limit:
        raise invalid(f"{count} {param} in one request; this server queues at most {limit} at once", param)


def _bos(req: ScoreRequest, model: ServedModel) -> list[int]:
    if not req.add_bos:
        return []
    if model.eos_token_id is None:
        raise invalid("this model has no EOS token to score the first token after; use add_bos false", "add_bos")
    return [model.eos_token_id]


def _params(req: ScoreRequest) -> SamplingParams:
    return SamplingParams(max_tokens=0, prompt_logprobs=req.top_logprobs)


def _token_ids(text: str, scorer: _Scorer, param: str, limit: int | None) -> list[int]:
    bos = scorer.bos
    ids = bos + encode(scorer.model.tokenizer, text)
    if len(ids) < 2:
        raise invalid(
            "nothing to score: the text must have at least one token after the first"
            + ("" if bos else " (or use add_bos)"),
            param,
        )
    if limit is not None and len(ids) > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, the text has "
            f'{len(ids)} tokens{" with the EOS prefix" if bos else ""}. Use "rolling": true to score '
            "longer texts in windows.",
            param,
            "context_length_exceeded",
        )
    return ids


def _perplexity(total: float, count: int) -> float:
    return math.exp(min(-total / count, 709.0)) if count else 1.0  # capped below float overflow


def _entries(entries: list[TokenLogprob], strings: TokenStrings, top: int) -> dict:
    logprobs = [e.logprob for e in entries]
    total = sum(logprobs)
    body = {
        "num_tokens": len(entries),
        "sum_logprob": total,
        "mean_logprob": total / len(entries) if entries else 0.0,
        "perplexity": _perplexity(total, len(entries)),
        "greedy": all(e.greedy for e in entries),
        "tokens": [strings(e.token_id) for e in entries],
        "token_ids": [e.token_id for e in entries],
        "logprobs": logprobs,
        "is_greedy": [e.greedy for e in entries],
    }
    if top:
        body["top_logprobs"] = [
            [{"token": strings(t), "token_id": t, "logprob": lp} for t, lp in e.top] for e in entries
        ]
    return body


async def _texts_scores(req: ScoreRequest, texts: list[str], scorer: _Scorer) -> dict:
    many, model = not isinstance(req.text, str), scorer.model
    ids = [_token_ids(t, scorer, f"text[{i}]" if many else "text", model.max_model_len) for i, t in enumerate(texts)]
    results = await scorer.run([scorer.job(t, score_from=1) for t in ids])
    return {
        "results": [{"index": i, **_entries(r, model.token_strings, req.top_logprobs)} for i, r in enumerate(results)],
        "usage": {"prompt_tokens": sum(len(t) for t in ids), "scored_tokens": sum(len(r) for r in results)},
    }


async def _continuations(req: ScoreRequest, scorer: _Scorer) -> dict:
    model = scorer.model
    context = scorer.bos + encode(model.tokenizer, req.context)
    if not context:
        raise invalid("the context is empty: give some text, or keep add_bos", "context")
    jobs: list[EngineRequest] = []
    for i, continuation in enumerate(req.continuations):
        cont = encode(model.tokenizer, continuation)
        if not cont:
            raise invalid("a continuation is empty", f"continuations[{i}]")
        check_context(len(context), len(cont), model.max_model_len, f"continuations[{i}]")
        leader = jobs[0].request_id if jobs else None
        jobs.append(scorer.job(context + cont, score_from=len(context), shares_prefix_with=leader))
    results = await scorer.run(jobs)
    body = [
        {"index": i, "continuation": c, **_entries(r, model.token_strings, req.top_logprobs)}
        for i, (c, r) in enumerate(zip(req.continuations, results))
    ]
    prompt_tokens = len(context) + sum(len(j.prompt_token_ids) - len(context) for j in jobs)
    return {
        "context_tokens": len(context),
        "results": body,
        "usage": {"prompt_tokens": prompt_tokens, "scored_tokens": sum(len(r) for r in results)},
    }


async def _rolling(req: ScoreRequest, texts: list[str], scorer: _Scorer) -> dict:
    max_len = scorer.model.max_model_len
    stride = req.stride or max(max_len // 2, 1)
    if stride > max_len:
        raise invalid(f"stride {stride} exceeds the context length {max_len}", "stride")
    all_ids = [_token_ids(t, scorer, f"text[{i}]" if len(texts) > 1 else "text", None) for i, t in enumerate(texts)]
    # Windows start every `stride` tokens: a small stride multiplies the work by up to max_len. Cap it at
    # what the largest plain request may compute, MAX_PROMPTS full contexts.
    limit = MAX_PROMPTS * max_len
    work = sum((1 + -(-max(len(ids) - max_len, 0) // stride)) * min(len(ids), max_len) for ids in all_ids)
    if work > limit:
        raise invalid(
            f"rolling with stride {stride} computes about {work} tokens here; the limit is {limit} "
            f"({MAX_PROMPTS} full contexts): use a larger stride (default {max(max_len // 2, 1)}) or "
            "less text",
            "stride",
        )
    out, prompt_tokens = [], 0
    for i, (text, ids) in enumerate(zip(texts, all_ids)):
        windows = rolling_windows(len(ids), max_len, stride)
        scored: list[TokenLogprob] = []
        for start in range(0, len(windows), ROLLING_WINDOWS_IN_FLIGHT):
            batch = windows[start : start + ROLLING_WINDOWS_IN_FLIGHT]
            jobs = [scorer.job(ids[w.start : w.end], score_from=max(w.score_from, 1)) for w in batch]
            for result in await scorer.run(jobs):
                scored += result
            prompt_tokens += sum(len(j.prompt_token_ids) for j in jobs)
        total = sum(e.logprob for e in scored)
        num_bytes = len(text.encode("utf-8"))
        out.append(
            {
                "index": i,
                "num_tokens": len(scored),
                "num_windows": len(windows),
                "stride": stride,
                "sum_logprob": total,
                "mean_logprob": total / len(scored) if scored else 0.0,
                "perplexity": _perplexity(total, len(scored)),
                "num_bytes": num_bytes,
                "bits_per_byte": -total / math.log(2) / num_bytes if num_bytes else 0.0,
            }
        )
    return {
        "results": out,
        "usage": {"prompt_tokens": prompt_tokens, "scored_tokens": sum(r["num_tokens"] for r in out)},
    }
