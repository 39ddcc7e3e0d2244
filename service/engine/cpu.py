"""Process-wide settings for running the engine on CPU: torch's thread count and the C allocator.

The allocator: every engine step allocates activations and logits of several MB (a 64-row float32 step's
logits alone are 13 MB), and glibc gives blocks above its mmap threshold back to the kernel when they are
freed, so each step pays page faults on fresh pages again (measured on a 2-core Xeon, GPT-2 small: a 2048-
token prefill 2.6 -> 1.6 s). Raising the mmap threshold to its maximum (32 MiB on 64-bit) and the trim
threshold keeps freed blocks in the heap for the next step. Only glibc has `mallopt`; elsewhere this is a
no-op.
"""

import ctypes
import ctypes.util
import functools
import os

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD = 1 << 30


def configure(num_threads: int | None) -> None:
    """torch's intra-op threads (default: the cores this process may use); the allocator, once."""
    torch.set_num_threads(num_threads or len(os.sched_getaffinity(0)))
    _keep_freed_memory()


@functools.cache
def _keep_freed_memory() -> bool:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
