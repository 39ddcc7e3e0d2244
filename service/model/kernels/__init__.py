"""Compiled CPU kernels for the model, built on first use with `torch.utils.cpp_extension` (g++, ninja),
for the CPU this process runs on (-march=native). Each has a pure-PyTorch twin in the model code that gives
the same results, used where the kernel cannot be built (no compiler) or is switched off; the tests compare
the two.

- `paged_attention()`: decode attention reading the paged KV cache in place (`paged_attention.cpp`),
  instead of gathering every sequence's context into a contiguous copy per layer and step.
- `int8_linear()`: the int8 linear in one call (`int8_linear.cpp`): quantize the rows, oneDNN's int8
  product, rescale + bias + activation + residual in one pass; twin: `linear._int8`.
- `gemv()`: the float32 linear for one or two rows (`gemv.cpp`); twin: `F.linear`.
- `logit_rows()`: reductions over rows of logits (`logit_rows.cpp`): greedy decoding's argmax (twin:
  `torch.max(dim=-1).indices`) and scoring's target logprobs (twin: `sampler.logprobs_topn`).
"""

import logging
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
_built: dict[str, object] = {}


def paged_attention():
    """The compiled module (with `paged_decode_attention`), or None when it cannot be built here."""
    return _build("paged_attention", ["paged_attention.cpp"])


def int8_linear():
    """The compiled module (with `int8_linear`, `quantize_rows`), or None when it cannot be built here."""
    return _build("int8_linear", ["int8_linear.cpp"])


def gemv():
    """The compiled module (with `linear_small`), or None when it cannot be built here."""
    return _build("gemv", ["gemv.cpp"])


def logit_rows():
    """The compiled module (with `argmax_rows`, `target_logprobs`), or None when it cannot be built here."""
    return _build("logit_rows", ["logit_rows.cpp"])


def _build(name: str, sources: list[str]):
    if name not in _built:
        isa = torch.backends.cpu.get_cpu_capability().lower()
        start = time.monotonic()
        try:
            from torch.utils import cpp_extension

            module = cpp_extension.load(
                name=f"gpt2_serve_{name}_{isa}",  # one build per instruction set: -march=native
                sources=[str(HERE / s) for s in sources],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as exc:  # no compiler, no ninja, a build error: the PyTorch path serves
            logger.warning("compiled kernel %s unavailable, using the PyTorch path: %s", name, exc)
            module = None
        else:
            logger.info("compiled kernel %s ready in %.1f s", name, time.monotonic() - start)
        _built[name] = module
    return _built[name]
