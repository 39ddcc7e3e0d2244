"""The synchronous engine: step() = schedule -> run the model -> sample -> update requests.

Owns the requests in flight (per sequence: its generator, detokenizer and stop checker, indexed by request
id), decides when a sequence ends (EOS, stop token ids, max_tokens, the context), and turns each step into
plain `EngineOutput` deltas. It does no I/O and knows nothing of HTTP; the engine thread and the asyncio
facade (`async_engine.py`) drive it.
"""

import time
from dataclasses import dataclass

import torch

from service.model import KVCache, kernels
from service.model.loader import LoadedModel
from service.model.lora import Adapter

from . import cpu
from .detokenizer import IncrementalDetokenizer, StopChecker, TokenBytes
from .kv_cache import BlockManager
from .model_runner import ModelRunner, PromptScores
from .sampler import Sampler, SampleResult, SamplingRow, argmax_only, argmax_result, make_generator
from .scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from .sequence import Sequence
from .types import (
    EngineOutput,
    EngineRequest,
    FinishReason,
    RequestStats,
    StepStats,
    TokenLogprob,
    Unsupported,
)


@dataclass(frozen=True)
class EngineConfig:
    scheduler: SchedulerConfig = SchedulerConfig()
    kv_cache_bytes: int = 1 << 30
    block_size: int = 16
    seed: int | None = None
    num_threads: int | None = None  # CPU threads for torch; default: the cores this process may use
    compiled_kernels: bool = True  # build and use service.model.kernels where possible (else PyTorch only)
    quantization: str = "none"  # "int8": int8 weights for generation (scoring refused: see `scores_exact`)


