"""Import a Hugging Face GPT-2 (local directory or hub id) into the store as a new version.

Reads only data: safetensors, or `.bin` through `torch.load(weights_only=True)`; never pickled code, never
`trust_remote_code`. GPT-2's weight quirks are delegated to `hf_format`; this module finds the files,
reads the tokenizer and its facts, and publishes through the registry.
"""

import json
import pickle
import re
import shutil
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from .errors import StoreError, UnsupportedModelError
from .hf_format import arch_config_from_hf, canonical_from_hf
from .manifest import STORED_DTYPES, TOKENIZER_FILE, WEIGHTS_FILE, ArchConfig, Lineage, TokenizerInfo
from .refs import validate_alias, validate_name
from .registry import ModelStore, StoredVersion

_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_HUB_CONNECT_TIMEOUT_S = 3.0
_HUB_METADATA = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
]
_EOS_FALLBACK = "<|endoftext|>"


def import_hf(
    store: ModelStore, source: str, name: str, *, alias: str | None = None, dtype: str | None = None
) -> StoredVersion:
    """Import `source` (a directory in HF format, or a hub id) as the next version of `name`."""
    validate_name(name)
    if alias is not None:
        validate_alias(alias)
    if dtype is not None and dtype not in STORED_DTYPES:
        raise StoreError(f"dtype {dtype!r} is not one of {', '.join(STORED_DTYPES)}")
    src, lineage = locate_source(source)
    config_json = _read_json(src / "config.json")
    cfg = arch_config_from_hf(config_json)
    tensors = canonical_from_hf(_load_state_dict(src), cfg)
    stored_dtype = dtype or str(tensors["wte.weight"].dtype).removeprefix("torch.")
    if stored_dtype not in STORED_DTYPES:
        raise UnsupportedModelError(f"weights are {stored_dtype}; pass --dtype with one of {', '.join(STORED_DTYPES)}")
    tensors = {k: v.to(getattr(torch, stored_dtype)) for k, v in tensors.items()}
    tokenizer_src = _tokenizer_json(src)
    tokenizer = _load_tokenizer(src, tokenizer_src)
    info = _tokenizer_info(src, config_json, tokenizer, cfg)
    with store.publish(name) as staging:
        save_file(tensors, str(staging.path / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer_src is not None:
            shutil.copyfile(tokenizer_src, staging.path / TOKENIZER_FILE)
        else:
            tokenizer.save(str(staging.path / TOKENIZER_FILE))
        stored = staging.commit(config=cfg, dtype=stored_dtype, tokenizer=info, lineage=lineage)
    if alias is not None:
        store.promote(stored.ref, alias)
    return stored


def locate_source(source: str) -> tuple[Path, Lineage]:
    path = Path(source).expanduser()
    if path.is_dir():
        path = path.resolve()
        return path, Lineage(source="local-directory", source_path=str(path))
    if path.exists():
        raise StoreError(f"{source} is a file; import-hf takes a directory in Hugging Face format or a hub id")
    if source.startswith((".", "/", "~")) or not _HUB_ID_RE.fullmatch(source):
        raise StoreError(f"no such directory: {source}")
    return _download_from_hub(source)


# --- hub ------------------------------------------------------------------------------------------


def _download_from_hub(repo_id: str) -> tuple[Path, Lineage]:
    from huggingface_hub import HfApi, constants, snapshot_download

    online = not constants.HF_HUB_OFFLINE and _reachable(constants.ENDPOINT)
    try:
        if online:
            files = HfApi().list_repo_files(repo_id)
            path = snapshot_download(repo_id, allow_patterns=_hub_patterns(files))
        else:
            path = snapshot_download(
                repo_id, allow_patterns=_HUB_METADATA + ["*.safetensors*", "pytorch_model*"], local_files_only=True
            )
    except Exception as exc:  # the hub client raises many types; all mean "could not get it"
        raise StoreError(_hub_failure(repo_id, online, exc)) from None
    snapshot = Path(path)
    return snapshot, Lineage(source="huggingface-hub", hub_id=repo_id, hub_revision=snapshot.name)


def _hub_patterns(files: list[str]) -> list[str]:
    """Fetch one weight format only: safetensors when the repo has it, else pytorch_model*.bin."""
    has_safetensors = any(f in ("model.safetensors", "model.safetensors.index.json") for f in files)
    return _HUB_METADATA + (
        ["model*.safetensors", "model.safetensors.index.json"]
        if has_safetensors
        else ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
    )


def _hub_failure(repo_id: str, online: bool, exc: Exception) -> str:
    how = (
        f"download it where the network allows (huggingface-cli download {repo_id} --local-dir DIR), "
        f"then run: python -m model_store import-hf DIR --name NAME"
    )
    if not online:
        return f"{repo_id!r} is not a local directory and the Hugging Face hub is unreachable (offline); {how}"
    return f"could not fetch {repo_id!r} from the Hugging Face hub ({type(exc).__name__}); {how}"


def _reachable(endpoint: str) -> bool:
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=_HUB_CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


# --- weights --------------------------------------------------------------------------------------


def _load_state_dict(src: Path) -> dict[str, torch.Tensor]:
    for single, index, loader in (
        ("model.safetensors", "model.safetensors.index.json", _load_safetensors),
        ("pytorch_model.bin", "pytorch_model.bin.index.json", _load_bin),
    ):
        if (src / single).is_file():
            return loader(src / single)
        if (src / index).is_file():
            state: dict[str, torch.Tensor] = {}
            for shard in _shards(src, index):
                state.update(loader(shard))
            return state
    raise StoreError(
        f"{src} has no weights: expected model.safetensors, sharded safetensors with "
        "model.safetensors.index.json, or pytorch_model.bin"
    )


def _shards(src: Path, index_name: str) -> list[Path]:
    weight_map = _read_json(src / index_name).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise StoreError(f"{index_name} has no weight_map")
    shards = []
    for name in sorted(set(weight_map.values())):
        if Path(name).name != name or not (src / name).is_file():
            raise StoreError(f"{index_name} lists shard {name!r}, which is not a file in {src}")
        shards.append(src / name)
    return shards


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise StoreError(f"cannot read {path.name}: {exc}") from None


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreError(f"refused to load {path.name}: not a plain tensor checkpoint ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StoreError(f"{path.name} is not a state dict of tensors")
    return state


# --- tokenizer ------------------------------------------------------------------------------------


def _tokenizer_json(src: Path) -> Path | None:
    path = src / TOKENIZER_FILE
    return path if path.is_file() else None


def _load_tokenizer(src: Path, tokenizer_json: Path | None) -> Tokenizer:
    if tokenizer_json is not None:
        try:
            return Tokenizer.from_file(str(tokenizer_json))
        except Exception as exc:  # tokenizers raises bare Exception on malformed files
            raise StoreError(f"cannot read {tokenizer_json.name}: {exc}") from None
    if (src / "vocab.json").is_file() and (src / "merges.txt").is_file():
        from transformers import GPT2Tokenizer  # converts vocab/merges exactly as HF does

        return GPT2Tokenizer.from_pretrained(str(src), local_files_only=True).backend_tokenizer
    raise StoreError(f"{src} has no tokenizer: expected tokenizer.json, or vocab.json and merges.txt")


def _tokenizer_info(src: Path, config_json: dict[str, Any], tokenizer: Tokenizer, cfg: ArchConfig) -> TokenizerInfo:
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > cfg.vocab_size:
        raise UnsupportedModelError(f"tokenizer has {size} tokens but the model's vocab_size is {cfg.vocab_size}")
    tok_config = _read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}

    def special_id(key: str) -> int | None:
        value = config_json.get(f"{key}_id")
        value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, int) and 0 <= value < size:
            return value
        token = tok_config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        return tokenizer.token_to_id(token or _EOS_FALLBACK)

    return TokenizerInfo(
        eos_token_id=special_id("eos_token"),
        bos_token_id=special_id("bos_token"),
        chat_template=_chat_template(src, tok_config),
    )


def _chat_template(src: Path, tok_config: dict[str, Any]) -> str | None:
    if (src / "chat_template.jinja").is_file():
        return (src / "chat_template.jinja").read_text()
    template = tok_config.get("chat_template")
    if template is None and (src / "chat_template.json").is_file():
        template = _read_json(src / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: prefer "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path.parent} has no {path.name}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise StoreError(f"{path} is not a JSON object")
    return data
