"""Plain data that crosses the engine's boundaries: what a request asks for, and what comes back.

Owns the request-level vocabulary (sampling parameters, finish reasons). Validation of user input is the
API layer's job; these types assert nothing beyond what the engine relies on.
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
