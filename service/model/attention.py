"""Attention over a flat batch of sequences, each at its own position, with an optional KV cache.

Owns the batch layout (which tokens belong to which sequence, how much of each is already cached) and
the KV storage tensors. It does not decide which sequence gets which cache slot: that is the engine's
KV manager. Prefill, chunked prefill and decode are the same call: a sequence contributes `query_len`
new tokens after `context_len` cached ones.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model_store.manifest import ArchConfig


@dataclass(frozen=True)
class BatchLayout:
    """Sequence i owns the next `query_lens[i]` tokens of the flat batch; its first new token sits after
    `context_lens[i]` tokens already in cache slot `slots[i]`."""

    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]
    slots: tuple[int, ...]

    def __post_init__(self) -> None:
        assert len(self.query_lens) == len(self.context_lens) == len(self.slots)
        assert all(q > 0 for q in self.query_lens) and all(c >= 0 for c in self.context_lens)

    @classmethod
    def prefill(cls, lengths: list[int] | tuple[int, ...]) -> "BatchLayout":
        """Whole sequences from position 0, in slots 0..n-1 (or without a cache)."""
        return cls(tuple(lengths), (0,) * len(lengths), tuple(range(len(lengths))))

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    def positions(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The usual positions for this layout: context_len, context_len + 1, ... per sequence. (T,)"""
        return torch.cat(
            [torch.arange(c, c + q, device=device) for q, c in zip(self.query_lens, self.context_lens)]
        )


class KVCache:
    """Keys and values per layer and slot: (n_layer, num_slots, n_head, max_seq_len, head_dim) each.

    Head-major within a slot, so one sequence's cached keys for one layer are a (n_head, len, head_dim)
    view that attention reads in place.
    """

    def __init__(
        self, cfg: ArchConfig, num_slots: int, max_seq_len: int, *, device: torch.device | str, dtype: torch.dtype
    ) -> None:
        shape = (cfg.n_layer, num_slots, cfg.n_head, max_seq_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_seq_len = max_seq_len

    @property
    def num_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layer: int,
    layout: BatchLayout,
    cache: KVCache | None,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached and new keys.

    q, k, v: (T, n_head, head_dim) for the flat batch. Writes the new k/v into the cache. Returns
    (T, n_head * head_dim).
    """
    outputs = []
    start = 0
    for q_len, ctx, slot in zip(layout.query_lens, layout.context_lens, layout.slots):
        end = start + q_len
        qi = q[start:end].transpose(0, 1)  # (H, q_len, D)
        ki, vi = k[start:end].transpose(0, 1), v[start:end].transpose(0, 1)
        if cache is not None:
            assert ctx + q_len <= cache.max_seq_len, "sequence exceeds its KV slot"
            cache.k[layer, slot, :, ctx : ctx + q_len] = ki
            cache.v[layer, slot, :, ctx : ctx + q_len] = vi
            ki, vi = cache.k[layer, slot, :, : ctx + q_len], cache.v[layer, slot, :, : ctx + q_len]
        else:
            assert ctx == 0, "a cached context needs a KV cache"
        out = F.scaled_dot_product_attention(qi, ki, vi, **_mask(q_len, ctx, q.device), scale=scale)
        outputs.append(out.transpose(0, 1))  # (q_len, H, D)
        start = end
    return torch.cat(outputs).flatten(1)


def _mask(q_len: int, ctx: int, device: torch.device) -> dict:
    """Query j (absolute position ctx + j) may see keys 0..ctx + j."""
    if q_len == 1:
        return {}
    if ctx == 0:
        return {"is_causal": True}
    return {"attn_mask": torch.ones(q_len, ctx + q_len, dtype=torch.bool, device=device).tril(diagonal=ctx)}
