"""What the hardware can do, asked in one place: the service's `dtype=auto` and fine-tuning's `--bf16 auto`.

Imports torch, so it is not re-exported from the light `model_store` package; import it on use.
"""

import torch


def has_bf16_matrix_units(device: torch.device) -> bool:
    """True where bfloat16 matmuls run on matrix units (CUDA sm80+, AMX CPUs); elsewhere bf16 is emulated
    and slower than float32 (measured 20 vs 96 GFLOP/s on an AVX2-only EPYC)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return torch.cpu._is_amx_tile_supported()
