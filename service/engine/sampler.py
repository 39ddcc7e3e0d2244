"""Turns one decode step's logits into one token per sequence: penalties, truncation, sampling, logprobs.

Owns the per-step token choice for a batch whose rows each carry their own `SamplingParams`. Everything is
batched: per-row parameters become (B, 1) tensors and each feature runs only when some row in the batch uses
it, so the common all-greedy batch is a single argmax.

Order of operations (the same for every row):
    logit_bias -> repetition penalty -> presence/frequency penalties
    -> greedy rows: argmax
    -> sampling rows: / temperature -> top-k -> top-p -> min-p -> exponential-race sample

Logprobs describe the model's raw distribution: float32 log_softmax of the logits as they came in, before
any bias, penalty, temperature or truncation. That is what OpenAI and vLLM return by default, and it keeps
a token's logprob independent of how it was chosen.

Randomness: sampling is argmax(probs / E) with E ~ Exp(1), one row of V draws per sampling row per step. A
row with its own generator (the request's seed) draws its noise from that generator alone, so its tokens do
not depend on batch composition or row position. Other rows share the sampler's generator.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from service.engine.types import SamplingParams

# Noise floor: exponential_ can return exactly 0, and 0 / 0 for a masked token would be NaN, which argmax
# treats as the maximum. Clamping E keeps masked tokens at probability-over-noise 0.
_MIN_NOISE = torch.finfo(torch.float32).tiny


@dataclass
class SamplingRow:
    """One sequence's inputs to a sampling step."""

    params: SamplingParams
    generator: torch.Generator | None  # the request's own generator when it has a seed, else None
    prompt_token_ids: Sequence[int]  # repetition penalty covers prompt + output (HF/vLLM rule)
    output_token_ids: Sequence[int]  # presence/frequency cover output only (OpenAI rule)
    banned_token_ids: Sequence[int] = ()  # never chosen this step (EOS and stop ids before min_tokens)


@dataclass
class SampleResult:
    """What one step chose, one entry per row, as plain Python values."""

    token_ids: list[int]
    logprobs: list[float]  # the chosen token's logprob under the raw distribution; NaN where not asked for
    top_logprobs: list[list[tuple[int, float]] | None]  # top-N (token, logprob), desc; None if not asked


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A per-request generator on the device the logits live on (a CUDA generator cannot feed CPU tensors)."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed)
    return generator


