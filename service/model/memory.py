"""Large CPU tensors on transparent huge pages: the weights and the KV cache, which every decode step streams.

Batch-1 decode reads every weight once per token (494 MB for GPT-2 small in float32), so it runs at the
machine's memory bandwidth; on 4 KiB pages that stream also walks a page table entry every 4 KiB. Backed by
2 MiB pages it read about 5-10 % faster on a 2-core Zen 4 EPYC (a plain read of the weights, interleaved
runs: 28.1 -> 31.5 GB/s). Linux gives huge pages to anonymous memory advised with MADV_HUGEPAGE when
/sys/kernel/mm/transparent_hugepage/enabled is `madvise` or `always`; elsewhere (`never`, no `madvise` in
Python's mmap, another OS) these are ordinary zeroed tensors, with the same values either way.
"""

import mmap

import torch

HUGE_PAGE = 2 * 1024 * 1024
ALIGN = 64  # each tensor starts on a cache line


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor, on huge pages where the OS gives them, its memory committed now (as torch.zeros
    does): left to fault in as the engine first writes it, the KV cache cost a 64-sequence decode step 4.5 ms
    of page faults inside its `index_copy_` calls (2 MiB pages zeroed on first touch)."""
    numel = 1
    for n in shape:
        numel *= n
    arena = _arena(numel * dtype.itemsize)
    if arena is None:
        return torch.zeros(shape, dtype=dtype)
    return arena[: numel * dtype.itemsize].zero_().view(dtype).view(shape)


def on_huge_pages(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies of `tensors` laid out in one huge-page arena (each contiguous, cache-line aligned). Takes
    the entries out of `tensors` as it copies them, so a caller that holds no other reference frees each
    original as it goes (the peak is one tensor over the arena, not two copies of everything)."""
    sizes = {name: _aligned(t.numel() * t.element_size()) for name, t in tensors.items()}
    arena = _arena(sum(sizes.values()))
    if arena is None:
        return tensors
    out, offset = {}, 0
    for name in list(tensors):
        t = tensors.pop(name)
        nbytes = t.numel() * t.element_size()
        view = arena[offset : offset + nbytes].view(t.dtype).view(t.shape)
        view.copy_(t)
        out[name] = view
        offset += sizes[name]
    return out


def _aligned(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


def _arena(nbytes: int) -> torch.Tensor | None:
    """A zeroed uint8 tensor of `nbytes` over an anonymous mapping advised for huge pages, starting on a
    huge-page boundary; None where huge pages cannot be asked for (or `nbytes` is under one page)."""
    if nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:
        buffer = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buffer.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return None
    whole = torch.frombuffer(buffer, dtype=torch.uint8)  # holds `buffer` for as long as any view lives
    start = (-whole.data_ptr()) % HUGE_PAGE
    return whole[start : start + nbytes]
