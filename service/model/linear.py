"""How the model's linear layers are computed on this machine: one kernel for few rows (decode of a few
sequences: memory-bound) and one for many (batched decode, prefill, scoring: compute-bound), each chosen by
timing the candidates once per process, model shape, dtype and thread count.

Kernels (all give the same products up to float rounding, ~1e-6 relative in float32):
- `aten`: `F.linear` (MKL on x86 builds of torch);
- `weight_left`: the same product as (W x^T)^T, which MKL computes much faster on some CPUs (measured on a
  2-core AVX2 EPYC, 48 GPT-2-small linears at 64 rows: 154 -> 99 ms); large regime only;
- `gemv` (small regime, float32, where the C++ kernel builds): our own product for one or two rows
  (`kernels/gemv.cpp`), which streams the weight in contiguous runs per thread; 3 to 15 rows go to the
  large regime's kernel (with MKL, F.linear at 8 rows took 78 ms per GPT-2-small step on a Zen 4 EPYC);
- `onednn`: torch's bundled oneDNN on a weight packed once at load (`mkldnn._reorder_linear_weight`), with
  the activation (GELU, ReLU) or the residual add fused into the product. Where bf16 matrix units exist
  (AMX) this is their path; on AMD CPUs, where MKL takes a generic slow path, it is oneDNN's AVX2 code.
- `int8` (`QUANTIZATION=int8` only, never chosen by timing): oneDNN's int8 product
  (`onednn::qlinear_pointwise`: AMX-INT8, AVX-512 VNNI or AVX2, whichever the CPU has) on weights quantized
  symmetrically per output channel, with each activation row quantized on the fly to 8 bits with its own
  scale (as CTranslate2's int8 and llama.cpp's q8_0 do); the exact int32 product is rescaled, biased,
  activated and added in float32, then rounded once to the activation dtype. Where `kernels.int8_linear`
  builds, each linear is one C++ call, with our own product below `GEMV_ROWS` rows. Not exact: its cost in
  quality is measured in docs/engine.md.

Nothing here decides the dtype or the batch: the engine's runner does.
"""

import dataclasses
import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels, memory
from .lora import AdapterRows

SMALL_ROWS = 16  # fewer rows than this: the small regime (memory-bound: every kernel streams the weight)
GEMV_ROWS = 3  # fewer rows than this: our compiled products (`gemv`, and int8's), faster than the libraries
KERNELS = ("aten", "weight_left", "onednn", "gemv")  # the exact kernels, chosen by timing
# In the small regime `gemv` stays unless another kernel is more than 10 % faster at one row: a product's time
# leaves out what gemv enables, the blocks' one-call decoder (no Python per layer) and the head's bfloat16
# greedy screen (half the head's bytes; 2-core Zen 5 EPYC, GPT-2 small: gemv 3.3 ms, oneDNN 3.3-3.8 ms, the
# screened greedy head 1.6-2.0 ms), and the two timed within noise of each other chose either, start to start.
GEMV_MARGIN = 0.9
QUANTIZATIONS = ("none", "int8")
# The model's activation functions (the names of HF's ACT2FN), and those oneDNN fuses into the product:
# name -> (oneDNN post-op, its algorithm).
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
FUSABLE = {
    "gelu_new": ("gelu", "tanh"),
    "gelu_pytorch_tanh": ("gelu", "tanh"),
    "gelu_fast": ("gelu", "tanh"),
    "gelu": ("gelu", "none"),
    "relu": ("relu", ""),
}


