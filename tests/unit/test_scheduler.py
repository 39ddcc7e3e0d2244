"""Scheduler and KV block accounting with a fake model runner: no tensors, deterministic "model"."""

import pytest

from service.engine.kv_cache import BlockManager
from service.engine.scheduler import QueueFull, Scheduler, SchedulerConfig, TooLarge
from service.engine.sequence import Sequence, Status
from service.engine.types import FinishReason, SamplingParams

VOCAB = 1000


def fake_next_token(token_ids: list[int]) -> int:
    """Depends on every token, so a recompute that lost or reordered anything gives different output."""
    h = 0
    for t in token_ids:
        h = (h * 31 + t + 7) % 1_000_003
    return h % VOCAB


class FakeEngine:
    def __init__(self, num_blocks=64, block_size=4, **cfg):
        self.kv = BlockManager(num_blocks, block_size)
        self.sched = Scheduler(SchedulerConfig(**cfg), self.kv)
        self.batches = []
        self.admitted: list[str] = []

    def add(self, rid, prompt, max_tokens=8, score_only=False):
        seq = Sequence(rid, list(prompt), SamplingParams(max_tokens=max_tokens), score_only=score_only)
        self.sched.add(seq)
        return seq

    def step(self):
        batch = self.sched.schedule()
        self.batches.append(
            [(s.request_id, n, s.num_computed_tokens, s.num_tokens) for s, n in zip(batch.seqs, batch.num_new_tokens)]
        )
        for s in batch.seqs:
            if s.request_id not in self.admitted:
                self.admitted.append(s.request_id)
        self.sched.record_computed(batch)
        for seq in list(batch.seqs):
            if seq.num_computed_tokens < seq.num_tokens:
                continue  # a prefill chunk: no logits to sample from yet
            if seq.score_only:
                self.sched.finish(seq, FinishReason.STOP)
                continue
            seq.token_ids.append(fake_next_token(seq.token_ids))
            if seq.num_output_tokens >= seq.params.max_tokens:
                self.sched.finish(seq, FinishReason.LENGTH)
        return batch

    def run(self, max_steps=10_000):
        steps = 0
        while self.sched.has_work:
            self.step()
            steps += 1
            assert steps < max_steps, "no progress"


def expected_output(prompt, max_tokens):
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(fake_next_token(ids))
    return ids[len(prompt) :]


def prompts(n, seed=0, lo=3, hi=40):
    import random

    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def test_budget_and_max_num_seqs_respected_and_all_finish_with_length():
    eng = FakeEngine(num_blocks=256, max_num_batched_tokens=32, max_num_seqs=5)
    seqs = [eng.add(f"r{i}", p, max_tokens=6) for i, p in enumerate(prompts(12))]
    eng.run()
    assert all(sum(n for _, n, _, _ in b) <= 32 for b in eng.batches)
    assert all(len(b) <= 5 for b in eng.batches)
    assert max(len(b) for b in eng.batches) == 5  # the limit is reached, so the check above has teeth
    for seq, p in zip(seqs, prompts(12)):
        assert seq.finish_reason is FinishReason.LENGTH and seq.output_token_ids == expected_output(p, 6)
    assert eng.kv.usage == 0.0


def test_fifo_admission_order():
    eng = FakeEngine(num_blocks=256, max_num_batched_tokens=16, max_num_seqs=3)
    for i, p in enumerate(prompts(10, seed=1)):
        eng.add(f"r{i}", p, max_tokens=3)
    eng.run()
    assert eng.admitted == [f"r{i}" for i in range(10)]


def test_chunked_prefill_does_not_stall_running_decodes():
    eng = FakeEngine(num_blocks=512, max_num_batched_tokens=16, max_num_seqs=8)
    short = [eng.add(f"s{i}", p, max_tokens=40) for i, p in enumerate(prompts(3, seed=2, lo=3, hi=5))]
    for _ in range(3):
        eng.step()
    assert all(s.num_output_tokens > 0 for s in short)
    long_seq = eng.add("long", list(range(300)), max_tokens=2)
    chunk_steps = 0
    while long_seq.num_computed_tokens < 300:
        before = {s.request_id: s.num_output_tokens for s in short}
        batch = eng.step()
        assert all(s.num_output_tokens == before[s.request_id] + 1 for s in short), "a decode stalled"
        assert batch.num_tokens <= 16
        chunk_steps += 1
    assert chunk_steps >= 300 // 16  # the prompt really was chunked
    eng.run()
    assert long_seq.output_token_ids == expected_output(range(300), 2)


def test_preemption_under_tiny_kv_budget_keeps_outputs():
    ps = prompts(8, seed=3, lo=5, hi=20)
    eng = FakeEngine(num_blocks=14, block_size=4, max_num_batched_tokens=64, max_num_seqs=8)
    seqs = [eng.add(f"r{i}", p, max_tokens=12) for i, p in enumerate(ps)]
    eng.run()
    assert sum(s.num_preemptions for s in seqs) > 0, "the budget should force preemption"
    for seq, p in zip(seqs, ps):
        assert seq.output_token_ids == expected_output(p, 12)
    assert eng.kv.num_free_blocks == 14


