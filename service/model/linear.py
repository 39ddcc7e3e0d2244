"""How the model's linear layers are computed on this machine: one kernel for few rows (decode of a few
sequences: memory-bound) and one for many (batched decode, prefill, scoring: compute-bound), each chosen by
timing the candidates once per process, model shape, dtype and thread count.

Kernels (all give the same products up to float rounding, ~1e-6 relative in float32):
- `aten`: `F.linear` (MKL on x86 builds of torch);
- `weight_left`: the same product as (W x^T)^T, which MKL computes much faster on some CPUs (measured on a
  2-core AVX2 EPYC, 48 GPT-2-small linears at 64 rows: 154 -> 99 ms); large regime only;
- `onednn`: torch's bundled oneDNN on a weight packed once at load (`mkldnn._reorder_linear_weight`), with
  the activation (GELU, ReLU) or the residual add fused into the product. Where bf16 matrix units exist
  (AMX) this is their path; on AMD CPUs, where MKL takes a generic slow path, it is oneDNN's AVX2 code.

Nothing here decides the dtype or the batch: the engine's runner does.
"""

import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

SMALL_ROWS = 16  # fewer rows than this: the small regime (memory-bound: every kernel streams the weight)
KERNELS = ("aten", "weight_left", "onednn")
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
class KernelChoice:
    small: str = "aten"
    large: str = "aten"

    def describe(self) -> str:
        return f"{self.small} below {SMALL_ROWS} rows, {self.large} from {SMALL_ROWS}"


class Linear(nn.Linear):
    """`nn.Linear` whose product is computed by the kernels `use()` set; `activation` and `residual` are
    applied to the product (fused where the kernel can)."""

    choice = KernelChoice()
    _packed: torch.Tensor | None = None

    def use(self, choice: KernelChoice) -> None:
        self.choice, self._packed = choice, _pack(self.weight, choice)

    def forward(
        self, x: torch.Tensor, activation: str | None = None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (T, in). activation: a name of `ACTIVATIONS`; residual: (T, out), added last."""
        return _product(self.choice, x, self.weight, self.bias, self._packed, activation, residual)


def _pack(weight: torch.Tensor, choice: KernelChoice) -> torch.Tensor | None:
    """oneDNN's packed copy of `weight`, where `choice` uses oneDNN."""
    if "onednn" not in (choice.small, choice.large):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 64)


def _product(choice: KernelChoice, x, weight, bias, packed, activation=None, residual=None) -> torch.Tensor:
    """x W^T + bias, then the activation, then + residual, by the kernel `choice` names for x's rows."""
    kernel = choice.small if x.shape[0] < SMALL_ROWS else choice.large
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


@torch.inference_mode()
def choose(linears: list, key: tuple, rows: int = 64) -> KernelChoice:
    """The fastest kernel per regime for these linears (one block's, standing for every block), timed at 1
    and `rows` rows; cached per `key`, so every engine in a process computes the same numbers. A kernel
    replaces `aten` only when it is at least 5 % faster."""
    if key in _CHOICES:
        return _CHOICES[key]
    weight = linears[0].weight
    if weight.device.type != "cpu":
        choice = KernelChoice()
    else:
        candidates = [k for k in KERNELS if k != "onednn" or onednn_available(weight)]
        small = _fastest(linears, [k for k in candidates if k != "weight_left"], 1)
        large = _fastest(linears, candidates, max(rows, SMALL_ROWS))
        choice = KernelChoice(small, large)
    _CHOICES[key] = choice
    return choice


def _fastest(linears: list, kernels: list[str], rows: int, rounds: int = 7) -> str:
    """The kernel with the lowest median time over `rounds` interleaved rounds (each round times every
    kernel once, so a slow spell of a shared machine falls on all of them); `aten` unless another is at
    least 5 % faster."""
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
    return best if median[best] < 0.95 * median["aten"] else "aten"


def _best_time(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