def onednn_available(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and torch.backends.mkldnn.is_available()


@dataclass(frozen=True)
class Int8Weight:
    """A weight quantized per output channel (symmetric, [-127, 127]) and packed for oneDNN's int8 product;
    `compiled`: the C++ module that runs the whole linear in one call (kernels.int8_linear), or None."""

    packed: torch.Tensor
    scales: torch.Tensor  # (out,) float32: weight ~= q * scales[:, None]
    zero_points: torch.Tensor  # (out,) int64 zeros, as the op wants them
    compiled: object | None = None
    # With `compiled`: q itself (out, in) and its row sums (int32), which the compiled kernel's own product
    # streams for fewer than GEMV_ROWS rows (there oneDNN's int8 product reads DRAM at 2/3 of the
    # bandwidth a plain read gets: 13-15 against 20-22 GB/s on a 2-core Xeon).
    plain: torch.Tensor | None = None
    sums: torch.Tensor | None = None


def int8_on_huge_pages(layers: list) -> None:
    """Moves the plain int8 weights of `layers` (Linear or Head, using int8 with the compiled kernel), which
    batch-1 decode streams every step, into one huge-page arena (service.model.memory)."""
    owners = [m for m in layers if isinstance(m._packed, Int8Weight) and m._packed.plain is not None]
    moved = memory.on_huge_pages({str(i): m._packed.plain for i, m in enumerate(owners)})
    for i, m in enumerate(owners):
        m._packed = dataclasses.replace(m._packed, plain=moved[str(i)])


def quantize_weight(weight: torch.Tensor, compiled: object | None = None) -> Int8Weight:
    w = weight.detach().float()
    scales = (w.abs().amax(1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    zeros = torch.zeros(len(scales), dtype=torch.long)
    packed = torch.ops.onednn.qlinear_prepack(q, None)
    if compiled is None:
        return Int8Weight(packed, scales, zeros)
    return Int8Weight(packed, scales, zeros, compiled, q.contiguous(), q.sum(1, dtype=torch.int32))


ACTIVATION_ZERO_POINT = 128  # rows are quantized symmetrically, stored as uint8 = q + 128 (what x86 int8 wants)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, in) -> uint8 (T, in) and float32 scales (T, 1): x ~= (q - 128) * scale, one scale per row."""
    scale = x.abs().amax(1, keepdim=True).float().clamp_min_(torch.finfo(torch.float32).tiny).div_(127)
    return torch.round(x / scale).add_(ACTIVATION_ZERO_POINT).to(torch.uint8), scale


@dataclass(frozen=True)
class KernelChoice:
    small: str = "aten"
    large: str = "aten"
    compiled: bool = False  # int8: run each linear in one C++ call (kernels.int8_linear) where it builds

    def describe(self) -> str:
        if self.small == self.large == "int8":
            return "int8" + (" (compiled where built)" if self.compiled else "")
        return f"{self.small} below {SMALL_ROWS} rows, {self.large} from {SMALL_ROWS}"


class Linear(nn.Linear):
    """`nn.Linear` whose product is computed by the kernels `use()` set; `activation` and `residual` are
    applied to the product (fused where the kernel can)."""

    choice = KernelChoice()
    _packed: torch.Tensor | None = None
    target = ""  # the projection's canonical name (`h.{i}.attn.qkv`), which LoRA adapters name

    def use(self, choice: KernelChoice) -> None:
        self.choice, self._packed = choice, _pack(self.weight, choice)

    def forward(
        self,
        x: torch.Tensor,
        activation: str | None = None,
        residual: torch.Tensor | None = None,
        adapters: AdapterRows | None = None,
    ) -> torch.Tensor:
        """x: (T, in). activation: a name of `ACTIVATIONS`; residual: (T, out), added last; `adapters`: the
        rows that add a LoRA update to the product (before the activation)."""
        if adapters is None or not adapters.adapts(self.target):
            return _product(self.choice, x, self.weight, self.bias, self._packed, activation, residual)
        y = adapters.add_to(_product(self.choice, x, self.weight, self.bias, self._packed), x, self.target)
        if activation is not None:
            y = ACTIVATIONS[activation](y)
        return y if residual is None else y + residual


def _pack(weight: torch.Tensor, choice: KernelChoice) -> torch.Tensor | Int8Weight | None:
    """oneDNN's packed copy of `weight`, where `choice` uses oneDNN (its int8 form for `int8`)."""
    if "int8" in (choice.small, choice.large):
        return quantize_weight(weight, kernels.int8_linear() if choice.compiled else None)
    if "onednn" not in (choice.small, choice.large):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 64)


def _product(choice: KernelChoice, x, weight, bias, packed, activation=None, residual=None) -> torch.Tensor:
    """x W^T + bias, then the activation, then + residual, by the kernel `choice` names for x's rows."""
    kernel = choice.small if x.shape[0] < SMALL_ROWS else choice.large
    if kernel == "gemv":
        if x.shape[0] < GEMV_ROWS and (activation is None or (activation in FUSED_GELU and residual is None)):
            gelu = FUSED_GELU[activation] if activation is not None else ""
            return kernels.gemv().linear_small(x, weight, bias, gelu, residual)
        kernel = choice.large  # 3 to 15 rows: the many-row kernel (F.linear's MKL is slow there on AMD)
    if kernel == "int8":
        return _int8(x, packed, bias, activation, residual)
    if kernel == "onednn":
        return _onednn(x, packed, bias, activation, residual)
    if kernel == "weight_left":  # (T, out), a transposed view
        y = (torch.mm(weight, x.t()) if bias is None else torch.addmm(bias[:, None], weight, x.t())).t()
    else:
        y = F.linear(x, weight, bias)
    if activation is not None:
        y = ACTIVATIONS[activation](y)
    return y if residual is None else y + residual


def _onednn(x, packed, bias, activation, residual) -> torch.Tensor:
    if residual is not None and activation is None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed, bias, "add")
    attr, algorithm = FUSABLE.get(activation, ("none", ""))
    y = torch.ops.mkldnn._linear_pointwise(x, packed, bias, attr, [], algorithm)
    if activation is not None and activation not in FUSABLE:
        y = ACTIVATIONS[activation](y)
    return y if residual is None else y + residual


# The activations our compiled linears (`gemv`, int8) apply themselves, as ATen's GELU approximation names.
FUSED_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}


