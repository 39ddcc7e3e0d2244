"""The synchronous engine: step() = schedule -> run the model -> sample -> update requests.

Owns the requests in flight (their sequence, generator, detokenizer and stop checker) and turns each
step into plain `EngineOutput` deltas. It does no I/O and knows nothing of HTTP; the engine thread and the
asyncio facade drive it.
"""

import time
from dataclasses import dataclass, field

import torch

from service.model.loader import LoadedModel

from .detokenizer import IncrementalDetokenizer, StopChecker, TokenBytes
from .kv_cache import BlockManager
from .model_runner import ModelRunner
from .sampler import Sampler, SamplingRow, make_generator
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Sequence
from .types import FinishReason, SamplingParams


@dataclass(frozen=True)
class EngineConfig:
    scheduler: SchedulerConfig = SchedulerConfig()
    kv_cache_bytes: int = 1 << 30
    block_size: int = 16
    seed: int | None = None


@dataclass
class EngineOutput:
    """What one request gained this step. `text` never ends in half a character or part of a stop string."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    finish_reason: FinishReason | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class _Request:
    seq: Sequence
    generator: torch.Generator | None
    detok: IncrementalDetokenizer
    stop: StopChecker


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig = EngineConfig()) -> None:
        cfg = loaded.model.cfg
        bytes_per_block = 2 * cfg.n_layer * cfg.n_embd * loaded.dtype.itemsize * config.block_size
        num_blocks = config.kv_cache_bytes // bytes_per_block
        assert num_blocks > 0, "kv_cache_bytes is too small for one block"
        self.loaded, self.config = loaded, config
        self.kv = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.runner = ModelRunner(loaded, num_blocks, config.block_size)
        self.sampler = Sampler(config.seed)
        self.token_bytes = TokenBytes(loaded.tokenizer)
        self.eos_token_id = loaded.manifest.tokenizer.eos_token_id
        self.requests: dict[str, _Request] = {}

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        assert request_id not in self.requests, f"duplicate request id {request_id}"
        seq = Sequence(request_id, list(prompt_token_ids), params, arrival=time.monotonic())
        self.scheduler.add(seq)  # raises QueueFull / TooLarge before anything is recorded
        generator = make_generator(params.seed, self.loaded.device) if params.seed is not None else None
        self.requests[request_id] = _Request(seq, generator, IncrementalDetokenizer(self.token_bytes), StopChecker(params.stop))

    def abort(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is not None:
            self.scheduler.finish(request.seq, FinishReason.ABORT)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[EngineOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        result = self.runner.run(batch)
        self.scheduler.computed(batch)
        sampling = [(s, logits) for s, logits in zip(batch.seqs, result.last_logits) if logits is not None]
        if not sampling:
            return []
        rows = [SamplingRow(s.params, self.requests[s.request_id].generator, s.token_ids[: s.num_prompt_tokens], s.output_token_ids) for s, _ in sampling]
        sampled = self.sampler(torch.stack([logits for _, logits in sampling]), rows)
        return [self._update(s, i, sampled) for i, (s, _) in enumerate(sampling)]

    def _update(self, seq: Sequence, i: int, sampled) -> EngineOutput:
        request = self.requests[seq.request_id]
        token = sampled.token_ids[i]
        seq.token_ids.append(token)
        text, stopped = request.stop.push(request.detok.add(token))
        reason = FinishReason.STOP if stopped else self._finish_reason(seq, token)
        if reason is not None and not stopped:
            text += self._flush(request)
        out = EngineOutput(seq.request_id, [token], text, [sampled.logprobs[i]], [sampled.top_logprobs[i]], reason)
        if reason is not None:
            self.scheduler.finish(seq, reason)
            del self.requests[seq.request_id]
        return out

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
