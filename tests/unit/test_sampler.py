"""Sampler: greedy/logprobs, seeded reproducibility, truncation, temperature, bias and penalties."""

import math

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from service.engine.sampler import (
    Sampler,
    SampleResult,
    SamplingRow,
    apply_penalties,
    logprobs_topn,
    make_generator,
)
from service.engine.types import SamplingParams

V = 50


def row(params: SamplingParams, prompt=(), output=(), generator=None) -> SamplingRow:
    return SamplingRow(params=params, generator=generator, prompt_token_ids=list(prompt), output_token_ids=list(output))


def draw_many(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> torch.Tensor:
    """n independent draws from one row's distribution, as one batch of n identical rows."""
    sampler = Sampler(seed=seed)
    res = sampler(logits_row.expand(n, -1), [row(params)] * n)
    return torch.tensor(res.token_ids)


# ---------------------------------------------------------------- greedy and logprobs


def test_greedy_is_argmax_and_logprobs_are_raw_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(4, V) * 3
    ns = [None, 0, 5, 20]
    rows = [row(SamplingParams(temperature=0.0, logprobs=n)) for n in ns]
    res = Sampler(seed=0)(logits, rows)
    assert isinstance(res, SampleResult)
    assert res.token_ids == logits.argmax(-1).tolist()
    ref = torch.log_softmax(logits.float(), dim=-1)
    for i, n in enumerate(ns):
        if n is None:  # not asked for: not computed
            assert math.isnan(res.logprobs[i]) and res.top_logprobs[i] is None
            continue
        assert abs(res.logprobs[i] - ref[i, res.token_ids[i]].item()) < 1e-6
        top = res.top_logprobs[i]
        assert len(top) == n
        expected_vals, expected_ids = ref[i].topk(n)
        assert [t for t, _ in top] == expected_ids.tolist()
        for (_, lp), e in zip(top, expected_vals.tolist()):
            assert abs(lp - e) < 1e-6
        assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)


def test_logprobs_are_of_raw_logits_not_penalized_or_tempered():
    torch.manual_seed(1)
    logits = torch.randn(1, V)
    params = SamplingParams(temperature=0.5, logit_bias={3: 100.0}, logprobs=2)
    res = Sampler(seed=0)(logits, [row(params)])
    ref = torch.log_softmax(logits, dim=-1)[0]
    assert res.token_ids == [3]
    assert abs(res.logprobs[0] - ref[3].item()) < 1e-6
    assert [t for t, _ in res.top_logprobs[0]] == ref.topk(2).indices.tolist()


def test_greedy_ties_take_first_index():
    logits = torch.zeros(1, V)
    logits[0, [7, 9, 30]] = 2.0
    assert Sampler()(logits, [row(SamplingParams(temperature=0.0))]).token_ids == [7]


def test_bf16_input():
    torch.manual_seed(2)
    logits = (torch.randn(3, V) * 4).to(torch.bfloat16)
    rows = [
        row(SamplingParams(temperature=0.0, logprobs=3)),
        row(SamplingParams(seed=1, logprobs=1)),
        row(SamplingParams()),
    ]
    res = Sampler(seed=0)(logits, rows)
    assert res.token_ids[0] == logits.float()[0].argmax().item()
    ref = torch.log_softmax(logits.float(), dim=-1)
    for i, tok in enumerate(res.token_ids):
        assert 0 <= tok < V and isinstance(res.logprobs[i], float)
        if rows[i].params.logprobs is not None:
            assert abs(res.logprobs[i] - ref[i, tok].item()) < 1e-6
    assert math.isnan(res.logprobs[2])


def test_logprobs_topn_helper():
    torch.manual_seed(3)
    logits = torch.randn(2, V, dtype=torch.float16)
    chosen, ids, lps = logprobs_topn(logits, torch.tensor([4, 5]), 3)
    ref = torch.log_softmax(logits.float(), dim=-1)
    assert chosen.dtype == torch.float32 and chosen.shape == (2,)
    assert torch.allclose(chosen, ref[[0, 1], [4, 5]])
    assert ids.shape == (2, 3) and torch.equal(ids, ref.topk(3).indices)
    assert torch.allclose(lps, ref.topk(3).values)
    _, ids0, lps0 = logprobs_topn(logits, torch.tensor([0, 0]), 0)
    assert ids0.shape == (2, 0) and lps0.shape == (2, 0)


