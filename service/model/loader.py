"""Load a store version onto a device in a compute dtype: verified hashes, strict weights, tokenizer.

Owns the device/dtype rules: float32 and bfloat16 everywhere, float16 on CUDA only, and `auto`: bfloat16
where the hardware has bf16 matrix units (AMX CPUs, CUDA sm80+), else float32. Without such units bf16
matmuls are emulated and slower than float32 (measured 20 vs 96 GFLOP/s on an AVX2-only EPYC). Under int8
quantization `auto` is float32: with int8 weights, bf16 activations were slower on an AMX Xeon (GPT-2 small,
64 concurrent: 1068 against 1142 tok/s; equal at batch 1).
"""

from dataclasses import dataclass

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from model_store import Manifest, ModelRef, ModelStore
from model_store.hardware import has_bf16_matrix_units
from model_store.manifest import WEIGHTS_FILE

from . import memory
from .gpt2 import GPT2

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoadedModel:
    model: GPT2
    tokenizer: Tokenizer
    manifest: Manifest
    device: torch.device
    dtype: torch.dtype


def resolve_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    return dev


def resolve_dtype(dtype: str, device: torch.device, quantization: str = "none") -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if has_bf16_matrix_units(device) and quantization == "none" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    if dtype == "float16" and device.type != "cuda":
        raise ValueError("float16 is supported on CUDA only; use float32 or bfloat16 on CPU")
    return DTYPES[dtype]


def load_model(
    store: ModelStore, ref: str | ModelRef, *, device: str = "cpu", dtype: str = "float32", quantization: str = "none"
) -> LoadedModel:
    """Resolve `ref`, verify every file's hash, and build the model on `device` in `dtype` (`quantization`:
    what the engine will run it with, which `auto` takes into account)."""
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev, quantization)
    stored = store.verify(ref)
    stored.manifest.require_model()
    with torch.device("meta"):
        model = GPT2(stored.manifest.config)
    weights = load_file(str(stored.path / WEIGHTS_FILE), device=str(dev))
    weights = {k: weights.pop(k).to(torch_dtype) for k in list(weights)}
    if dev.type == "cpu":
        weights = memory.on_huge_pages(weights)  # decode streams them every step
    model.load_state_dict(weights, strict=True, assign=True)
    model.eval().requires_grad_(False)
    tokenizer = Tokenizer.from_file(str(stored.path / stored.manifest.tokenizer.file))
    return LoadedModel(model, tokenizer, stored.manifest, dev, torch_dtype)
