"""A fine-tuning run's configuration: what changes the numbers (`TrainConfig`) and what does not
(`RunOptions`: where to write, how to publish, whether to draw a progress bar).

`TrainConfig` is frozen and JSON-able; a run saves it (defaults resolved) as `config.json` in its run
directory, `--resume` reads it back, and the exported manifest records it as the lineage's training config.
Light to import: no torch.
"""

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import StoreError

BF16_MODES = ("auto", "on", "off")
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # GPT-2's Conv1D projections (attention and MLP)


@dataclass(frozen=True)
class TrainConfig:
    data: tuple[str, ...] = ()
    base: str | None = None  # name@version of the store version to start from; None: from scratch
    from_scratch: bool = False
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_positions: int = 1024
    tokenizer: str | None = None  # directory, or name@ref of a store version (scratch only)
    eval_file: tuple[str, ...] = ()
    eval_fraction: float = 0.05  # of the packed training blocks, when no eval file is given
    block_size: int | None = None  # default min(1024, n_positions)
    batch_size: int = 8  # sequences per micro-batch, per process
    grad_accum: int = 1
    steps: int | None = None  # optimizer steps; or derive from epochs
    epochs: float | None = None
    lr: float | None = None  # default: 6e-4 from scratch, 2e-4 with LoRA, 5e-5 full fine-tuning
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup_steps: int | None = None  # default 5% of steps
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    max_grad_norm: float = 1.0
    dropout: float = 0.0
    bf16: str = "auto"
    seed: int = 0
    checkpoint_every: int = 100
    eval_every: int = 100
    eval_max_blocks: int | None = None
    patience: int | None = None  # evaluations without improvement before stopping early
    negatives: int = 0
    negative_weight: float = 1.0
    lora_r: int = 0
    lora_alpha: float | None = None  # default 2 * r
    lora_dropout: float = 0.0
    world_size: int = 1  # processes; recorded so a resume keeps the global batch

    def __post_init__(self) -> None:
        _check(self)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def lora(self) -> bool:
        return self.lora_r > 0

    def resolved(self, *, n_positions: int, num_train_blocks: int | None = None) -> "TrainConfig":
        """Defaults that depend on the model or the data, filled in (block size first, then steps)."""
        changes: dict[str, Any] = {}
        if self.block_size is None:
            changes["block_size"] = min(1024, n_positions)
        elif self.block_size > n_positions:
            raise StoreError(f"block size {self.block_size} exceeds the model's context n_positions={n_positions}")
        if num_train_blocks is not None:
            steps = self.steps or math.ceil(self.epochs * num_train_blocks / self.global_batch)
            changes["steps"] = steps
            changes["warmup_steps"] = self.warmup_steps if self.warmup_steps is not None else round(0.05 * steps)
        if self.lr is None:
            changes["lr"] = 6e-4 if self.from_scratch else 2e-4 if self.lora else 5e-5
        if self.lora and self.lora_alpha is None:
            changes["lora_alpha"] = 2.0 * self.lora_r
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["data"], data["eval_file"] = list(self.data), list(self.eval_file)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise StoreError(f"unknown training options: {', '.join(unknown)}")
        data = dict(data)
        for key in ("data", "eval_file"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


@dataclass(frozen=True)
class RunOptions:
    run_dir: Path
    resume: bool = False
    name: str | None = None  # store name for the export; default: the base's name
    alias: str | None = None
    dtype: str | None = None  # stored dtype; default: the base's, float32 from scratch
    data_license: str = "unknown"
    sample_prompt: str | None = None
    export: bool = True
    export_adapter: bool = False  # publish a LoRA run as an adapter version of its base, not merged
    progress: bool = True
    device: str = "cpu"
    overrides: dict[str, Any] = field(default_factory=dict)  # options given on the command line
    card_appendix: str = ""  # markdown appended to the exported model card
    extra_metrics: dict[str, Any] = field(default_factory=dict)  # merged into the exported manifest's metrics


def _check(c: TrainConfig) -> None:
    def positive(*keys: str) -> None:
        for key in keys:
            value = getattr(c, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise StoreError(f"{key.replace('_', '-')} must be a positive integer, got {value!r}")

    positive(
        "n_layer",
        "n_head",
        "n_embd",
        "n_positions",
        "block_size",
        "batch_size",
        "grad_accum",
        "steps",
        "checkpoint_every",
        "eval_every",
        "eval_max_blocks",
        "patience",
        "world_size",
    )
    if not c.data:
        raise StoreError("no training data: pass one or more text or JSONL files")
    if c.from_scratch == (c.base is not None):
        raise StoreError("give either a base model (NAME@REF) or --from-scratch, not both or neither")
    if c.from_scratch and c.tokenizer is None:
        raise StoreError("--from-scratch needs --tokenizer (a tokenizer directory or a store version NAME@REF)")
    if not c.from_scratch and c.tokenizer is not None:
        raise StoreError("--tokenizer applies to --from-scratch only; a base model brings its own tokenizer")
    if c.n_embd % c.n_head:
        raise StoreError(f"n-embd {c.n_embd} is not divisible by n-head {c.n_head}")
    if c.steps is None and c.epochs is None:
        raise StoreError("give --steps or --epochs")
    if c.epochs is not None and c.epochs <= 0:
        raise StoreError(f"epochs must be positive, got {c.epochs}")
    if not c.eval_file and not 0 < c.eval_fraction < 1:
        raise StoreError(f"eval fraction must be between 0 and 1, got {c.eval_fraction}")
    if c.bf16 not in BF16_MODES:
        raise StoreError(f"bf16 must be one of {', '.join(BF16_MODES)}, got {c.bf16!r}")
    if c.negatives < 0 or c.negative_weight < 0:
        raise StoreError("negatives and negative weight must not be negative")
    if c.lora_r < 0 or not 0 <= c.lora_dropout < 1 or not 0 <= c.dropout < 1:
        raise StoreError("lora-r must be >= 0 and dropout rates in [0, 1)")
    if c.lr is not None and c.lr <= 0:
        raise StoreError(f"learning rate must be positive, got {c.lr}")


def read_config(path: Path) -> TrainConfig:
    try:
        return TrainConfig.from_dict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as exc:
        raise StoreError(f"cannot read the run's config {path}: {exc}") from None
