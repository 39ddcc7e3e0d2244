"""GPT-2's Hugging Face quirks, handled here and nowhere else.

HF's GPT-2 stores its projections as Conv1D weights of shape (in, out), ties `lm_head` to `wte`, and (in
older checkpoints) saves the `attn.bias` / `attn.masked_bias` causal-mask buffers. The store holds the
canonical form instead (`ArchConfig.tensor_shapes` lists it): nn.Linear (out, in) weights, no head when
it is tied, no buffers. These functions convert both ways and check shapes against the config, so a
mismatched checkpoint fails at import.
"""

from typing import TYPE_CHECKING, Any

import torch

from .errors import UnsupportedModelError
from .manifest import WEIGHTS_FILE, ArchConfig
from .registry import StoredVersion

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel

_LM_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# HF name -> canonical name, per block; True where HF stores a transposed Conv1D weight.
_BLOCK_TENSORS = {
    "ln_1.weight": ("ln_1.weight", False),
    "ln_1.bias": ("ln_1.bias", False),
    "attn.c_attn.weight": ("attn.qkv.weight", True),
    "attn.c_attn.bias": ("attn.qkv.bias", False),
    "attn.c_proj.weight": ("attn.proj.weight", True),
    "attn.c_proj.bias": ("attn.proj.bias", False),
    "ln_2.weight": ("ln_2.weight", False),
    "ln_2.bias": ("ln_2.bias", False),
    "mlp.c_fc.weight": ("mlp.fc.weight", True),
    "mlp.c_fc.bias": ("mlp.fc.bias", False),
    "mlp.c_proj.weight": ("mlp.proj.weight", True),
    "mlp.c_proj.bias": ("mlp.proj.bias", False),
}
_TOP_TENSORS = ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")