def logprobs_topn(
    logits: torch.Tensor, token_ids: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 log_softmax of `logits` (B, V); returns chosen (B,), top ids (B, n), top logprobs (B, n).

    `token_ids` (B,) picks the chosen entry per row. n = 0 gives (B, 0) tensors; n is capped at V.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    chosen = logprobs.gather(1, token_ids.long().unsqueeze(1)).squeeze(1)  # (B,)
    top_lps, top_ids = logprobs.topk(min(n, logprobs.shape[-1]), dim=-1)  # (B, n) each, sorted desc
    return chosen, top_ids, top_lps


# ---------------------------------------------------------------------------------------------------------
# Penalties


def _row_values(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """Per-row scalars as a (B, 1) float32 column, so they broadcast against (B, V)."""
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _padded_ids(seqs: Sequence[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    """Ragged id lists as one (B, L) long tensor, padded with `pad` (a spare column the caller drops)."""
    width = max((len(s) for s in seqs), default=0)
    rows = [list(s) + [pad] * (width - len(s)) for s in seqs]
    return torch.tensor(rows, dtype=torch.long, device=device).reshape(len(seqs), width)


def _token_counts(seqs: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """How often each vocab id occurs per row: (B, V) float32, built by one scatter_add over padded ids."""
    ids = _padded_ids(seqs, vocab, device)  # (B, L); pad lands in column V
    counts = torch.zeros(len(seqs), vocab + 1, dtype=torch.float32, device=device)  # (B, V + 1)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab]  # (B, V)


def _bias_tensor(rows: Sequence[SamplingRow], vocab: int, device: torch.device) -> torch.Tensor:
    """Each row's logit_bias as a dense (B, V) float32 tensor."""
    for row in rows:
        bad = [t for t in row.params.logit_bias if not 0 <= t < vocab]
        if bad:  # out-of-range indices would be a device-side assert on CUDA; fail readably instead
            raise ValueError(f"logit_bias token ids outside vocab of {vocab}: {bad}")
    ids = _padded_ids([list(r.params.logit_bias) for r in rows], vocab, device)  # (B, L)
    vals = [list(r.params.logit_bias.values()) for r in rows]
    vals = [v + [0.0] * (ids.shape[1] - len(v)) for v in vals]
    vals_t = torch.tensor(vals, dtype=torch.float32, device=device).reshape(ids.shape)  # (B, L)
    bias = torch.zeros(len(rows), vocab + 1, dtype=torch.float32, device=device)  # (B, V + 1)
    bias.scatter_add_(1, ids, vals_t)
    return bias[:, :vocab]  # (B, V)


def _apply_repetition(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """HF rule on every token seen in prompt + output: positive logits / penalty, negative ones * penalty."""
    seen = [list(r.prompt_token_ids) + list(r.output_token_ids) for r in rows]
    mask = _token_counts(seen, logits.shape[-1], logits.device) > 0  # (B, V)
    penalty = _row_values([r.params.repetition_penalty for r in rows], logits.device)  # (B, 1)
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)  # (B, V)
    return torch.where(mask, penalized, logits)


def _apply_presence_frequency(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """OpenAI rule on output tokens: logit - presence * [count > 0] - frequency * count."""
    counts = _token_counts([r.output_token_ids for r in rows], logits.shape[-1], logits.device)  # (B, V)
    presence = _row_values([r.params.presence_penalty for r in rows], logits.device)  # (B, 1)
    frequency = _row_values([r.params.frequency_penalty for r in rows], logits.device)  # (B, 1)
    return logits - presence * (counts > 0).float() - frequency * counts


def _changes_logits(params: SamplingParams, banned_token_ids: Sequence[int]) -> bool:
    """Whether `apply_penalties` changes this row's logits."""
    return bool(
        params.logit_bias
        or params.repetition_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
        or banned_token_ids
    )


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """logit_bias, then repetition, then presence/frequency, then bans, on float32 (B, V) logits.

    Returns a new float32 tensor when anything applies and the input itself (in its dtype) when nothing
    does (never mutates it).
    """
    if not any(_changes_logits(r.params, r.banned_token_ids) for r in rows):
        return logits
    logits = logits.float()
    if any(r.params.logit_bias for r in rows):
        logits = logits + _bias_tensor(rows, logits.shape[-1], logits.device)
    if any(r.params.repetition_penalty != 1.0 for r in rows):
        logits = _apply_repetition(logits, rows)
    if any(r.params.presence_penalty != 0.0 or r.params.frequency_penalty != 0.0 for r in rows):
        logits = _apply_presence_frequency(logits, rows)
    if any(r.banned_token_ids for r in rows):
        logits = logits.clone()
        for i, row in enumerate(rows):
            logits[i, list(row.banned_token_ids)] = float("-inf")
    return logits


# ---------------------------------------------------------------------------------------------------------
# Truncation


def _top_k_top_p_mask(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Tokens that top-k then top-p drop, (S, V) bool in vocab order. Top-p sees the top-k renormalized dist."""
    rows, vocab = logits.shape
    device = logits.device
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)  # (S, V) each
    k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)  # (S,)
    drop = torch.arange(vocab, device=device).unsqueeze(0) >= k.unsqueeze(1)  # (S, V), sorted order
    if any(p.top_p < 1.0 for p in params):
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)  # (S, V)
        # Mass strictly before each token; a token is kept while that is below top_p, so the kept set is
        # the smallest prefix reaching top_p. Rows at top_p = 1 are exempt: rounding can push the sum to 1.
        before = torch.cumsum(probs, dim=-1) - probs  # (S, V)
        top_p = _row_values([p.top_p for p in params], device)  # (S, 1)
        drop |= (before >= top_p) & (top_p < 1.0)
        drop[:, 0] = False  # the most likely token always survives, even for top_p = 0
    return torch.zeros_like(drop).scatter(1, sorted_idx, drop)  # (S, V), vocab order


def _min_p_mask(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Tokens with prob < min_p * max prob, (S, V) bool. Rows at min_p 0 drop nothing."""
    probs = logits.softmax(dim=-1)  # (S, V)
    min_p = _row_values([p.min_p for p in params], logits.device)  # (S, 1)
    return probs < min_p * probs.amax(dim=-1, keepdim=True)


def _truncate(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on sampling rows' logits (S, V); dropped tokens become -inf."""
    temperature = _row_values([p.temperature for p in params], logits.device)  # (S, 1)
    logits = logits / temperature
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        logits = logits.masked_fill(_top_k_top_p_mask(logits, params), float("-inf"))
    if any(p.min_p > 0.0 for p in params):
        logits = logits.masked_fill(_min_p_mask(logits, params), float("-inf"))
    return logits


# ---------------------------------------------------------------------------------------------------------
# Sampling


class Sampler:
    """Chooses one token per row. Holds the engine-wide generator(s) that unseeded rows draw from."""

    def __init__(self, seed: int | None = None, argmax=None):
        """`argmax`: (B, V) -> (B,) int64, the first index of each row's maximum (a compiled kernel, see
        service.model.kernels.argmax_rows); default `torch.max(dim=-1).indices`."""
        self._seed = seed
        self._argmax = argmax or _first_max
        self._generators: dict[torch.device, torch.Generator] = {}  # one per device, made on first use

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SampleResult:
        """logits (B, V), any float dtype and device; rows[i] describes logits[i]."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
        raw = logits  # (B, V), in the model's dtype: converted where a feature needs float32
        processed = apply_penalties(raw, rows)  # (B, V)
        token_ids = self._argmax(processed)  # (B,); greedy answer, first index on ties
        sampling = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sampling:
            idx = torch.tensor(sampling, dtype=torch.long, device=raw.device)  # (S,)
            token_ids[idx] = self._sample(processed[idx], [rows[i] for i in sampling])
        return _result(raw, token_ids, rows)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            generator = torch.Generator(device=device)
            if self._seed is None:
                generator.seed()  # non-deterministic
            else:
                generator.manual_seed(self._seed)
            self._generators[device] = generator
        return self._generators[device]

    def _noise(self, rows: Sequence[SamplingRow], vocab: int, device: torch.device) -> torch.Tensor:
        """Exp(1) noise (S, V): seeded rows from their own generator, one row each; the rest in one block."""
        noise = torch.empty(len(rows), vocab, dtype=torch.float32, device=device)  # (S, V)
        shared = [j for j, r in enumerate(rows) if r.generator is None]
        for j, row in enumerate(rows):
            if row.generator is not None:
                noise[j].exponential_(generator=row.generator)
        if shared:
            block = torch.empty(len(shared), vocab, dtype=torch.float32, device=device)  # (U, V)
            block.exponential_(generator=self._generator(device))
            noise[torch.tensor(shared, dtype=torch.long, device=device)] = block
        return noise.clamp_min_(_MIN_NOISE)

    def _sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Exponential race on sampling rows' logits (S, V): argmax(probs / E) is a draw from probs."""
        probs = _truncate(logits, [r.params for r in rows]).softmax(dim=-1)  # (S, V)
        noise = self._noise(rows, logits.shape[-1], logits.device)  # (S, V)
        return (probs / noise).argmax(dim=-1)  # (S,)


def argmax_only(params: SamplingParams, banned_token_ids: Sequence[int] = ()) -> bool:
    """Whether a row's token is the first argmax of its raw logits and nothing else of them is wanted
    (greedy, no logprobs, no bias, penalty or ban): the model may then find the token without computing its
    logits whole (`GPT2.greedy_tokens`), and `argmax_result` stands for this sampler's answer."""
    return params.greedy and params.logprobs is None and not _changes_logits(params, banned_token_ids)


def argmax_result(token_ids: list[int]) -> SampleResult:
    """What `Sampler.__call__` returns for rows that are all `argmax_only`, given their tokens."""
    return SampleResult(token_ids, [float("nan")] * len(token_ids), [None] * len(token_ids))


def _first_max(logits: torch.Tensor) -> torch.Tensor:
    return logits.max(dim=-1).indices  # first index on ties, and faster than argmax


def _result(raw: torch.Tensor, token_ids: torch.Tensor, rows: Sequence[SamplingRow]) -> SampleResult:
    """Raw-distribution logprobs for the chosen tokens plus each row's requested top-N, as Python values,
    for the rows that asked for logprobs (the others get NaN and None: a (B, V) log_softmax is a tenth of a
    64-sequence decode step, so it runs on the rows that want it only)."""
    ids_list = token_ids.tolist()
    asking = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    chosen_list = [float("nan")] * len(rows)
    top: list[list[tuple[int, float]] | None] = [None] * len(rows)
    if asking:
        n_max = max(rows[i].params.logprobs for i in asking)
        every = len(asking) == len(rows)
        idx = None if every else torch.tensor(asking, dtype=torch.long, device=raw.device)
        sub_raw, sub_ids = (raw, token_ids) if every else (raw[idx], token_ids[idx])
        chosen, top_ids, top_lps = logprobs_topn(sub_raw, sub_ids, n_max)
        top_ids_list, top_lps_list = top_ids.tolist(), top_lps.tolist()
        for j, (i, lp) in enumerate(zip(asking, chosen.tolist())):
            n = rows[i].params.logprobs
            chosen_list[i] = lp
            top[i] = list(zip(top_ids_list[j][:n], top_lps_list[j][:n]))
    return SampleResult(token_ids=ids_list, logprobs=chosen_list, top_logprobs=top)