def _int8(x, weight: Int8Weight, bias, activation, residual) -> torch.Tensor:
    """The int8 linear: compiled in one call where it was built, else this twin (the same float32 arithmetic
    after the exact int32 product, rounded once to x's dtype)."""
    fusable = activation is None or (activation in FUSED_GELU and residual is None)
    if weight.compiled is not None and fusable:
        gelu = FUSED_GELU[activation] if activation is not None else ""
        return weight.compiled.int8_linear(
            x,
            weight.packed,
            weight.scales,
            weight.zero_points,
            weight.plain,
            weight.sums,
            GEMV_ROWS,
            bias,
            gelu,
            residual,
        )
    q, scale = quantize_rows(x.contiguous())
    y = torch.ops.onednn.qlinear_pointwise(
        q,
        1.0,
        ACTIVATION_ZERO_POINT,
        weight.packed,
        weight.scales,
        weight.zero_points,
        None,
        1.0,
        0,
        torch.float32,
        "none",
        [],
        "",
    )  # (T, out) float32 = (q - 128) @ (w_q * w_scales)^T
    y = y.mul_(scale) if bias is None else torch.addcmul(bias.float(), y, scale)
    if activation is not None:
        y = ACTIVATIONS[activation](y)
    if residual is not None:
        y = y.add_(residual)
    return y.to(x.dtype)


class Head:
    """The LM head's product with the (tied) embedding matrix, by the kernels `use()` set; its rows are kept
    contiguous (the sampler reduces over them)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight, self.choice, self._packed = weight, KernelChoice(), None

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def use(self, choice: KernelChoice) -> None:
        self.choice, self._packed = choice, _pack(self.weight, choice)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return _product(self.choice, hidden, self.weight, None, self._packed).contiguous()


_CHOICES: dict[tuple, KernelChoice] = {}


def check_quantization(quantization: str, device: torch.device) -> None:
    """Raises ValueError where `quantization` cannot run on `device`."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; use {', '.join(QUANTIZATIONS)}")
    if quantization == "int8" and (device.type != "cpu" or not torch.backends.mkldnn.is_available()):
        raise ValueError("QUANTIZATION=int8 runs on CPU only (oneDNN's int8 product); use none on this device")


@torch.inference_mode()
def choose(
    linears: list, key: tuple, rows: int = 64, quantization: str = "none", compiled: bool = True
) -> KernelChoice:
    """The kernel per regime for these linears (one block's, standing for every block): with `quantization`
    int8, the int8 one (`compiled`: in one C++ call where it builds); else the fastest exact one, timed at 1
    and `rows` rows, cached per `key`, so every engine in a process computes the same numbers. A kernel
    replaces `aten` only when it is at least 5 % faster."""
    weight = linears[0].weight
    check_quantization(quantization, weight.device)
    if quantization == "int8":
        return KernelChoice("int8", "int8", compiled)
    if key in _CHOICES:
        return _CHOICES[key]
    if weight.device.type != "cpu":
        choice = KernelChoice()
    else:
        candidates = [k for k in KERNELS if k != "onednn" or onednn_available(weight)]
        gemv = compiled and weight.dtype == torch.float32 and kernels.gemv() is not None
        small_kernels = [k for k in candidates if k != "weight_left" and (k != "gemv" or gemv)]
        prefer, margin = ("gemv", GEMV_MARGIN) if gemv else ("aten", 0.95)
        small = _fastest(linears, small_kernels, 1, prefer=prefer, margin=margin)
        large = _fastest(linears, [k for k in candidates if k != "gemv"], max(rows, SMALL_ROWS))
        choice = KernelChoice(small, large)
    _CHOICES[key] = choice
    return choice


def _fastest(
    linears: list, kernels: list[str], rows: int, rounds: int = 7, prefer: str = "aten", margin: float = 0.95
) -> str:
    """The kernel with the lowest median time over `rounds` interleaved rounds (each round times every
    kernel once, so a slow spell of a shared machine falls on all of them); `prefer` unless another is
    faster by more than `margin` (0.95: at least 5 % faster)."""
    inputs = [torch.randn(rows, m.in_features, dtype=m.weight.dtype) for m in linears]
    saved = [m.choice for m in linears]
    times: dict[str, list[float]] = {k: [] for k in kernels}
    timing = KernelChoice("onednn", "onednn") if "onednn" in kernels else KernelChoice()
    for m in linears:  # packed once for all the rounds, not once per round
        m.use(timing)

    def run(kernel: str) -> float:
        for m in linears:
            m.choice = KernelChoice(kernel, kernel)
        return _best_time(lambda: [m(x) for m, x in zip(linears, inputs)], repeats=3)

    for kernel in kernels:
        run(kernel)  # warm-up: oneDNN builds its primitive on the first call
    for _ in range(rounds):
        for kernel in kernels:
            times[kernel].append(run(kernel))
    for m, choice in zip(linears, saved):
        m.use(choice)
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    best = min(median, key=median.get)
    return best if median[best] < margin * median[prefer] else prefer


def _best_time(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
