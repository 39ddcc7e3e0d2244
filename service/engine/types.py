"""Plain data that crosses the engine's boundaries: what a request asks for, what comes back, and how it
can fail.

Owns the request-level vocabulary: `EngineRequest` (token ids and `SamplingParams`), `EngineOutput` (what
a request gained in one step), finish reasons, statistics for metrics, and the engine's errors (`QueueFull`,
`TooLarge`, `EngineDead`). Validation of user input is the API layer's job; these types assert nothing
beyond what the engine relies on.
"""

from dataclasses import dataclass, field
from enum import Enum

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling and stopping. temperature 0 means greedy; top_k 0 and top_p 1 mean off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N alternatives per generated token (0..MAX_LOGPROBS); None = none
    prompt_logprobs: int | None = None  # same, per prompt position
    n: int = 1

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def num_samples(self) -> int:
        """Sequences this request runs: `n`, or one when it only scores its prompt (max_tokens 0)."""
        return 1 if self.max_tokens == 0 else self.n


@dataclass(frozen=True)
class EngineRequest:
    """One request as the engine takes it. `max_tokens == 0` scores the prompt without generating. With
    `params.prompt_logprobs` set, logprobs of prompt tokens from `score_from` (default 1) are returned;
    tokens before `score_from` may be served from the prefix cache (context + continuation scoring). With
    `shares_prefix_with` naming a request still in flight, this one waits until that request has computed
    the prompt prefix they share, so the prefix is computed once (several continuations of one context).
    With `adapter` naming a LoRA adapter the engine holds (`Engine.add_adapter`), the request runs on the
    base with that adapter, in the same steps as every other request."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    score_from: int | None = None
    shares_prefix_with: str | None = None
    adapter: str | None = None


class FinishReason(str, Enum):
    """The one internal finish status; the API maps it to OpenAI's `finish_reason` once."""

    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # the client went away or the request was cancelled
    ERROR = "error"


@dataclass(frozen=True)
class TokenLogprob:
    """A prompt token's float32 logprob given everything before it, its top-N alternatives, and whether
    it is the model's greedy choice at that position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    greedy: bool


@dataclass
class RequestStats:
    """Per-request timings (time.monotonic seconds) and counts, for metrics; final on the last output."""

    arrival: float
    num_prompt_tokens: int
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    inter_token_latencies: list[float] = field(default_factory=list)
    num_generated_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled is None else self.first_scheduled - self.arrival

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    def token(self, now: float) -> None:
        if self.first_token is None:
            self.first_token = now
        else:
            self.inter_token_latencies.append(now - self.last_token)
        self.last_token = now
        self.num_generated_tokens += 1


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


class QueueFull(Exception):
    """The waiting queue is at its limit: the caller should retry later (HTTP 429)."""


class TooLarge(Exception):
    """The request could not fit in KV memory even alone (HTTP 400)."""


class Unsupported(Exception):
    """The request asks for what this engine's configuration cannot give (HTTP 400): prompt scores under
    int8 quantization, whose scores would not be exact."""


class EngineDead(RuntimeError):
    """The engine thread failed or was stopped; in-flight and new requests get this."""


@dataclass(frozen=True)
class StepStats:
    """One engine step, for metrics."""

    num_seqs: int
    num_tokens: int
    num_preempted: int
    num_running: int
    num_waiting: int
    kv_usage: float
    duration_s: float
