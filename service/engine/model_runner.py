"""Turns a scheduled batch into one GPT-2 forward and returns the logits the engine needs.

Owns the KV cache tensors (sized by the engine from its memory budget) and the translation of sequences
into a flat token batch with block tables. It knows nothing of sampling or text.
"""

from collections import OrderedDict
from dataclasses import dataclass

import torch

from service.model import BatchLayout, KVCache, kernels
from service.model.loader import LoadedModel
from service.model.lora import Adapter, AdapterRows, AdapterStack

from .sampler import logprobs_topn
from .scheduler import ScheduledBatch

STACKS_KEPT = 4  # stacked adapter weights kept for reuse, one per mix of adapters
SCORE_CHUNK_ROWS = 128  # prompt positions per head call when scoring: 26 MB of float32 logits for GPT-2


@dataclass
class RunnerOutput:
    """Logits (model dtype) of every scheduled sequence that reached the end of its tokens this step (the
    ones that sample), one row each, in batch order; `last_rows[i]` is sequence i's row, `None` for a
    sequence still part-way through a prefill chunk. One tensor, so the sampler reads it without a copy."""

    last_logits: torch.Tensor | None  # (num_sampling, vocab); None when `argmax_ids` stands for them
    last_rows: list[int | None]
    # Per sequence that wants prompt logprobs, for the positions in this chunk that predict a wanted prompt
    # token; None otherwise.
    prompt_scores: list["PromptScores | None"]
    argmax_ids: list[int] | None = None  # each row's greedy token, where asked for and found without logits


@dataclass
class PromptScores:
    """Positions first.. predict prompt tokens `targets` (n,): their float32 logprobs (n,), the top-k
    alternatives (n, k) each, and whether each target is the greedy (first argmax) choice."""

    first: int
    targets: torch.Tensor
    chosen: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor
    greedy: torch.Tensor


class ModelRunner:
    def __init__(self, loaded: LoadedModel, num_blocks: int, block_size: int, compiled_kernels: bool = True) -> None:
        self.model, self.device = loaded.model, loaded.device
        on_cpu = compiled_kernels and loaded.device.type == "cpu"
        decode_kernel = kernels.paged_attention() if on_cpu else None
        self._rows_kernel = kernels.logit_rows() if on_cpu else None  # target logprobs in one pass
        self.cache = KVCache(
            self.model.cfg,
            num_blocks,
            block_size,
            device=loaded.device,
            dtype=loaded.dtype,
            decode_kernel=decode_kernel,
        )
        self._stacks: OrderedDict[tuple[int, ...], AdapterStack] = OrderedDict()  # least recently used first

    def _stack(self, adapters: tuple[Adapter, ...]) -> AdapterStack:
        """The stacked weights of the adapters a step mixes, kept for the next steps (the mix of a running
        batch changes only as requests come and go)."""
        key = tuple(id(a) for a in adapters)
        stack = self._stacks.pop(key, None) or AdapterStack.of(adapters)
        self._stacks[key] = stack  # the stack holds its adapters, so their ids are not reused meanwhile
        while len(self._stacks) > STACKS_KEPT:
            self._stacks.popitem(last=False)
        return stack

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, argmax_only: bool = False) -> RunnerOutput:
        """`argmax_only`: every sampling sequence only wants its logits' first argmax (sampler.argmax_only),
        which the model may then give without computing the logits (`argmax_ids`)."""
        seqs, counts = batch.seqs, batch.num_new_tokens
        layout = BatchLayout(
            tuple(counts), tuple(s.num_computed_tokens for s in seqs), tuple(tuple(s.table.blocks) for s in seqs)
        )
        ids = [t for s, n in zip(seqs, counts) for t in s.token_ids[s.num_computed_tokens : s.num_computed_tokens + n]]
        ids = torch.tensor(ids, device=self.device)
        adapters = None
        if any(s.adapter is not None for s in seqs):
            row_adapters = [s.adapter for s, n in zip(seqs, counts) for _ in range(n)]
            adapters = AdapterRows.of(row_adapters, self.device, self._stack)
        hidden = self.model(ids, layout.positions(self.device), layout, self.cache, adapters)  # (T, n_embd)
        ends = torch.tensor(counts).cumsum(0) - 1
        # Sequences that reach their last token and generate: their last row's logits (scoring ones need none).
        sampling = [s.num_computed_tokens + n == s.num_tokens and not s.score_only for s, n in zip(seqs, counts)]
        rows = ends[torch.tensor(sampling, dtype=torch.bool)].to(self.device)
        numbered = iter(range(len(seqs)))
        last_rows = [next(numbered) if wanted else None for wanted in sampling]
        scores = self._prompt_scores(seqs, counts, hidden)
        ids = self.model.greedy_tokens(hidden[rows]) if argmax_only else None
        if ids is not None:
            return RunnerOutput(None, last_rows, scores, ids)
        return RunnerOutput(self.model.compute_logits(hidden[rows]), last_rows, scores)  # (num_sampling, vocab)

    def _prompt_scores(self, seqs, counts, hidden: torch.Tensor) -> list[PromptScores | None]:
        out, start = [], 0
        for seq, n in zip(seqs, counts):
            first = seq.num_computed_tokens
            lo = max(first, (seq.score_from or 1) - 1)
            hi = min(first + n, seq.num_prompt_tokens - 1)  # position j predicts token j + 1
            if seq.score_from is None or lo >= hi:
                out.append(None)
            else:
                rows = hidden[start + lo - first : start + hi - first]  # (hi - lo, n_embd)
                targets = torch.tensor(seq.token_ids[lo + 1 : hi + 1], device=self.device)
                out.append(self._score_rows(lo, rows, targets, seq.params.prompt_logprobs or 0))
            start += n
        return out

    def _score_rows(self, first: int, rows: torch.Tensor, targets: torch.Tensor, top: int) -> PromptScores:
        """The head and its log-softmax a chunk of rows at a time: the whole (n, vocab) float32 logits of
        a long prompt would be tens of MB, fresh pages on every call."""
        parts = []
        for i in range(0, len(rows), SCORE_CHUNK_ROWS):
            logits = self.model.compute_logits(rows[i : i + SCORE_CHUNK_ROWS])  # (chunk, vocab), model dtype
            wanted = targets[i : i + SCORE_CHUNK_ROWS]
            if top == 0 and self._rows_kernel is not None:  # no alternatives: no (chunk, vocab) log_softmax
                chosen, greedy = self._rows_kernel.target_logprobs(logits, wanted)
                none = torch.empty(len(wanted), 0)
                parts.append((chosen, none.long(), none, greedy))
                continue
            logits = logits.float()
            chosen, top_ids, top_lps = logprobs_topn(logits, wanted, top)
            parts.append((chosen, top_ids, top_lps, logits.max(dim=-1).indices == wanted))  # first argmax
        chosen, top_ids, top_lps, greedy = (torch.cat(p) for p in zip(*parts))
        return PromptScores(first, targets, chosen, top_ids, top_lps, greedy)
