"""Helpers shared by the benchmarks: the random GPT-2-small store, timing, and a line describing the machine.

Benchmarks compare against baselines measured in the same run; the machine line says which CPU the
figures came from, because machines of the same kind differ (AVX2-only EPYC vs AMX Xeon).
"""

import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, models
from transformers import GPT2Config, GPT2LMHeadModel

from model_store import ModelStore
from model_store.import_hf import import_hf


def median_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median wall time of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{model}, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
        f"{torch.get_num_threads()} threads"
    )


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8")


def cpu_flags() -> str:
    """The CPU's vector and matrix extensions that matter to these kernels, as /proc/cpuinfo names them."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(f for f in SIMD_FLAGS if f in flags) or "none of " + ", ".join(SIMD_FLAGS)


def random_gpt2_small(tmp: Path) -> tuple[ModelStore, GPT2LMHeadModel]:
    """GPT-2-small shape with random weights (seed 0), saved in HF format and imported as `bench` into a
    store under `tmp`. Returns the store and the HF model on the same weights. No download."""
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(attn_pdrop=0, embd_pdrop=0, resid_pdrop=0)).eval()
    hf.save_pretrained(tmp / "hf")
    Tokenizer(models.BPE()).save(str(tmp / "hf" / "tokenizer.json"))  # a placeholder: benchmarks feed ids
    store = ModelStore(tmp / "store")
    import_hf(store, str(tmp / "hf"), "bench")
    return store, hf
