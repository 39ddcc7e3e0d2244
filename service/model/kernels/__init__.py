"""Compiled CPU kernels for the model, one module built on first use with `torch.utils.cpp_extension` (g++,
ninja) for the CPU this process runs on (-march=native). Each kernel has a pure-PyTorch twin in the model
code that gives the same results, used where the module cannot be built (no compiler) or is switched off;
the tests compare the two. The accessors below all return that one module (or None), named for what the
caller uses of it:

- `paged_attention()`: decode attention reading the paged KV cache in place (`paged_attention.cpp`),
  instead of gathering every sequence's context into a contiguous copy per layer and step.
- `int8_linear()`: the int8 linear in one call (`int8_linear.cpp`): quantize the rows, oneDNN's int8
  product, rescale + bias + activation + residual in one pass; twin: `linear._int8`.
- `gemv()`: the float32 linear for one or two rows (`gemv.cpp`); twin: `F.linear`.
- `logit_rows()`: reductions over rows of logits (`logit_rows.cpp`): greedy decoding's argmax (twin:
  `torch.max(dim=-1).indices`) and scoring's target logprobs (twin: `sampler.logprobs_topn`).
- `small_decoder()`: the model's forward for a decode step of one or two sequences in one call
  (`decode_small.cpp`, `SmallDecoder`), the same calls as `GPT2.forward` makes without it.
"""

import functools
import logging
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent

SOURCES = ("module.cpp", "gemv.cpp", "int8_linear.cpp", "paged_attention.cpp", "logit_rows.cpp", "decode_small.cpp")


def paged_attention():
    """The compiled module (`paged_decode_attention`), or None when it cannot be built here."""
    return _build()


def int8_linear():
    """The compiled module (`int8_linear`, `quantize_rows`), or None when it cannot be built here."""
    return _build()


def gemv():
    """The compiled module (`linear_small`), or None when it cannot be built here."""
    return _build()


def logit_rows():
    """The compiled module (`argmax_rows`, `target_logprobs`), or None when it cannot be built here."""
    return _build()


def small_decoder():
    """The compiled module (`SmallDecoder`), or None when it cannot be built here."""
    return _build()


@functools.cache
def _build():
    isa = torch.backends.cpu.get_cpu_capability().lower()
    start = time.monotonic()
    try:
        from torch.utils import cpp_extension

        module = cpp_extension.load(
            name=f"gpt2_serve_kernels_{isa}",  # one build per instruction set: -march=native
            sources=[str(HERE / s) for s in SOURCES],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_include_paths=[str(HERE)],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, a build error: the PyTorch path serves
        logger.warning("compiled kernels unavailable, using the PyTorch path: %s", exc)
        return None
    logger.info("compiled kernels ready in %.1f s", time.monotonic() - start)
    return module
