"""The synchronous engine: step() = schedule -> run the model -> sample -> update requests.

Owns the requests in flight (their sequence, generator, detokenizer and stop checker) and turns each
step into plain `EngineOutput` deltas. It does no I/O and knows nothing of HTTP; the engine thread and the
asyncio facade drive it.
"""

import os
import time
from dataclasses import dataclass, field

import torch

from service.model import KVCache
from service.model.loader import LoadedModel

from .detokenizer import IncrementalDetokenizer, StopChecker, TokenBytes
from .kv_cache import BlockManager
from .model_runner import ModelRunner
from .sampler import Sampler, SamplingRow, logprobs_topn, make_generator
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Sequence
from .types import FinishReason, RequestStats, SamplingParams, StepStats, TokenLogprob


@dataclass(frozen=True)
class EngineConfig:
    scheduler: SchedulerConfig = SchedulerConfig()
    kv_cache_bytes: int = 1 << 30
    block_size: int = 16
    seed: int | None = None
    num_threads: int | None = None  # CPU threads for torch; default: the cores this process may use


@dataclass
class EngineOutput:
    """What one request gained this step. `text` never ends in half a character or part of a stop string."""

    request_id: str
    token_ids: list[int]
    text: str
    index: int = 0  # which of the request's `n` samples
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    # On the request's first output only, when prompt logprobs were asked for: one entry per prompt token
    # from `score_from` on (the first prompt token has none: nothing precedes it).
    prompt_logprobs: list[TokenLogprob] | None = None
    stats: RequestStats | None = None  # on the final output only

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class _Request:
    seq: Sequence
    generator: torch.Generator | None
    detok: IncrementalDetokenizer
    stop: StopChecker
    stats: RequestStats
    prompt_logprobs: list[TokenLogprob] | None = None
    sent_prompt_logprobs: bool = False


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig = EngineConfig()) -> None:
        cfg = loaded.model.cfg
        torch.set_num_threads(config.num_threads or len(os.sched_getaffinity(0)))
        loaded.model.choose_layout(rows=min(64, config.scheduler.max_num_seqs))
        bytes_per_block = KVCache.bytes_per_token(cfg, loaded.dtype) * config.block_size
        num_blocks = config.kv_cache_bytes // bytes_per_block
        assert num_blocks > 0, "kv_cache_bytes is too small for one block"
        self.loaded, self.config = loaded, config
        self.kv = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.runner = ModelRunner(loaded, num_blocks, config.block_size)
        self.sampler = Sampler(config.seed)
        self.token_bytes = TokenBytes(loaded.tokenizer)
        self.eos_token_id = loaded.manifest.tokenizer.eos_token_id
        self.requests: dict[tuple[str, int], _Request] = {}  # by (request id, sample index)
        self.last_step: StepStats | None = None

    def add(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        score_from: int | None = None,
        shares_prefix_with: str | None = None,
    ) -> None:
        """Queue a request. `max_tokens == 0` scores the prompt without generating. With
        `params.prompt_logprobs` set, logprobs of prompt tokens from `score_from` (default 1) are returned
        (with sample 0's outputs); tokens before `score_from` may be served from the prefix cache (context +
        continuation scoring). `params.n` samples share the prompt's KV; sample i is seeded with seed + i,
        so it equals an n = 1 request seeded with seed + i. With `shares_prefix_with` naming a request
        still in flight, this one waits until that request has computed the prompt prefix they share, so
        the prefix is computed once (several continuations of one context)."""
        assert all(key[0] != request_id for key in self.requests), f"duplicate request id {request_id}"
        if params.prompt_logprobs is not None and score_from is None:
            score_from = 1
        arrival, tokens = time.monotonic(), list(prompt_token_ids)
        first = Sequence(
            request_id, tokens, params, score_only=params.max_tokens == 0, score_from=score_from, arrival=arrival
        )
        leader = self.requests.get((shares_prefix_with, 0)) if shares_prefix_with is not None else None
        if leader is not None:
            first.waits_for, first.wait_tokens = leader.seq, _common_prefix(leader.seq.token_ids, tokens)
        samples = [first] + [
            Sequence(
                request_id, list(tokens), params, arrival=arrival, index=i, waits_for=first, wait_tokens=len(tokens)
            )
            for i in range(1, params.num_samples)
        ]
        self.scheduler.add(*samples)  # raises QueueFull / TooLarge before anything is recorded
        for seq in samples:
            seed = None if params.seed is None else params.seed + seq.index
            generator = make_generator(seed, self.loaded.device) if seed is not None else None
            stats = RequestStats(seq.arrival, seq.num_prompt_tokens)
            self.requests[seq.key] = _Request(
                seq,
                generator,
                IncrementalDetokenizer(self.token_bytes),
                StopChecker(params.stop),
                stats,
                [] if seq.score_from is not None else None,
            )

    def abort(self, request_id: str) -> None:
        """Abort every sample of a request; its KV is free for the next step."""
        for key in [key for key in self.requests if key[0] == request_id]:
            self.scheduler.finish(self.requests.pop(key).seq, FinishReason.ABORT)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[EngineOutput]:
        start = time.monotonic()
        batch = self.scheduler.schedule()
        if not batch:
            self.last_step = self.state()
            return []
        for seq in batch.seqs:
            stats = self.requests[seq.key].stats
            stats.first_scheduled = stats.first_scheduled or start
        outputs = self._run(batch)
        self.last_step = self.state(len(batch.seqs), batch.num_tokens, len(batch.preempted), time.monotonic() - start)
        return outputs

    def state(
        self, num_seqs: int = 0, num_tokens: int = 0, num_preempted: int = 0, duration_s: float = 0.0
    ) -> StepStats:
        """Running, waiting and KV usage now; with the defaults, a step that computed nothing."""
        return StepStats(
            num_seqs,
            num_tokens,
            num_preempted,
            len(self.scheduler.running),
            len(self.scheduler.waiting),
            self.kv.usage,
            duration_s,
        )

    def _run(self, batch) -> list[EngineOutput]:
        result = self.runner.run(batch)
        for seq, chunk in zip(batch.seqs, result.prompt_logits):
            if chunk is not None:
                self._record_prompt_logprobs(seq, *chunk)
        self.scheduler.computed(batch)
        outputs = [self._finish_scoring(s) for s in batch.seqs if s.score_only and s.num_uncomputed == 0]
        sampling = [(s, lg) for s, lg in zip(batch.seqs, result.last_logits) if lg is not None and not s.score_only]
        if sampling:
            rows = [
                SamplingRow(
                    s.params,
                    self.requests[s.key].generator,
                    s.token_ids[: s.num_prompt_tokens],
                    s.output_token_ids,
                    self._banned(s),
                )
                for s, _ in sampling
            ]
            sampled = self.sampler(torch.stack([logits for _, logits in sampling]), rows)
            outputs += [self._update(s, i, sampled) for i, (s, _) in enumerate(sampling)]
        return outputs

    def _record_prompt_logprobs(self, seq: Sequence, first: int, logits: torch.Tensor) -> None:
        """Logits at positions first.. predict prompt tokens first+1..; skip the ones already recorded
        (a preempted sequence recomputes positions it already scored)."""
        request = self.requests[seq.key]
        skip = seq.score_from + len(request.prompt_logprobs) - (first + 1)  # chunks arrive in order: no gaps
        assert skip >= 0
        logits = logits[skip:]
        targets = torch.tensor(seq.token_ids[first + 1 + skip : first + 1 + skip + len(logits)], device=logits.device)
        chosen, top_ids, top_lps = logprobs_topn(logits, targets, seq.params.prompt_logprobs or 0)
        greedy = (logits.argmax(-1) == targets).tolist()
        for tok, lp, ids, lps, g in zip(targets.tolist(), chosen.tolist(), top_ids.tolist(), top_lps.tolist(), greedy):
            request.prompt_logprobs.append(TokenLogprob(tok, lp, tuple(zip(ids, lps)), g))

    def _finish_scoring(self, seq: Sequence) -> EngineOutput:
        request = self.requests.pop(seq.key)
        self.scheduler.finish(seq, FinishReason.LENGTH)
        return EngineOutput(
            seq.request_id,
            [],
            "",
            finish_reason=FinishReason.LENGTH,
            prompt_logprobs=request.prompt_logprobs,
            stats=self._final_stats(request),
        )

    def _update(self, seq: Sequence, i: int, sampled) -> EngineOutput:
        request = self.requests[seq.key]
        token = sampled.token_ids[i]
        seq.token_ids.append(token)
        request.stats.token(time.monotonic())
        text, stopped = request.stop.push(request.detok.add(token))
        reason = FinishReason.STOP if stopped else self._finish_reason(seq, token)
        if reason is not None and not stopped:
            text += self._flush(request)
        out = EngineOutput(
            seq.request_id, [token], text, seq.index, [sampled.logprobs[i]], [sampled.top_logprobs[i]], reason
        )
        if not request.sent_prompt_logprobs:
            out.prompt_logprobs, request.sent_prompt_logprobs = request.prompt_logprobs, True
        if reason is not None:
            self.scheduler.finish(seq, reason)
            del self.requests[seq.key]
            out.stats = self._final_stats(request)
        return out

    @staticmethod
    def _final_stats(request: _Request) -> RequestStats:
        request.stats.num_cached_tokens = request.seq.num_cached_tokens
        request.stats.num_preemptions = request.seq.num_preemptions
        return request.stats

    def _banned(self, seq: Sequence) -> tuple[int, ...]:
        """Before min_tokens, the tokens that would end the request are masked (vLLM's rule), so they
        neither stop it nor appear in its output."""
        if seq.num_output_tokens >= seq.params.min_tokens:
            return ()
        eos = () if seq.params.ignore_eos or self.eos_token_id is None else (self.eos_token_id,)
        return eos + tuple(seq.params.stop_token_ids)

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            if (token == self.eos_token_id and not p.ignore_eos) or token in p.stop_token_ids:
                return FinishReason.STOP
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.scheduler.config.max_model_len:
            return FinishReason.LENGTH
        return None

    @staticmethod
    def _flush(request: _Request) -> str:
        text, stopped = request.stop.push(request.detok.flush())
        return text if stopped else text + request.stop.flush()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