def arch_config_from_hf(config: dict[str, Any]) -> ArchConfig:
    """Read an HF `config.json` dict; refuse anything that is not a causal-LM GPT-2 the runtime can run."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type != "gpt2":
        shown = ", ".join(architectures) or "no architectures listed"
        raise UnsupportedModelError(
            f"model_type {model_type!r} ({shown}) is not GPT-2; only GPT2LMHeadModel checkpoints can be imported"
        )
    unsupported = [a for a in architectures if a not in _LM_ARCHITECTURES]
    if unsupported:
        raise UnsupportedModelError(
            f"architecture {unsupported[0]} is not supported; only GPT2LMHeadModel checkpoints can be imported"
        )
    if config.get("add_cross_attention"):
        raise UnsupportedModelError("GPT-2 with cross-attention (add_cross_attention=true) is not supported")
    n_embd = config.get("n_embd", 768)
    return ArchConfig(
        n_layer=config.get("n_layer", 12),
        n_head=config.get("n_head", 12),
        n_embd=n_embd,
        n_positions=config.get("n_positions", 1024),
        vocab_size=config.get("vocab_size", 50257),
        n_inner=config.get("n_inner") or 4 * n_embd,
        layer_norm_epsilon=float(config.get("layer_norm_epsilon", 1e-5)),
        activation_function=config.get("activation_function", "gelu_new"),
        scale_attn_weights=bool(config.get("scale_attn_weights", True)),
        scale_attn_by_inverse_layer_idx=bool(config.get("scale_attn_by_inverse_layer_idx", False)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
    )


def hf_config_from_arch(cfg: ArchConfig, eos_token_id: int | None, bos_token_id: int | None) -> dict[str, Any]:
    """The `config.json` of an equivalent HF GPT2LMHeadModel (dropout off: these are inference weights)."""
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_embd": cfg.n_embd,
        "n_positions": cfg.n_positions,
        "vocab_size": cfg.vocab_size,
        "n_inner": cfg.n_inner,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "activation_function": cfg.activation_function,
        "scale_attn_weights": cfg.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": cfg.scale_attn_by_inverse_layer_idx,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "eos_token_id": eos_token_id,
        "bos_token_id": bos_token_id,
        "attn_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
    }


def canonical_from_hf(state_dict: dict[str, torch.Tensor], cfg: ArchConfig) -> dict[str, torch.Tensor]:
    """HF GPT2LMHeadModel / GPT2Model state dict -> canonical tensors (contiguous, same dtype)."""
    hf = {_strip_prefix(k): v for k, v in state_dict.items() if not k.endswith(_BUFFER_SUFFIXES)}
    out: dict[str, torch.Tensor] = {k: hf.pop(k) for k in _TOP_TENSORS if k in hf}
    for i in range(cfg.n_layer):
        for hf_name, (name, transposed) in _BLOCK_TENSORS.items():
            key = f"h.{i}.{hf_name}"
            if key in hf:
                tensor = hf.pop(key)
                out[f"h.{i}.{name}"] = tensor.t() if transposed else tensor
    head = hf.pop("lm_head.weight", None)
    if not cfg.tie_word_embeddings:
        if head is None:
            raise UnsupportedModelError("config says tie_word_embeddings=false but the checkpoint has no lm_head")
        out["lm_head.weight"] = head
    if hf:
        raise UnsupportedModelError(f"unexpected tensors in checkpoint: {', '.join(sorted(hf)[:5])}")
    check_shapes(out, cfg)
    return {k: v.contiguous() for k, v in out.items()}


def hf_from_canonical(tensors: dict[str, torch.Tensor], cfg: ArchConfig) -> dict[str, torch.Tensor]:
    """Canonical tensors -> a state dict that HF GPT2LMHeadModel.load_state_dict accepts."""
    check_shapes(tensors, cfg)
    inverse = {name: (hf_name, transposed) for hf_name, (name, transposed) in _BLOCK_TENSORS.items()}
    out = {}
    for key, tensor in tensors.items():
        if key.startswith("h."):
            _, i, rest = key.split(".", 2)
            hf_name, transposed = inverse[rest]
            out[f"transformer.h.{i}.{hf_name}"] = tensor.t().contiguous() if transposed else tensor
        elif key == "lm_head.weight":
            out[key] = tensor
        else:
            out[f"transformer.{key}"] = tensor
    out.setdefault("lm_head.weight", tensors["wte.weight"])
    return out


def load_hf_model(
    stored: StoredVersion, *, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> "GPT2LMHeadModel":
    """A store version as an HF GPT2LMHeadModel in eval mode, for the offline tools (evaluate, fine-tune).

    Does not verify hashes: pass a version from `ModelStore.verify`.
    """
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    manifest = stored.manifest
    manifest.require_model()
    hf_config = hf_config_from_arch(manifest.config, manifest.tokenizer.eos_token_id, manifest.tokenizer.bos_token_id)
    hf_config.pop("model_type")
    with torch.device("meta"):  # no random init of weights about to be replaced
        model = GPT2LMHeadModel(GPT2Config(**hf_config))
    tensors = load_file(str(stored.path / WEIGHTS_FILE), device=device)
    state = hf_from_canonical({k: v.to(dtype) for k, v in tensors.items()}, manifest.config)
    model.load_state_dict(state, strict=True, assign=True)
    if manifest.config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def check_shapes(tensors: dict[str, torch.Tensor], cfg: ArchConfig) -> None:
    check_tensors(tensors, cfg.tensor_shapes(), "checkpoint")


def check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str) -> None:
    """`tensors` are exactly `expected` by name and shape; UnsupportedModelError naming `what` otherwise."""
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise UnsupportedModelError(f"{what} is missing tensors: {', '.join(missing[:5])}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise UnsupportedModelError(f"unexpected tensors in {what}: {', '.join(extra[:5])}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise UnsupportedModelError(
                f"tensor {key} has shape {tuple(tensors[key].shape)}, the config implies {shape}"
            )


def _strip_prefix(key: str) -> str:
    return key.removeprefix("transformer.")
