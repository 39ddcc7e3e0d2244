"""One sequence's progress through the engine: its tokens, how many have KV computed, and its blocks.

Owns per-sequence state only. The scheduler moves sequences between waiting and running and decides how
many tokens each computes per step; the KV manager owns the blocks listed in `table`.
"""

from dataclasses import dataclass, field
from enum import Enum

from service.model.lora import Adapter

from .kv_cache import BlockTable, adapter_root
from .types import FinishReason, SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """`token_ids` is prompt + output so far. Tokens [0, num_computed_tokens) have KV in `table`.

    A scoring sequence (`score_only`) computes its prompt and finishes without generating. When
    `score_from` is set, the logprob of every prompt token from that index on is wanted, so positions
    before it may come from the prefix cache but the ones after it must be computed.

    A sequence with `waits_for` set is not admitted until that sequence has computed its first
    `wait_tokens` tokens (or finished), so that its admission finds them in the prefix cache and shares
    them: samples 1.. of an `n > 1` request wait for sample 0's prompt, continuations for a context.
    """

    request_id: str
    token_ids: list[int]
    params: SamplingParams
    score_only: bool = False
    score_from: int | None = None
    arrival: float = 0.0
    num_prompt_tokens: int = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens reused from the prefix cache (stats)
    num_preemptions: int = 0
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    table: BlockTable = field(default_factory=BlockTable)
    index: int = 0
    waits_for: "Sequence | None" = None
    wait_tokens: int = 0
    adapter: Adapter | None = None  # the LoRA adapter its rows add (None: the base alone)

    def __post_init__(self) -> None:
        assert self.token_ids, "a sequence needs at least one token"
        self.num_prompt_tokens = len(self.token_ids)
        if self.adapter is not None:
            self.table.root = adapter_root(self.adapter.ref)

    @property
    def ready(self) -> bool:
        """Whether admission may go ahead: the shared prefix is computed (or its owner is gone)."""
        leader = self.waits_for
        return leader is None or leader.status is Status.FINISHED or leader.num_computed_tokens >= self.wait_tokens

    @property
    def reusable_prefix(self) -> list[int]:
        """The tokens whose KV may come from the prefix cache (the last one is always computed)."""
        return self.token_ids if self.score_from is None else self.token_ids[: self.score_from]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens
