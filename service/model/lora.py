"""LoRA adapters at run time: an adapter's low-rank weights, and a flat batch's rows grouped by adapter, so that
one forward pass computes rows of several adapters (and of none) together.

A projection W with an adapter computes W x + scale B A x. Every row gets the base product in one call, as
without adapters; then each adapter present adds its low-rank update to its own rows (two thin products on
those rows only). Adding an adapter therefore never splits the batch, and a row's result does not depend on
the other rows' adapters.
"""

from dataclasses import dataclass

import torch

from model_store.manifest import AdapterInfo, ArchConfig


@dataclass(frozen=True, eq=False)
class Adapter:
    """One adapter's weights, ready for the forward pass: per projection (`h.{i}.{target}`), A (rank, in)
    and B (out, rank) in the model's dtype and device."""

    ref: str
    scale: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def from_tensors(
        cls, ref: str, info: AdapterInfo, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device
    ) -> "Adapter":
        """From an adapter file's canonical tensors (`model_store.adapters.read_adapter`)."""
        weights = {}
        for key in tensors:
            if key.endswith(".lora_a"):
                target = key.removesuffix(".lora_a")
                a, b = tensors[key], tensors[f"{target}.lora_b"]
                weights[target] = (a.to(device, dtype).contiguous(), b.to(device, dtype).contiguous())
        return cls(ref, info.scale, weights)

    def check(self, cfg: ArchConfig) -> None:
        shapes = cfg.tensor_shapes()
        for target, (a, b) in self.weights.items():
            rows, cols = shapes[f"{target}.weight"]
            if a.shape[1] != cols or b.shape[0] != rows or a.shape[0] != b.shape[1]:
                raise ValueError(f"adapter {self.ref}: {target} has A {tuple(a.shape)} and B {tuple(b.shape)}")


@dataclass(frozen=True)
class AdapterRows:
    """Which rows of a flat batch each adapter present computes: (adapter, row indices) pairs."""

    groups: tuple[tuple[Adapter, torch.Tensor], ...]

    @classmethod
    def of(cls, adapters: list[Adapter | None], device: torch.device | str = "cpu") -> "AdapterRows | None":
        """From each row's adapter (None: the base alone); None when no row has one."""
        rows: dict[int, tuple[Adapter, list[int]]] = {}
        for i, adapter in enumerate(adapters):
            if adapter is not None:
                rows.setdefault(id(adapter), (adapter, []))[1].append(i)
        if not rows:
            return None
        return cls(tuple((a, torch.tensor(r, dtype=torch.long, device=device)) for a, r in rows.values()))

    def add_to(self, y: torch.Tensor, x: torch.Tensor, target: str) -> bool:
        """y (T, out) += each adapter's update of `target` on its rows of x (T, in); False if none adapts it."""
        added = False
        for adapter, rows in self.groups:
            pair = adapter.weights.get(target)
            if pair is None:
                continue
            a, b = pair
            low = x.index_select(0, rows) @ a.t()  # (rows, rank)
            y.index_add_(0, rows, low @ b.t(), alpha=adapter.scale)
            added = True
        return added

    def adapts(self, target: str) -> bool:
        return any(target in adapter.weights for adapter, _ in self.groups)
