"""The manifest: a stored model version's own description, and the file hashing it relies on.

Owns the schema (what a version records) and its JSON form. It does not decide where versions live or
when they are written: that is the registry's job.
"""

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import StoreError

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "model.safetensors"
ADAPTER_FILE = "adapter.safetensors"
TOKENIZER_FILE = "tokenizer.json"
ARCHITECTURE = "gpt2"
STORED_DTYPES = ("float32", "float16", "bfloat16")
# Activation names as HF's GPT2Config spells them; the runtime implements exactly these.
SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu", "silu", "swish", "quick_gelu")
_HASH_CHUNK = 1 << 22


@dataclass(frozen=True)
class ArchConfig:
    """Everything needed to build the network; names follow HF's GPT2Config."""

    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int
    vocab_size: int
    n_inner: int
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        for key in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size", "n_inner"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise StoreError(f"config {key} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise StoreError(f"config n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.activation_function not in SUPPORTED_ACTIVATIONS:
            raise StoreError(
                f"activation_function {self.activation_function!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The canonical weights a version stores; the runtime's parameter names are exactly these.

        Projections are nn.Linear (out, in). `lm_head.weight` exists only when the head is not tied to `wte`.
        """
        e, inner = self.n_embd, self.n_inner
        block = {
            "ln_1.weight": (e,),
            "ln_1.bias": (e,),
            "attn.qkv.weight": (3 * e, e),
            "attn.qkv.bias": (3 * e,),
            "attn.proj.weight": (e, e),
            "attn.proj.bias": (e,),
            "ln_2.weight": (e,),
            "ln_2.bias": (e,),
            "mlp.fc.weight": (inner, e),
            "mlp.fc.bias": (inner,),
            "mlp.proj.weight": (e, inner),
            "mlp.proj.bias": (e,),
        }
        shapes = {"wte.weight": (self.vocab_size, e), "wpe.weight": (self.n_positions, e)}
        for i in range(self.n_layer):
            shapes.update({f"h.{i}.{k}": v for k, v in block.items()})
        shapes.update({"ln_f.weight": (e,), "ln_f.bias": (e,)})
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, e)
        return shapes

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.tensor_shapes().values())


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class TokenizerInfo:
    eos_token_id: int | None
    bos_token_id: int | None
    chat_template: str | None = None
    file: str = TOKENIZER_FILE


@dataclass(frozen=True)
class Lineage:
    """Where a version came from. `source` is `huggingface-hub`, `local-directory` or `training`."""

    source: str
    hub_id: str | None = None
    hub_revision: str | None = None
    source_path: str | None = None
    parent: str | None = None
    training_config: dict[str, Any] | None = None
    data_sha256: dict[str, str] = field(default_factory=dict)


# The projections a LoRA adapter may change, by their canonical names (`ArchConfig.tensor_shapes` without
# `.weight`): GPT-2's four per block.
ADAPTER_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


@dataclass(frozen=True)
class AdapterInfo:
    """A LoRA adapter version: low-rank updates to some projections of exactly one base version, nothing
    else. Its file holds `h.{i}.{target}.lora_a` (rank, in) and `h.{i}.{target}.lora_b` (out, rank) for
    every block and target; the projection computes W x + (alpha / rank) B A x."""

    base: str  # the base version, name@version (never an alias)
    base_sha256: str  # the base's weights file, as its manifest lists it
    rank: int
    alpha: float
    targets: tuple[str, ...]
    file: str = ADAPTER_FILE

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise StoreError(f"adapter rank must be a positive integer, got {self.rank!r}")
        unknown = [t for t in self.targets if t not in ADAPTER_TARGETS]
        if not self.targets or unknown:
            raise StoreError(f"adapter targets must be among {', '.join(ADAPTER_TARGETS)}, got {list(self.targets)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def tensor_shapes(self, config: ArchConfig) -> dict[str, tuple[int, ...]]:
        """The adapter file's tensors for a base of `config`."""
        shapes = config.tensor_shapes()
        out = {}
        for i in range(config.n_layer):
            for target in self.targets:
                rows, cols = shapes[f"h.{i}.{target}.weight"]
                out[f"h.{i}.{target}.lora_a"] = (self.rank, cols)
                out[f"h.{i}.{target}.lora_b"] = (rows, self.rank)
        return out


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    created_at: str
    config: ArchConfig
    dtype: str
    files: tuple[FileEntry, ...]
    tokenizer: TokenizerInfo
    lineage: Lineage
    metrics: dict[str, Any] = field(default_factory=dict)
    package_version: str = ""
    # Revision 1 is the published manifest; each later one only adds metrics (`ModelStore.record_metrics`),
    # logged in `history` as {"revision", "recorded_at", "metrics": {key: value}}. Files never change.
    revision: int = 1
    history: tuple[dict[str, Any], ...] = ()
    adapter: AdapterInfo | None = None  # set for a LoRA adapter version; `config` is then its base's
    schema_version: int = SCHEMA_VERSION
    architecture: str = ARCHITECTURE

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def require_model(self) -> None:
        """Refuse an adapter version where a whole model is needed."""
        if self.adapter is not None:
            raise StoreError(f"{self.ref} is a LoRA adapter of {self.adapter.base}, not a model")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["files"] = [asdict(f) for f in self.files]
        if self.adapter is None:  # a model's manifest reads as it always has
            del data["adapter"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        try:
            if data["schema_version"] != SCHEMA_VERSION:
                raise StoreError(f"manifest schema_version {data['schema_version']} is not supported")
            if data["architecture"] != ARCHITECTURE:
                raise StoreError(f"manifest architecture {data['architecture']!r} is not supported")
            return cls(
                schema_version=data["schema_version"],
                architecture=data["architecture"],
                name=data["name"],
                version=int(data["version"]),
                revision=int(data.get("revision", 1)),
                created_at=data["created_at"],
                config=ArchConfig(**data["config"]),
                dtype=data["dtype"],
                files=tuple(FileEntry(**f) for f in data["files"]),
                tokenizer=TokenizerInfo(**data["tokenizer"]),
                lineage=Lineage(**data["lineage"]),
                metrics=dict(data.get("metrics") or {}),
                package_version=data.get("package_version", ""),
                history=tuple(dict(entry) for entry in data.get("history") or ()),
                adapter=_adapter_info(data.get("adapter")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"malformed manifest: {type(exc).__name__}: {exc}") from None

    @classmethod
    def read(cls, path: Path) -> "Manifest":
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise StoreError(f"cannot read manifest {path}: {exc}") from None


def _adapter_info(data: dict[str, Any] | None) -> AdapterInfo | None:
    if data is None:
        return None
    return AdapterInfo(**{**data, "targets": tuple(data["targets"]), "alpha": float(data["alpha"])})


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe_file(root: Path, relpath: str) -> FileEntry:
    path = root / relpath
    return FileEntry(path=relpath, size=os.path.getsize(path), sha256=sha256_file(path))
