"""LoRA adapters as store versions: peft's tensors in the store's canonical form, the adapter file's checks,
publishing one (from a fine-tuning run or a peft adapter directory), and an adapter applied to its base.

peft wraps each targeted GPT-2 projection (a Conv1D, fan_in_fan_out) with `lora_A` (rank, in) and `lora_B`
(out, rank) weights and adds (alpha / rank) B A x to its output. The store keeps the two under the
projection's canonical name (`h.{i}.attn.qkv.lora_a` / `.lora_b`, see `AdapterInfo`), in the orientation of
the canonical nn.Linear (out, in) weights, so an adapter merged into its base is `W + scale * B @ A`.
"""

import json
import math
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import StoreError, UnsupportedModelError
from .hf_format import check_tensors
from .manifest import (
    ADAPTER_FILE,
    ADAPTER_TARGETS,
    STORED_DTYPES,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    AdapterInfo,
    ArchConfig,
    Lineage,
)
from .refs import validate_alias, validate_name
from .registry import ModelStore, StoredVersion

_HF_TARGETS = {"attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj", "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}
# A peft LoRA weight of a GPT-2 projection: in an adapter file (`...h.3.attn.c_attn.lora_A.weight`) or among
# a PeftModel's parameters (with the adapter's name: `...lora_A.default.weight`).
_PEFT_KEY = re.compile(
    r"(?:^|\.)h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.lora_([AB])(?:\.[\w-]+)?\.weight$"
)
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def canonical_from_peft(state: dict[str, torch.Tensor], config: ArchConfig) -> dict[str, torch.Tensor]:
    """peft's LoRA weights (every key must be one) under canonical names. `check_adapter` then holds them
    to one rank and the same projections in every block."""
    tensors = {}
    for key, value in state.items():
        match = _PEFT_KEY.search(key)
        if match is None:
            raise UnsupportedModelError(f"adapter tensor {key} is not a LoRA A or B weight of a GPT-2 projection")
        block, module, which = int(match[1]), _HF_TARGETS[match[2]], match[3].lower()
        if block >= config.n_layer:
            raise UnsupportedModelError(f"adapter tensor {key} is for block {block}; the base has {config.n_layer}")
        tensors[f"h.{block}.{module}.lora_{which}"] = value
    if not any(key.endswith(".lora_a") for key in tensors):
        raise UnsupportedModelError("the adapter has no LoRA A weights")
    return tensors


def targets_of(tensors: dict[str, torch.Tensor]) -> tuple[str, ...]:
    found = {key.split(".", 2)[2].rsplit(".", 1)[0] for key in tensors}
    return tuple(t for t in ADAPTER_TARGETS if t in found)


def check_adapter(tensors: dict[str, torch.Tensor], info: AdapterInfo, config: ArchConfig) -> None:
    """The adapter's tensors are exactly the ones `info` implies for a base of `config` (every block, each
    target, one rank)."""
    check_tensors(tensors, info.tensor_shapes(config), "the adapter")


def merged(weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], info: AdapterInfo) -> dict:
    """The base's canonical weights with the adapter added in (computed in float32)."""
    out = dict(weights)
    for key in tensors:
        if key.endswith(".lora_a"):
            target = key.removesuffix(".lora_a")
            a, b = tensors[key].float(), tensors[f"{target}.lora_b"].float()
            w = weights[f"{target}.weight"]
            out[f"{target}.weight"] = (w.float() + info.scale * (b @ a)).to(w.dtype)
    return out


def read_adapter(stored: StoredVersion) -> dict[str, torch.Tensor]:
    """An adapter version's tensors, checked against its manifest (pass a version from `ModelStore.verify`)."""
    info = stored.manifest.adapter
    if info is None:
        raise StoreError(f"{stored.ref} is a model, not a LoRA adapter")
    tensors = load_file(str(stored.path / info.file))
    check_adapter(tensors, info, stored.manifest.config)
    return tensors


