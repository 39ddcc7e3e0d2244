"""Which sequences compute how many tokens this step: a token budget over running, then waiting, FIFO.

Owns the waiting and running queues. Every sequence has `num_tokens` and `num_computed_tokens`; each
step hands out up to `max_num_batched_tokens`, so prefill, chunked prefill, decode, recompute after
preemption and scoring are one rule. Running sequences go first (oldest first) so decodes never stall
behind a long prompt; when KV memory runs out the newest running sequence is preempted (its blocks
freed, recomputed later) rather than failing anyone. Waiting sequences are admitted strictly in arrival
order while memory and `max_num_seqs` allow, so none starves.
"""

from collections import deque
from dataclasses import dataclass, field

from .kv_cache import BlockManager
from .sequence import Sequence, Status
from .types import FinishReason, QueueFull, TooLarge


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_waiting: int = 256  # sequences; beyond this, `add` refuses and the API answers 429
    max_waiting_tokens: int = 1 << 18  # prompt tokens waiting, summed; the same
    max_model_len: int = 1024


@dataclass
class ScheduledBatch:
    """Sequences in batch order and how many new tokens each computes this step."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


def check_room(config: SchedulerConfig, num_waiting: int, num_running: int, num_seqs: int) -> None:
    """QueueFull unless `num_seqs` more sequences fit beside `num_waiting` queued ones: max_waiting, plus
    the running slots still free. `Scheduler.add` checks it exactly; `AsyncEngine` early, on the event loop,
    from the counts the engine thread last published."""
    free_slots = max(0, config.max_num_seqs - num_running)
    if num_waiting + num_seqs > config.max_waiting + free_slots:
        raise QueueFull(
            f"{num_waiting} sequences are queued (limit {config.max_waiting} waiting "
            f"beyond {free_slots} free running slots)"
        )


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: BlockManager) -> None:
        self.config, self.kv = config, kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, *seqs: Sequence) -> None:
        """Queue the samples of one request: all of them or, on QueueFull / TooLarge, none.

        The queue limit counts sequences that will actually wait: those the free running slots take at the
        next step do not (requests that arrive together between two steps, such as a closed loop of exactly
        max_num_seqs clients, are all admitted)."""
        check_room(self.config, len(self.waiting), len(self.running), len(seqs))
        waiting_tokens = sum(s.num_tokens for s in self.waiting)
        if waiting_tokens and waiting_tokens + sum(s.num_tokens for s in seqs) > self.config.max_waiting_tokens:
            raise QueueFull(f"{waiting_tokens} tokens are waiting (limit {self.config.max_waiting_tokens})")
        for seq in seqs:
            longest = min(seq.num_prompt_tokens + seq.params.max_tokens, self.config.max_model_len)
            if self.kv.blocks_needed(longest) > self.kv.num_blocks:  # could never run, even alone
                raise TooLarge(
                    f"{longest} tokens exceed the KV memory ({self.kv.num_blocks * self.kv.block_size} tokens)"
                )
        self.waiting.extend(seqs)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(batch, budget)
        if not batch.preempted:  # memory is short: admitting more would only preempt again
            self._schedule_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            if n == 0:  # nothing new until its sampled token is appended
                i += 1
                continue
            while not self.kv.grow(seq.table, seq.num_computed_tokens + n):
                victim = self.running.pop()  # newest first
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    return budget
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
            i += 1
        return budget

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        skipped: list[Sequence] = []  # samples waiting for their prompt; they hold no memory, so others pass
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not seq.ready:
                skipped.append(self.waiting.popleft())
                continue
            if not seq.table.blocks:
                seq.num_computed_tokens = self.kv.match_prefix(seq.reusable_prefix, seq.table)
                if seq.num_preemptions == 0:
                    seq.num_cached_tokens = seq.num_computed_tokens
            n = min(seq.num_uncomputed, budget)
            if not self.kv.grow(seq.table, seq.num_computed_tokens + n):
                self.kv.free(seq.table)  # waiting sequences hold nothing; the prefix stays cached
                seq.num_computed_tokens = 0
                break  # head of line waits for memory: FIFO, so nothing behind it overtakes
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        self.waiting.extendleft(reversed(skipped))

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq.table)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def record_computed(self, batch: ScheduledBatch) -> None:
        """Record that the runner computed the scheduled tokens; index newly full blocks for reuse."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.kv.register_computed(seq.token_ids, seq.num_computed_tokens, seq.table)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Finish (or abort) a sequence wherever it is; its KV is free for the next step."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq.table)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
