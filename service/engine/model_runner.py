"""Turns a scheduled batch into one GPT-2 forward and returns the logits the engine needs.

Owns the KV cache tensors (sized by the engine from its memory budget) and the translation of sequences
into a flat token batch with block tables. It knows nothing of sampling or text.
"""

from dataclasses import dataclass

import torch

from service.model import BatchLayout, KVCache, kernels
from service.model.loader import LoadedModel

from .scheduler import ScheduledBatch


@dataclass
class RunnerOutput:
    """Logits (model dtype) of every scheduled sequence that reached the end of its tokens this step (the
    ones that sample), one row each, in batch order; `last_rows[i]` is sequence i's row, `None` for a
    sequence still part-way through a prefill chunk. One tensor, so the sampler reads it without a copy."""

    last_logits: torch.Tensor  # (num_complete, vocab)
    last_rows: list[int | None]
    # Per sequence that wants prompt logprobs: (first position, float32 logits (n, vocab)) for the
    # positions in this chunk that predict a wanted prompt token; None otherwise.
    prompt_logits: list[tuple[int, torch.Tensor] | None]


class ModelRunner:
    def __init__(self, loaded: LoadedModel, num_blocks: int, block_size: int, compiled_kernels: bool = True) -> None:
        self.model, self.device = loaded.model, loaded.device
        decode_kernel = kernels.paged_attention() if compiled_kernels and loaded.device.type == "cpu" else None
        self.cache = KVCache(
            self.model.cfg,
            num_blocks,
            block_size,
            device=loaded.device,
            dtype=loaded.dtype,
            decode_kernel=decode_kernel,
        )

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> RunnerOutput:
        seqs, counts = batch.seqs, batch.num_new_tokens
        layout = BatchLayout(
            tuple(counts), tuple(s.num_computed_tokens for s in seqs), tuple(tuple(s.table.blocks) for s in seqs)
        )
        ids = [t for s, n in zip(seqs, counts) for t in s.token_ids[s.num_computed_tokens : s.num_computed_tokens + n]]
        ids = torch.tensor(ids, device=self.device)
        hidden = self.model(ids, layout.positions(self.device), layout, self.cache)  # (T, n_embd)
        ends = torch.tensor(counts).cumsum(0) - 1
        complete = [s.num_computed_tokens + n == s.num_tokens for s, n in zip(seqs, counts)]
        rows = ends[torch.tensor(complete)].to(self.device)
        logits = self.model.compute_logits(hidden[rows])  # (num_complete, vocab)
        numbered = iter(range(len(seqs)))
        last_rows = [next(numbered) if done else None for done in complete]
        return RunnerOutput(logits, last_rows, self._prompt_logits(seqs, counts, hidden))

    def _prompt_logits(self, seqs, counts, hidden: torch.Tensor) -> list[tuple[int, torch.Tensor] | None]:
        out, start = [], 0
        for seq, n in zip(seqs, counts):
            first = seq.num_computed_tokens
            lo = max(first, (seq.score_from or 1) - 1)
            hi = min(first + n, seq.num_prompt_tokens - 1)  # position j predicts token j + 1
            if seq.score_from is None or lo >= hi:
                out.append(None)
            else:
                rows = hidden[start + lo - first : start + hi - first]
                out.append((lo, self.model.compute_logits(rows).float()))  # (hi - lo, vocab)
            start += n
        return out