# ---------------------------------------------------------------- seeds


def _run_seeded(seed: int, position: int, others: int, steps: int = 20, params=None) -> list[int]:
    """Decode `steps` steps for one seeded row among `others` unseeded random rows; the seeded row's logits
    come from a fixed stream, the others from a different stream each time."""
    params = params or SamplingParams(temperature=1.0, top_k=20, seed=seed)
    gen = make_generator(seed, "cpu")
    data = torch.Generator().manual_seed(123)  # the seeded row's logits: same in every run
    noise = torch.Generator().manual_seed(1000 + position + others)  # the other rows: differ per run
    other_params = [
        SamplingParams(temperature=0.7, top_p=0.9),
        SamplingParams(temperature=0.0),
        SamplingParams(min_p=0.1),
    ]
    sampler = Sampler(seed=position)
    out: list[int] = []
    for _ in range(steps):
        mine = torch.randn(1, V, generator=data) * 2
        logits = torch.randn(others + 1, V, generator=noise) * 2
        logits[position] = mine[0]
        rows = [row(other_params[i % 3]) for i in range(others + 1)]
        rows[position] = row(params, output=out, generator=gen)
        out.append(sampler(logits, rows).token_ids[position])
    return out


def test_seeded_row_independent_of_batch():
    alone = _run_seeded(seed=42, position=0, others=0)
    assert _run_seeded(seed=42, position=3, others=8) == alone
    assert _run_seeded(seed=42, position=8, others=8) == alone
    assert len(set(alone)) > 3  # it really samples


def test_seeded_row_advances_generator_by_one_row_per_step():
    gen = make_generator(7, "cpu")
    logits = torch.randn(2, V)
    Sampler()(logits, [row(SamplingParams(), generator=gen), row(SamplingParams())])
    ref = make_generator(7, "cpu")
    torch.empty(V).exponential_(generator=ref)
    assert torch.equal(gen.get_state(), ref.get_state())


def test_different_seeds_give_different_sequences():
    params = SamplingParams(temperature=1.0)
    a = _run_seeded(seed=1, position=0, others=0, steps=30, params=params)
    b = _run_seeded(seed=2, position=0, others=0, steps=30, params=params)
    assert a != b


def test_unseeded_samples_validly():
    torch.manual_seed(4)
    logits = torch.randn(16, V)
    res = Sampler()(logits, [row(SamplingParams(temperature=1.0))] * 16)
    assert len(res.token_ids) == 16 and all(0 <= t < V for t in res.token_ids)
    assert len(set(res.token_ids)) > 1


# ---------------------------------------------------------------- truncation


def test_top_k_1_is_greedy():
    torch.manual_seed(5)
    logits = torch.randn(32, V)
    res = Sampler(seed=0)(logits, [row(SamplingParams(temperature=1.5, top_k=1))] * 32)
    assert res.token_ids == logits.argmax(-1).tolist()


def test_top_k_never_samples_outside_top_k():
    torch.manual_seed(6)
    logits = torch.randn(1, V) * 0.5  # flat-ish: without top-k, many tokens would show up
    allowed = set(logits[0].topk(5).indices.tolist())
    drawn = draw_many(logits, SamplingParams(temperature=2.0, top_k=5), 2000)
    assert set(drawn.tolist()) == allowed


def test_top_p_tiny_is_argmax():
    torch.manual_seed(7)
    logits = torch.randn(32, V)
    res = Sampler(seed=0)(logits, [row(SamplingParams(temperature=1.0, top_p=1e-6))] * 32)
    assert res.token_ids == logits.argmax(-1).tolist()


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    drawn = draw_many(logits, SamplingParams(top_p=0.7), 3000)
    assert set(drawn.tolist()) == {0, 1}
    assert abs((drawn == 0).float().mean().item() - 0.5 / 0.8) < 0.04  # renormalized within the nucleus


def test_top_p_after_top_k():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    # top_k 2 leaves [0.571, 0.429]; top_p 0.5 is then reached by token 0 alone
    assert set(draw_many(logits, SamplingParams(top_k=2, top_p=0.5), 500).tolist()) == {0}