@dataclass(eq=False)
class _OutputState:
    """What the engine keeps per sequence to turn its sampled tokens into outputs."""

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
        cpu.configure(config.num_threads)
        rows = min(64, config.scheduler.max_num_seqs)
        self.kernels = loaded.model.prepare_kernels(rows, config.quantization, config.compiled_kernels)
        bytes_per_block = KVCache.bytes_per_token(cfg, loaded.dtype) * config.block_size
        num_blocks = config.kv_cache_bytes // bytes_per_block
        assert num_blocks > 0, "kv_cache_bytes is too small for one block"
        self.loaded, self.config = loaded, config
        self.kv = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.runner = ModelRunner(loaded, num_blocks, config.block_size, config.compiled_kernels)
        self.sampler = Sampler(config.seed, _argmax_kernel(config, loaded.device))
        self.token_bytes = TokenBytes(loaded.tokenizer)
        self.eos_token_id = loaded.manifest.tokenizer.eos_token_id
        self.requests: dict[str, dict[int, _OutputState]] = {}  # request id -> sample index -> its state
        self.last_step: StepStats | None = None
        self.adapters: dict[str, Adapter] = {}  # LoRA adapters requests may name, by ref

    # -- LoRA adapters ----------------------------------------------------------------------------------------
    def add_adapter(self, adapter: Adapter) -> None:
        """Let requests name `adapter` (its weights in the model's dtype and device, shapes of this model)."""
        adapter.check(self.loaded.model.cfg)
        self.adapters[adapter.ref] = adapter

    def adapter_in_use(self, ref: str) -> bool:
        """Whether a request not yet finished runs with adapter `ref`."""
        seqs = (*self.scheduler.waiting, *self.scheduler.running)
        return any(seq.adapter is not None and seq.adapter.ref == ref for seq in seqs)

    def remove_adapter(self, ref: str) -> None:
        """Forget adapter `ref`; refused (ValueError) while a request runs with it."""
        if self.adapter_in_use(ref):
            raise ValueError(f"adapter {ref} is in use")
        self.adapters.pop(ref, None)

    def add(self, request: EngineRequest) -> None:
        """Queue a request (`EngineRequest` says what each field asks for). `params.n` samples share the
        prompt's KV; sample i is seeded with seed + i, so it equals an n = 1 request seeded with seed + i.
        Raises QueueFull / TooLarge / Unsupported before anything is recorded."""
        request_id, params, score_from = request.request_id, request.params, request.score_from
        assert request_id not in self.requests, f"duplicate request id {request_id}"
        if (params.prompt_logprobs is not None or score_from is not None) and not self.scores_exact:
            raise Unsupported(
                f"prompt scores need exact weights and this server runs QUANTIZATION={self.config.quantization}; "
                "score on a server without quantization"
            )
        adapter = None
        if request.adapter is not None:
            adapter = self.adapters.get(request.adapter)
            if adapter is None:
                raise Unsupported(f"adapter {request.adapter} is not loaded")
        if params.prompt_logprobs is not None and score_from is None:
            score_from = 1
        arrival, tokens = time.monotonic(), list(request.prompt_token_ids)
        first = Sequence(
            request_id,
            tokens,
            params,
            score_only=params.max_tokens == 0,
            score_from=score_from,
            arrival=arrival,
            adapter=adapter,
        )
        leader = self.requests.get(request.shares_prefix_with, {}).get(0)
        if leader is not None:
            first.waits_for, first.wait_tokens = leader.seq, _common_prefix(leader.seq.token_ids, tokens)
        samples = [first] + [
            Sequence(
                request_id,
                list(tokens),
                params,
                arrival=arrival,
                index=i,
                waits_for=first,
                wait_tokens=len(tokens),
                adapter=adapter,
            )
            for i in range(1, params.num_samples)
        ]
        self.scheduler.add(*samples)
        self.requests[request_id] = {seq.index: self._output_state(seq) for seq in samples}

    @property
    def scores_exact(self) -> bool:
        """Whether prompt scores (logprobs of given text) are the model's own: not under quantization."""
        return self.config.quantization == "none"

    def _output_state(self, seq: Sequence) -> _OutputState:
        seed = None if seq.params.seed is None else seq.params.seed + seq.index
        generator = make_generator(seed, self.loaded.device) if seed is not None else None
        return _OutputState(
            seq,
            generator,
            IncrementalDetokenizer(self.token_bytes),
            StopChecker(seq.params.stop),
            RequestStats(seq.arrival, seq.num_prompt_tokens),
            [] if seq.score_from is not None else None,
        )

    def abort(self, request_id: str) -> None:
        """Abort every sample of a request; its KV is free for the next step."""
        for state in self.requests.pop(request_id, {}).values():
            self.scheduler.finish(state.seq, FinishReason.ABORT)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[EngineOutput]:
        start = time.monotonic()
        batch = self.scheduler.schedule()
        if not batch:
            self.last_step = self.make_stats()
            return []
        for seq in batch.seqs:
            stats = self._state(seq).stats
            stats.first_scheduled = stats.first_scheduled or start
        outputs = self._run_batch(batch)
        self.last_step = self.make_stats(batch, time.monotonic() - start)
        return outputs

    def make_stats(self, batch: ScheduledBatch | None = None, duration_s: float = 0.0) -> StepStats:
        """Running, waiting and KV usage now, with what `batch` computed (none: a step that computed nothing)."""
        batch = batch or ScheduledBatch()
        return StepStats(
            num_seqs=len(batch.seqs),
            num_tokens=batch.num_tokens,
            num_preempted=len(batch.preempted),
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_usage=self.kv.usage,
            duration_s=duration_s,
        )

    def _state(self, seq: Sequence) -> _OutputState:
        return self.requests[seq.request_id][seq.index]

    def _drop(self, seq: Sequence) -> _OutputState:
        """Forget a finished sequence, and its request once every sample has finished."""
        samples = self.requests[seq.request_id]
        state = samples.pop(seq.index)
        if not samples:
            del self.requests[seq.request_id]
        return state

    def _run_batch(self, batch: ScheduledBatch) -> list[EngineOutput]:
        """Run the model on the batch, record what it computed, sample, and turn the results into outputs."""
        plain = all(argmax_only(s.params, self._banned(s)) for s in batch.seqs if not s.score_only)
        result = self.runner.run(batch, argmax_only=plain)
        for seq, scores in zip(batch.seqs, result.prompt_scores):
            if scores is not None:
                self._record_prompt_logprobs(seq, scores)
        self.scheduler.record_computed(batch)
        outputs = [self._finish_scoring(s) for s in batch.seqs if s.score_only and s.num_uncomputed == 0]
        sampling = [(s, r) for s, r in zip(batch.seqs, result.last_rows) if r is not None and not s.score_only]
        if sampling and result.argmax_ids is not None:
            sampled = argmax_result([result.argmax_ids[r] for _, r in sampling])
            outputs += [self._update(s, i, sampled) for i, (s, _) in enumerate(sampling)]
        elif sampling:
            rows = [
                SamplingRow(
                    s.params,
                    self._state(s).generator,
                    s.token_ids[: s.num_prompt_tokens],
                    s.output_token_ids,
                    self._banned(s),
                )
                for s, _ in sampling
            ]
            logits = result.last_logits  # (num_complete, vocab): all of them sample, unless some only score
            if len(sampling) < logits.shape[0]:
                logits = logits[torch.tensor([r for _, r in sampling], device=logits.device)]
            sampled = self.sampler(logits, rows)
            outputs += [self._update(s, i, sampled) for i, (s, _) in enumerate(sampling)]
        return outputs

    def _record_prompt_logprobs(self, seq: Sequence, scores: PromptScores) -> None:
        """Positions scores.first.. predict prompt tokens first+1..; skip the ones already recorded (a
        preempted sequence recomputes positions it already scored)."""
        state = self._state(seq)
        skip = seq.score_from + len(state.prompt_logprobs) - (scores.first + 1)  # chunks arrive in order
        assert skip >= 0
        columns = (scores.targets, scores.chosen, scores.top_ids, scores.top_logprobs, scores.greedy)
        for tok, lp, ids, lps, g in zip(*(c[skip:].tolist() for c in columns)):
            state.prompt_logprobs.append(TokenLogprob(tok, lp, tuple(zip(ids, lps)), g))

    def _finish_scoring(self, seq: Sequence) -> EngineOutput:
        state = self._drop(seq)
        self.scheduler.finish(seq, FinishReason.LENGTH)
        return EngineOutput(
            seq.request_id,
            [],
            "",
            finish_reason=FinishReason.LENGTH,
            prompt_logprobs=state.prompt_logprobs,
            stats=self._final_stats(state),
        )

    def _update(self, seq: Sequence, i: int, sampled: SampleResult) -> EngineOutput:
        state = self._state(seq)
        token = sampled.token_ids[i]
        seq.token_ids.append(token)
        state.stats.token(time.monotonic())
        text, stopped = state.stop.push(state.detok.add(token))
        reason = FinishReason.STOP if stopped else self._finish_reason(seq, token)
        if reason is not None and not stopped:
            text += self._flush(state)
        out = EngineOutput(
            seq.request_id, [token], text, seq.index, [sampled.logprobs[i]], [sampled.top_logprobs[i]], reason
        )
        if not state.sent_prompt_logprobs:
            out.prompt_logprobs, state.sent_prompt_logprobs = state.prompt_logprobs, True
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self._drop(seq)
            out.stats = self._final_stats(state)
        return out

    @staticmethod
    def _final_stats(state: _OutputState) -> RequestStats:
        state.stats.num_cached_tokens = state.seq.num_cached_tokens
        state.stats.num_preemptions = state.seq.num_preemptions
        return state.stats

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
    def _flush(state: _OutputState) -> str:
        text, stopped = state.stop.push(state.detok.flush())
        return text if stopped else text + state.stop.flush()


def _argmax_kernel(config: EngineConfig, device: torch.device):
    module = kernels.logit_rows() if config.compiled_kernels and device.type == "cpu" else None
    return module.argmax_rows if module is not None else None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