def publish_adapter(
    store: ModelStore,
    name: str,
    base: StoredVersion,
    tensors: dict[str, torch.Tensor],
    *,
    alpha: float,
    lineage: Lineage,
    dtype: str,
    metrics: dict | None = None,
    extra: Callable[[Path], None] | None = None,
    alias: str | None = None,
) -> StoredVersion:
    """Publish `tensors` (canonical, see `canonical_from_peft`) as the next version of `name`: an adapter of
    `base`, with the base's tokenizer; `extra` writes more files (a card, a log) into the version."""
    base.manifest.require_model()
    validate_name(name)
    if alias is not None:
        validate_alias(alias)
    if dtype not in STORED_DTYPES:
        raise StoreError(f"dtype {dtype!r} is not one of {', '.join(STORED_DTYPES)}")
    rank = next(t.shape[0] for k, t in tensors.items() if k.endswith(".lora_a"))
    base_sha256 = {f.path: f.sha256 for f in base.manifest.files}[WEIGHTS_FILE]
    info = AdapterInfo(
        base=base.ref, base_sha256=base_sha256, rank=int(rank), alpha=float(alpha), targets=targets_of(tensors)
    )
    check_adapter(tensors, info, base.manifest.config)
    with store.publish(name) as staging:
        save_file(
            {k: v.detach().to(getattr(torch, dtype)).contiguous() for k, v in sorted(tensors.items())},
            str(staging.path / ADAPTER_FILE),
            metadata={"format": "pt"},
        )
        shutil.copyfile(base.path / base.manifest.tokenizer.file, staging.path / TOKENIZER_FILE)
        if extra is not None:
            extra(staging.path)
        stored = staging.commit(
            config=base.manifest.config,
            dtype=dtype,
            tokenizer=base.manifest.tokenizer,
            lineage=lineage,
            metrics=metrics,
            adapter=info,
        )
    if alias is not None:
        store.promote(stored.ref, alias)
    return stored


def import_peft(
    store: ModelStore, directory: Path, name: str, base_ref: str, *, alias: str | None = None
) -> StoredVersion:
    """A peft LoRA adapter directory (`adapter_config.json` and `adapter_model.safetensors`, saved by
    `PeftModel.save_pretrained` for a GPT-2) as the next version of `name`, an adapter of `base_ref`."""
    validate_name(name)
    base = store.verify(base_ref)
    base.manifest.require_model()
    directory = Path(directory)
    try:
        peft = json.loads((directory / PEFT_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"cannot read {directory / PEFT_CONFIG}: {exc}") from None
    alpha = _peft_alpha(peft)
    tensors = canonical_from_peft(_read_peft_weights(directory), base.manifest.config)
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    lineage = Lineage(source="local-directory", source_path=str(directory.resolve()), parent=base.ref)
    return publish_adapter(
        store,
        name,
        base,
        tensors,
        alpha=alpha,
        lineage=lineage,
        dtype=dtype if dtype in STORED_DTYPES else "float32",
        alias=alias,
    )


def _peft_alpha(peft: dict) -> float:
    """The alpha that makes alpha / rank peft's scale; refuses what the runtime does not compute."""
    if peft.get("peft_type") != "LORA":
        raise UnsupportedModelError(f"peft_type {peft.get('peft_type')!r} is not LORA")
    refused = {
        "use_dora": "DoRA",
        "rank_pattern": "per-module ranks (rank_pattern)",
        "alpha_pattern": "per-module alphas (alpha_pattern)",
        "modules_to_save": "fully trained modules (modules_to_save)",
        "layers_to_transform": "adapting some blocks only (layers_to_transform)",
    }
    for key, what in refused.items():
        if peft.get(key):
            raise UnsupportedModelError(f"the adapter uses {what}, which serving does not support")
    if peft.get("bias", "none") != "none":
        raise UnsupportedModelError(f"the adapter trains biases (bias={peft['bias']!r}); only bias='none' is served")
    r, alpha = peft.get("r"), peft.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, int | float):
        raise UnsupportedModelError(f"{PEFT_CONFIG} needs a positive integer r and a lora_alpha")
    # rsLoRA scales by alpha / sqrt(r): the same as an alpha of lora_alpha * sqrt(r) over r.
    return float(alpha) * math.sqrt(r) if peft.get("use_rslora") else float(alpha)


def _read_peft_weights(directory: Path) -> dict[str, torch.Tensor]:
    for file in PEFT_WEIGHTS:
        path = directory / file
        if not path.is_file():
            continue
        try:
            if file.endswith(".safetensors"):
                return load_file(str(path))
            return torch.load(path, map_location="cpu", weights_only=True)  # data only, never pickled code
        except (SafetensorError, RuntimeError, OSError, pickle.UnpicklingError) as exc:
            raise UnsupportedModelError(f"cannot read {path}: {exc}") from None
    raise StoreError(f"{directory} has no {' or '.join(PEFT_WEIGHTS)}")