def test_min_p_filters_below_fraction_of_max():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.12, 0.08]]))
    # threshold 0.2 * 0.5 = 0.1: tokens 0..2 stay, token 3 goes
    drawn = draw_many(logits, SamplingParams(min_p=0.2), 3000)
    assert set(drawn.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_frequencies_match_softmax(temperature):
    logits = torch.tensor([[1.0, 0.0, -0.5]])
    n = 4000
    drawn = draw_many(logits, SamplingParams(temperature=temperature), n, seed=11)
    freqs = torch.bincount(drawn, minlength=3).float() / n
    expected = torch.softmax(logits[0] / temperature, dim=-1)
    assert torch.all((freqs - expected).abs() < 0.03), (freqs, expected)


def test_mixed_batch_greedy_rows_unaffected():
    torch.manual_seed(8)
    logits = torch.randn(4, V)
    greedy = SamplingParams(temperature=0.0)
    rows = [row(greedy), row(SamplingParams(top_k=3)), row(greedy), row(SamplingParams())]
    res = Sampler(seed=0)(logits, rows)
    assert res.token_ids[0] == logits[0].argmax().item()
    assert res.token_ids[2] == logits[2].argmax().item()
    assert res.token_ids[1] in logits[1].topk(3).indices.tolist()


# ---------------------------------------------------------------- bias and penalties


def test_logit_bias_forces_and_bans():
    torch.manual_seed(9)
    logits = torch.randn(64, V)
    forced = Sampler(seed=0)(logits, [row(SamplingParams(logit_bias={17: 100.0}))] * 64)
    assert set(forced.token_ids) == {17}
    top = int(logits[0].argmax())
    banned = Sampler(seed=0)(logits[:1], [row(SamplingParams(temperature=0.0, logit_bias={top: -100.0}))])
    assert banned.token_ids[0] != top
    sampled = Sampler(seed=0)(logits[:1].expand(500, -1) * 5, [row(SamplingParams(logit_bias={top: -100.0}))] * 500)
    assert top not in sampled.token_ids


def test_logit_bias_out_of_vocab_raises():
    with pytest.raises(ValueError):
        Sampler()(torch.randn(1, V), [row(SamplingParams(logit_bias={V: 1.0}))])


def test_repetition_penalty_matches_hf():
    torch.manual_seed(10)
    logits = torch.randn(3, V) * 3
    specs = [(1.3, [1, 2, 2, 40], [5, 1]), (1.0, [3], [4]), (0.7, [0, 49, 10], [])]
    rows = [row(SamplingParams(repetition_penalty=p), prompt=pr, output=out) for p, pr, out in specs]
    ours = apply_penalties(logits, rows)
    for i, (p, pr, out) in enumerate(specs):
        hf = RepetitionPenaltyLogitsProcessor(penalty=p)(torch.tensor([pr + out]), logits[i : i + 1].clone())
        assert torch.allclose(ours[i], hf[0], atol=0, rtol=0), i
    assert not torch.equal(ours[0], logits[0])  # the penalty did something


def test_repetition_penalty_flips_greedy_choice():
    logits = torch.zeros(1, V)
    logits[0, 4], logits[0, 6] = 2.0, 1.5
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert Sampler()(logits, [row(params, prompt=[4])]).token_ids == [6]


def test_presence_and_frequency_penalties():
    torch.manual_seed(12)
    logits = torch.randn(2, V)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    rows = [row(p, prompt=[8, 8], output=[3, 3, 7, 3]), row(SamplingParams(), output=[3])]
    out = apply_penalties(logits, rows)
    assert math.isclose(out[0, 3].item(), logits[0, 3].item() - 0.5 - 3 * 0.25, abs_tol=1e-6)
    assert math.isclose(out[0, 7].item(), logits[0, 7].item() - 0.5 - 0.25, abs_tol=1e-6)
    assert out[0, 8].item() == logits[0, 8].item()  # prompt tokens are not penalized (OpenAI semantics)
    untouched = torch.ones(V, dtype=torch.bool)
    untouched[[3, 7]] = False
    assert torch.equal(out[0, untouched], logits[0, untouched])
    assert torch.equal(out[1], logits[1])  # a row without penalties is untouched


def test_apply_penalties_noop_returns_input_unchanged():
    logits = torch.randn(2, V)
    before = logits.clone()
    out = apply_penalties(logits, [row(SamplingParams(repetition_penalty=1.5), prompt=[1])] * 2)
    assert torch.equal(logits, before)  # never mutates
    assert apply_penalties(logits, [row(SamplingParams())] * 2) is logits
    assert not torch.equal(out, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_argmax_equals_torch_max(dtype):
    from service.model import kernels

    module = kernels.logit_rows()
    if module is None:
        pytest.skip("no C++ compiler here: torch.max serves alone")
    torch.manual_seed(0)
    logits = torch.randn(9, 50257).to(dtype)
    logits[1, 300] = logits[1, 20] = float("nan")  # the first NaN wins, as in torch.max
    logits[2] = float("-inf")
    logits[3, 7] = logits[3, 9] = logits[3].max() + 1  # ties: the first index
    logits[4, -1] = 1e4  # in the tail past the last full vector
    logits[5, :17] = 50.0
    got = module.argmax_rows(logits)
    assert got.dtype == torch.int64 and torch.equal(got, logits.max(dim=-1).indices)
    assert torch.equal(module.argmax_rows(logits[:, :13]), logits[:, :13].max(dim=-1).indices)  # shorter than a vector
    rows = [row(SamplingParams(temperature=0.0)) for _ in range(9)]
    assert Sampler(0, module.argmax_rows)(logits, rows).token_ids == got.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_target_logprobs_equal_log_softmax(dtype):
    """Scoring's one-pass target logprob and greedy flag against log_softmax + gather and torch.max."""
    from service.model import kernels

    module = kernels.logit_rows()
    if module is None:
        pytest.skip("no C++ compiler here: log_softmax serves alone")
    torch.manual_seed(1)
    logits = (torch.randn(7, 50257) * 4).to(dtype)
    logits[1, :100] = float("-inf")  # masked entries count for nothing
    logits[2, 3] = logits[2].max() + 5  # a clear argmax, the target below
    logits[3, 11] = float("nan")  # a NaN row: NaN logprob, as log_softmax gives
    logits[4, 9] = float("inf")  # a +inf row: NaN throughout, as log_softmax gives (inf - inf)
    targets = torch.tensor([0, 200, 3, 5, 50256, 7, 8])
    targets[5] = logits[5].float().argmax()
    chosen, greedy = module.target_logprobs(logits, targets)
    reference, _, _ = logprobs_topn(logits, targets, 0)
    assert chosen.dtype == torch.float32 and greedy.dtype == torch.bool
    finite = ~reference.isnan()
    assert torch.equal(finite, ~chosen.isnan()) and not finite[3] and not finite[4]
    assert (chosen[finite] - reference[finite]).abs().max() <= 1e-5
    assert torch.equal(greedy, logits.max(dim=-1).indices == targets) and greedy[2] and greedy[5]
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        module.target_logprobs(logits, torch.full((7,), 50257))


def test_argmax_only_rows_and_their_result_match_the_sampler():
    """argmax_only holds exactly for rows whose token is the raw logits' first argmax with nothing else of
    them wanted; argmax_result is then what the sampler itself returns."""
    from service.engine.sampler import argmax_only, argmax_result

    plain = SamplingParams(temperature=0.0)
    assert argmax_only(plain)
    others = [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=0.0, logit_bias={3: 1.0}),
        SamplingParams(temperature=0.0, repetition_penalty=1.2),
        SamplingParams(temperature=0.0, presence_penalty=0.5),
        SamplingParams(temperature=0.0, frequency_penalty=0.5),
    ]
    assert not any(argmax_only(p) for p in others) and not argmax_only(plain, (50256,))
    torch.manual_seed(2)
    logits = torch.randn(3, 100)
    got = Sampler(0)(logits, [row(plain) for _ in range(3)])
    expected = argmax_result(logits.max(dim=-1).indices.tolist())
    assert got.token_ids == expected.token_ids and got.top_logprobs == expected.top_logprobs
    assert all(math.isnan(a) and math.isnan(b) for a, b in zip(got.logprobs, expected.logprobs))
