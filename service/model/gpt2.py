"""GPT-2 for inference: a flat batch of tokens at explicit positions, attending through a KV cache.

Parameter names and layouts are the store's canonical ones (`ArchConfig.tensor_shapes`), so a stored
version loads with a strict `load_state_dict`. No dropout, no training paths, no HF quirks (those were
resolved at import).
"""

import math
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from model_store.manifest import ArchConfig

from .attention import BatchLayout, CacheIndex, KVCache, attend, cache_index

ACTIVATIONS = {
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "gelu_fast": partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


WEIGHT_LEFT_MIN_ROWS = 16  # below this both layouts are memory-bound and equal


class Linear(nn.Linear):
    """`nn.Linear` that can compute the same product as (W x^T)^T instead of x W^T. With MKL on some CPUs
    the weight-on-the-left form is much faster for batches of rows (measured on a 2-core AVX2 EPYC, 48
    GPT-2-small linears at 64 rows: 154 -> 99 ms); on others it is not. `choose_layout` times both once per
    process and model shape and sets `weight_left`; the output is then a transposed view."""

    weight_left = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_left and x.shape[0] >= WEIGHT_LEFT_MIN_ROWS:
            return torch.addmm(self.bias[:, None], self.weight, x.t()).t()  # (T, out), transposed view
        return F.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, cfg: ArchConfig, layer: int) -> None:
        super().__init__()
        self.qkv = Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = Linear(cfg.n_embd, cfg.n_embd)
        self.layer, self.n_head, self.head_dim = layer, cfg.n_head, cfg.head_dim
        self.scale = (1 / math.sqrt(cfg.head_dim)) if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            self.scale /= layer + 1

    def forward(
        self, x: torch.Tensor, layout: BatchLayout, cache: KVCache | None, index: CacheIndex | None
    ) -> torch.Tensor:
        q, k, v = self.qkv(x).reshape(x.shape[0], 3, self.n_head, self.head_dim).unbind(1)  # (T, H, D) each
        out = attend(q, k, v, layer=self.layer, layout=layout, cache=cache, index=index, scale=self.scale)
        return self.proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.fc = Linear(cfg.n_embd, cfg.n_inner)
        self.proj = Linear(cfg.n_inner, cfg.n_embd)
        self.act = ACTIVATIONS[cfg.activation_function]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: ArchConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, layout: BatchLayout, cache: KVCache | None, index: CacheIndex | None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), layout, cache, index)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, layout: BatchLayout, cache: KVCache | None = None
    ) -> torch.Tensor:
        """input_ids, positions: (T,) for the flat batch. Returns final hidden states (T, n_embd)."""
        x = self.wte(input_ids) + self.wpe(positions)  # (T, n_embd)
        index = cache_index(layout, cache.block_size, x.device) if cache is not None else None
        for block in self.h:
            x = block(x, layout, cache, index)
        return self.ln_f(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, n_embd) -> (N, vocab_size) in the model's dtype; callers select the rows they need first."""
        head = self.lm_head.weight if not self.cfg.tie_word_embeddings else self.wte.weight
        if self.h[0].mlp.fc.weight_left and hidden.shape[0] >= WEIGHT_LEFT_MIN_ROWS:
            return (head @ hidden.t()).t().contiguous()  # the sampler reduces over rows: keep them contiguous
        return F.linear(hidden, head)

    def describe_backend(self) -> str:
        """How the linear layers are computed, for benchmark reports."""
        layout = "(W x^T)^T" if self.h[0].mlp.fc.weight_left else "x W^T"
        isa = torch.backends.cpu.get_cpu_capability()
        return f"torch F.linear/addmm ({isa}), {layout} for >= {WEIGHT_LEFT_MIN_ROWS} rows"

    def choose_layout(self, rows: int = 64) -> bool:
        """Time one block's linears both ways at `rows` rows (CPU only) and keep the faster for every
        layer; cached per process and shape, so every engine in a process computes the same numbers."""
        key = (self.cfg.n_embd, self.cfg.n_inner, rows, self.wte.weight.dtype, torch.get_num_threads())
        if key not in _LAYOUT_CHOICE:
            _LAYOUT_CHOICE[key] = self.wte.weight.device.type == "cpu" and _weight_left_faster(self.h[0], rows)
        for module in self.modules():
            if isinstance(module, Linear):
                module.weight_left = _LAYOUT_CHOICE[key]
        return _LAYOUT_CHOICE[key]


_LAYOUT_CHOICE: dict[tuple, bool] = {}


@torch.inference_mode()
def _weight_left_faster(block: Block, rows: int) -> bool:
    linears = [block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj]
    inputs = [torch.randn(rows, m.in_features, dtype=m.weight.dtype) for m in linears]

    def timed(weight_left: bool) -> float:
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for m, x in zip(linears, inputs):
                m.weight_left = weight_left
                m(x)
            best = min(best, time.perf_counter() - start)
        return best

    timed(False), timed(True)  # warm-up
    return timed(True) < 0.9 * timed(False)
