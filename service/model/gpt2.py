"""GPT-2 for inference: a flat batch of tokens at explicit positions, attending through a KV cache.

Parameter names and layouts are the store's canonical ones (`ArchConfig.tensor_shapes`), so a stored
version loads with a strict `load_state_dict`. No dropout, no training paths, no HF quirks (those were
resolved at import).
"""

import math

import torch
from torch import nn

from model_store.manifest import ArchConfig

from . import kernels, linear, memory
from .attention import BatchLayout, CacheIndex, KVCache, attend, cache_index, decode_tables
from .linear import ACTIVATIONS, Head, Linear
from .lora import AdapterRows

__all__ = ["ACTIVATIONS", "GPT2"]


class Attention(nn.Module):
    def __init__(self, cfg: ArchConfig, layer: int) -> None:
        super().__init__()
        self.qkv = Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = Linear(cfg.n_embd, cfg.n_embd)
        self.qkv.target, self.proj.target = f"h.{layer}.attn.qkv", f"h.{layer}.attn.proj"
        self.layer, self.n_head, self.head_dim = layer, cfg.n_head, cfg.head_dim
        self.scale = (1 / math.sqrt(cfg.head_dim)) if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            self.scale /= layer + 1

    def forward(
        self,
        x: torch.Tensor,
        layout: BatchLayout,
        cache: KVCache | None,
        index: CacheIndex | None,
        residual: torch.Tensor,
        adapters: AdapterRows | None = None,
    ) -> torch.Tensor:
        """residual + attention(x); x, residual: (T, n_embd)."""
        qkv = self.qkv(x, adapters=adapters)
        q, k, v = qkv.reshape(x.shape[0], 3, self.n_head, self.head_dim).unbind(1)  # (T, H, D) each
        out = attend(q, k, v, layer=self.layer, layout=layout, cache=cache, index=index, scale=self.scale)
        return self.proj(out, residual=residual, adapters=adapters)


class MLP(nn.Module):
    def __init__(self, cfg: ArchConfig, layer: int) -> None:
        super().__init__()
        self.fc = Linear(cfg.n_embd, cfg.n_inner)
        self.proj = Linear(cfg.n_inner, cfg.n_embd)
        self.fc.target, self.proj.target = f"h.{layer}.mlp.fc", f"h.{layer}.mlp.proj"
        self.activation = cfg.activation_function

    def forward(self, x: torch.Tensor, residual: torch.Tensor, adapters: AdapterRows | None = None) -> torch.Tensor:
        """residual + MLP(x); x, residual: (T, n_embd)."""
        hidden = self.fc(x, activation=self.activation, adapters=adapters)
        return self.proj(hidden, residual=residual, adapters=adapters)


