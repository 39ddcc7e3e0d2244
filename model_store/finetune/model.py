"""The network being trained: an HF GPT2LMHeadModel from a store version or from a fresh config, optionally
wrapped with LoRA adapters (peft, imported only then), and its plain merged form for export.

The trainable state is the parameters with requires_grad (all of them, or only the adapters with LoRA):
checkpoints hold exactly that, and rebuilding the model from the same config then loading it restores
the run. Tied weights appear once (`named_parameters` de-duplicates `lm_head` and `wte`).
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from ..errors import StoreError
from ..hf_format import load_hf_model
from ..import_hf import _load_tokenizer, _tokenizer_info, _tokenizer_json
from ..manifest import ArchConfig, TokenizerInfo
from ..refs import parse_ref
from ..registry import ModelStore, StoredVersion
from .config import LORA_TARGETS, TrainConfig

_EOS = "<|endoftext|>"


@dataclass(frozen=True)
class TokenizerSource:
    tokenizer: Tokenizer
    info: TokenizerInfo
    json_path: Path | None  # a tokenizer.json to copy byte for byte into the export, when there is one
    stored_dtype: str  # the dtype the export stores by default


def resolve_base(store: ModelStore, ref: str, *, verify: bool = True) -> StoredVersion:
    """A base version, every file's sha256 checked unless `verify` is False (for reading its manifest or
    tokenizer only); `ref` may be an alias or `latest`."""
    return store.verify(parse_ref(ref)) if verify else store.resolve(parse_ref(ref))


def load_tokenizer(store: ModelStore, config: TrainConfig) -> TokenizerSource:
    source = config.base or config.tokenizer
    path = Path(source).expanduser()
    if config.from_scratch and path.is_dir():
        tokenizer = _load_tokenizer(path, _tokenizer_json(path))
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        arch = ArchConfig(n_layer=1, n_head=1, n_embd=1, n_positions=1, vocab_size=size, n_inner=1)
        info = _tokenizer_info(path, {}, tokenizer, arch)
        if info.eos_token_id is None or tokenizer.id_to_token(info.eos_token_id) is None:
            raise StoreError(f"tokenizer in {path} has no {_EOS} token to separate documents")
        return TokenizerSource(tokenizer, info, _tokenizer_json(path), "float32")
    stored = resolve_base(store, source, verify=False)  # the run verifies it when it starts and loads weights
    file = stored.path / stored.manifest.tokenizer.file
    dtype = stored.manifest.dtype if not config.from_scratch else "float32"
    info = stored.manifest.tokenizer
    if info.eos_token_id is None:
        raise StoreError(f"{stored.ref} records no EOS token; documents cannot be separated")
    return TokenizerSource(Tokenizer.from_file(str(file)), info, file, dtype)


def build_model(store: ModelStore, config: TrainConfig, tok: TokenizerSource) -> torch.nn.Module:
    """The model before training (float32, train mode), seeded by `config.seed` when built from scratch."""
    if config.from_scratch:
        from transformers import GPT2Config, GPT2LMHeadModel

        hf = GPT2Config(
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_embd=config.n_embd,
            n_positions=config.n_positions,
            vocab_size=tok.tokenizer.get_vocab_size(with_added_tokens=True),
            bos_token_id=tok.info.bos_token_id,
            eos_token_id=tok.info.eos_token_id,
            attn_pdrop=config.dropout,
            embd_pdrop=config.dropout,
            resid_pdrop=config.dropout,
        )
        torch.manual_seed(config.seed)
        model = GPT2LMHeadModel(hf)
    else:
        model = load_hf_model(resolve_base(store, config.base))
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = config.dropout
        model.config.update({"attn_pdrop": config.dropout, "embd_pdrop": config.dropout, "resid_pdrop": config.dropout})
    model.config.use_cache = False
    model.requires_grad_(True)
    if config.lora:
        model = add_lora(model, config)
    return model.train()


def add_lora(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise StoreError("LoRA needs peft: pip install -e '.[train]'") from None
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(LORA_TARGETS),
        fan_in_fan_out=True,
        bias="none",
    )
    torch.manual_seed(config.seed)  # adapter A matrices are random
    return get_peft_model(model, lora)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the trainable parameters, by name."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(state) != expected:
        raise StoreError("the checkpoint's parameters do not match the model this config builds")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """A plain GPT2LMHeadModel in eval mode: LoRA adapters merged into the weights (in place)."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.eval()