def test_abort_frees_all_blocks_by_next_step():
    eng = FakeEngine(num_blocks=64, block_size=4, max_num_batched_tokens=64)
    a = eng.add("a", list(range(30)), max_tokens=50)
    b = eng.add("b", list(range(100, 110)), max_tokens=50)
    eng.step()
    eng.step()
    held = eng.kv.usage
    assert held > 0
    eng.sched.finish(a, FinishReason.ABORT)
    assert a.status is Status.FINISHED and not a.table.blocks
    assert eng.kv.usage < held
    eng.sched.finish(b, FinishReason.ABORT)
    assert eng.kv.usage == 0.0 and not eng.sched.has_work


def test_abort_of_waiting_request():
    eng = FakeEngine(num_blocks=64, max_num_seqs=1)
    eng.add("a", [1, 2, 3], max_tokens=5)
    b = eng.add("b", [4, 5, 6], max_tokens=5)
    eng.step()
    eng.sched.finish(b, FinishReason.ABORT)
    eng.run()
    assert "b" not in eng.admitted


def test_prefix_reuse_skips_cached_blocks_and_keeps_output():
    eng = FakeEngine(num_blocks=128, block_size=4, max_num_batched_tokens=256)
    shared = list(range(50, 70))  # 20 tokens = 5 blocks
    first = eng.add("first", shared + [1, 2, 3], max_tokens=4)
    eng.run()
    second = eng.add("second", shared + [9, 9], max_tokens=4)
    eng.step()
    assert second.num_cached_tokens == 20
    assert eng.batches[-1][0][1] == 2  # only the two new tokens were computed
    eng.run()
    assert second.output_token_ids == expected_output(shared + [9, 9], 4)
    assert first.num_cached_tokens == 0


def test_prefix_reuse_never_skips_the_last_prompt_token():
    eng = FakeEngine(num_blocks=64, block_size=4)
    eng.add("a", list(range(8)), max_tokens=1)
    eng.run()
    again = eng.add("b", list(range(8)), max_tokens=1)
    eng.step()
    assert again.num_cached_tokens == 4  # block 2 holds the last token, whose logits are needed


def test_prefix_shared_with_running_request():
    eng = FakeEngine(num_blocks=64, block_size=4, max_num_batched_tokens=64)
    a = eng.add("a", list(range(16)), max_tokens=30)
    eng.step()
    b = eng.add("b", list(range(16)) + [99], max_tokens=2)
    eng.step()
    assert b.num_cached_tokens == 16
    assert a.table.blocks[:4] == b.table.blocks[:4]


def test_evicted_cache_blocks_are_reused_when_memory_is_short():
    eng = FakeEngine(num_blocks=8, block_size=4)
    eng.add("a", list(range(20)), max_tokens=1)
    eng.run()
    assert eng.kv.num_free_blocks == 8 and eng.kv.usage == 0.0
    c = eng.add("c", list(range(100, 128)), max_tokens=3)  # needs 8 blocks: evicts a's cached ones
    eng.run()
    assert c.output_token_ids == expected_output(range(100, 128), 3)


def test_score_only_finishes_after_prefill():
    eng = FakeEngine(num_blocks=64, max_num_batched_tokens=8)
    s = eng.add("s", list(range(20)), score_only=True)
    eng.run()
    assert s.finish_reason is FinishReason.STOP and s.num_output_tokens == 0 and s.num_computed_tokens == 20


def test_waiting_queue_limit():
    eng = FakeEngine(max_waiting=2, max_num_seqs=2)
    for rid in "abcd":  # arriving together: two take the free running slots at the next step, two wait
        eng.add(rid, [1])
    with pytest.raises(QueueFull):
        eng.add("e", [1])
    eng.step()
    assert len(eng.sched.running) == 2 and len(eng.sched.waiting) == 2
    with pytest.raises(QueueFull):  # no slot free now: the limit is max_waiting alone
        eng.add("e", [1])


def test_waiting_token_limit_but_one_long_prompt_always_fits_an_empty_queue():
    eng = FakeEngine(num_blocks=256, max_waiting_tokens=100)
    eng.add("long", list(range(150)))  # longer than the limit, but nothing else waits
    with pytest.raises(QueueFull):
        eng.add("next", [1])
    eng.run()
    eng.add("a", list(range(60)))
    with pytest.raises(QueueFull):
        eng.add("b", list(range(41)))
    eng.add("b", list(range(40)))


def test_request_that_cannot_fit_even_alone_is_refused():
    eng = FakeEngine(num_blocks=4, block_size=4)
    eng.add("fits", list(range(10)), max_tokens=6)
    with pytest.raises(TooLarge):
        eng.add("too-big", list(range(10)), max_tokens=7)