class Block(nn.Module):
    def __init__(self, cfg: ArchConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg, layer)

    def forward(
        self,
        x: torch.Tensor,
        layout: BatchLayout,
        cache: KVCache | None,
        index: CacheIndex | None,
        adapters: AdapterRows | None = None,
    ) -> torch.Tensor:
        x = self.attn(self.ln_1(x), layout, cache, index, residual=x, adapters=adapters)
        return self.mlp(self.ln_2(x), residual=x, adapters=adapters)


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
        self._head: Head | None = None  # the head's kernels, built on first use
        self._decoder = None  # kernels.small_decoder()'s SmallDecoder, where prepare_kernels made one
        self._screen: torch.Tensor | None = None  # the head's weight in bfloat16, for greedy_tokens

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        layout: BatchLayout,
        cache: KVCache | None = None,
        adapters: AdapterRows | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: (T,) for the flat batch; `adapters`: the rows with a LoRA adapter (see
        `lora`). Returns final hidden states (T, n_embd)."""
        if self._decoder is not None and adapters is None and _small_decode(layout, cache):
            tables = decode_tables(layout, cache.block_size)
            return self._decoder.forward(input_ids, positions, cache.k, cache.v, *tables, cache.block_size)
        x = self.wte(input_ids) + self.wpe(positions)  # (T, n_embd)
        index = cache_index(layout, cache.block_size, x.device) if cache is not None else None
        for block in self.h:
            x = block(x, layout, cache, index, adapters)
        return self.ln_f(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, n_embd) -> (N, vocab_size) in the model's dtype; callers select the rows they need first."""
        return self.head(hidden)

    @property
    def head(self) -> Head:
        if self._head is None or self._head.weight is not self._head_weight():
            self._head = Head(self._head_weight())
        return self._head

    def _head_weight(self) -> torch.Tensor:
        return self.lm_head.weight if not self.cfg.tie_word_embeddings else self.wte.weight

    def prepare_kernels(self, rows: int = 64, quantization: str = "none", compiled: bool = True) -> str:
        """Choose and set up the linear kernels for this machine (see `linear`): with `quantization` int8,
        int8 weights for every linear and the head; else the exact kernels timed at 1 and `rows` rows, cached
        per process, shape and `compiled` (whether the C++ kernels may serve), so every engine in a process
        computes the same numbers. Returns their description."""
        dtype, threads = self.wte.weight.dtype, torch.get_num_threads()
        key = (self.cfg.n_embd, self.cfg.n_inner, self.cfg.vocab_size, rows, dtype, threads, compiled)
        block = self.h[0]
        linears = [block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj]
        blocks = linear.choose(linears, ("block", *key), rows, quantization, compiled)
        head = linear.choose([self.head], ("head", *key), rows, quantization, compiled)
        for module in self.modules():
            if isinstance(module, Linear):
                module.use(blocks)
        self.head.use(head)
        if quantization == "int8" and self.wte.weight.device.type == "cpu":
            linear.int8_on_huge_pages([m for m in self.modules() if isinstance(m, Linear)] + [self.head])
        self._decoder = self._small_decoder(blocks) if compiled else None
        self._screen = self._greedy_screen(head) if compiled else None
        return self.describe_kernels()

    def _greedy_screen(self, choice: linear.KernelChoice) -> torch.Tensor | None:
        """The head's weight in bfloat16 for `greedy_tokens`, where the head's product for one or two rows is
        `gemv` (the argmax it finds is that product's); None elsewhere."""
        if choice.small != "gemv":
            return None
        return memory.on_huge_pages({"screen": self.head.weight.to(torch.bfloat16)})["screen"]

    def greedy_tokens(self, hidden: torch.Tensor) -> list[int] | None:
        """The first argmax of each row's logits, for fewer than GEMV_ROWS rows (N, n_embd), found exactly
        without the float32 head whole (kernels.gemv().greedy_head: a bfloat16 screen, then the few
        candidates exactly); the same tokens as the argmax of `compute_logits` where its product is the
        compiled gemv. None where it does not apply (another dtype or device, more rows, a NaN)."""
        if self._screen is None or not 0 < hidden.shape[0] < linear.GEMV_ROWS:
            return None
        ids = kernels.gemv().greedy_head(hidden, self.head.weight, self._screen).tolist()
        return None if min(ids) < 0 else ids

    def _small_decoder(self, choice: linear.KernelChoice):
        """The forward of a decode step of fewer than GEMV_ROWS sequences in one C++ call, making the calls
        this module makes for such a step (compiled float32 `gemv` or int8 products), or None where it
        would make others."""
        module = kernels.small_decoder() if self.wte.weight.device.type == "cpu" else None
        int8 = choice.small == "int8" and choice.compiled
        fp32 = choice.small == "gemv" and self.wte.weight.dtype == torch.float32
        if module is None or not (int8 or fp32) or self.cfg.activation_function not in linear.FUSED_GELU:
            return None
        none = torch.empty(0)
        tensors, scales = [], []
        for block in self.h:
            row = [block.ln_1.weight, block.ln_1.bias, block.ln_2.weight, block.ln_2.bias]
            for m in (block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj):
                q = m._packed if int8 else None
                row += [m.weight, m.bias]
                row += [q.packed, q.scales, q.zero_points, q.plain, q.sums] if int8 else [none] * 5
            tensors.append(row)
            scales.append(block.attn.scale)
        eps, gelu = self.cfg.layer_norm_epsilon, linear.FUSED_GELU[self.cfg.activation_function]
        outer = [self.wte.weight, self.wpe.weight, self.ln_f.weight, self.ln_f.bias]
        return module.SmallDecoder(outer, tensors, scales, eps, self.cfg.n_head, gelu, int8, linear.GEMV_ROWS)

    def describe_kernels(self) -> str:
        isa = torch.backends.cpu.get_cpu_capability() if self.wte.weight.device.type == "cpu" else "cuda"
        return f"blocks: {self.h[0].mlp.fc.choice.describe()}; head: {self.head.choice.describe()} ({isa})"


def _small_decode(layout: BatchLayout, cache: KVCache | None) -> bool:
    """Whether this step is one the SmallDecoder computes: fewer than GEMV_ROWS sequences, each decoding its
    next token, attended by the compiled decode kernel."""
    return (
        0 < len(layout.query_lens) < linear.GEMV_ROWS
        and cache is not None
        and cache.decode_kernel is not None
        and all(q == 1 for q in layout.query_lens)
    )
