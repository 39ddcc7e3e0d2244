"""Export a run into the store: its best checkpoint (LoRA merged) as a new version, through the store's one
publish path (`ModelStore.publish` / `Staging.commit`), with lineage, metrics, a model card, the training
curve and the step log. Every file written into the staging directory is listed and hashed by the commit,
so `verify` covers the card, the plot and the log as well as the weights.
"""

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..adapters import canonical_from_peft, publish_adapter
from ..errors import StoreError
from ..hf_format import arch_config_from_hf, canonical_from_hf
from ..manifest import STORED_DTYPES, TOKENIZER_FILE, WEIGHTS_FILE, Lineage
from ..refs import parse_ref
from ..registry import ModelStore, StoredVersion
from .card import greedy_sample, model_card, plot_curve
from .checkpoint import CONFIG_FILE, load_checkpoint, read_log
from .config import RunOptions, TrainConfig, read_config
from .data import read_documents
from .model import build_model, load_tokenizer, load_trainable_state, plain_model

CARD_FILE = "README.md"
CURVE_FILE = "training_curve.png"
LOG_COPY = "training_log.jsonl"


def restore_model(store: ModelStore, run_dir: Path, *, best: bool = True) -> torch.nn.Module:
    """The run's model (still with LoRA adapters, if any) at its best checkpoint, or at its last one."""
    config = read_config(run_dir / CONFIG_FILE)
    checkpoint = load_checkpoint(run_dir)
    model = build_model(store, config, load_tokenizer(store, config))
    state = checkpoint["best_state"] if best and checkpoint["best_state"] is not None else checkpoint["model"]
    load_trainable_state(model, state)
    return model.eval()


def export_run(store: ModelStore, run_dir: Path, options: RunOptions) -> StoredVersion:
    config = read_config(run_dir / CONFIG_FILE)
    if options.export_adapter and not config.lora:
        raise StoreError("--export-adapter needs a LoRA run (--lora-r)")
    checkpoint = load_checkpoint(run_dir)
    tok = load_tokenizer(store, config)
    adapted = restore_model(store, run_dir)
    lora = {n: p.detach().to("cpu", copy=True) for n, p in adapted.named_parameters() if ".lora_" in n}
    model = plain_model(adapted)
    arch = arch_config_from_hf(model.config.to_dict())
    dtype = options.dtype or tok.stored_dtype
    if dtype not in STORED_DTYPES:
        raise StoreError(f"dtype {dtype!r} is not one of {', '.join(STORED_DTYPES)}")
    tensors = {
        k: v.detach().to(getattr(torch, dtype)).contiguous()
        for k, v in canonical_from_hf(model.state_dict(), arch).items()
    }
    log = [r for r in read_log(run_dir) if r["step"] <= checkpoint["state"]["step"]]
    metrics = final_metrics(checkpoint["state"], log)
    prompt = options.sample_prompt or _default_prompt(config)
    sample = tok.tokenizer.decode(greedy_sample(model, tok.tokenizer.encode(prompt).ids, tok.info.eos_token_id))
    name = options.name or parse_ref(config.base).name + ("-lora" if options.export_adapter else "")
    lineage = Lineage(
        source="training",
        parent=config.base,
        training_config=config.to_dict(),
        data_sha256=dict(checkpoint["data_sha256"]),
    )
    card_args = dict(
        name=name,
        config=config,
        arch=arch,
        metrics=metrics,
        data_license=options.data_license,
        prompt=prompt,
        sample=sample,
        curve_file=CURVE_FILE,
    )
    metrics = {**metrics, **options.extra_metrics, "data_license": options.data_license}
    if options.export_adapter:

        def extra(path: Path) -> None:
            (path / LOG_COPY).write_text("".join(json.dumps(r) + "\n" for r in log))
            plot_curve(log, path / CURVE_FILE)
            (path / CARD_FILE).write_text(model_card(**card_args, adapter=True) + options.card_appendix)

        return publish_adapter(
            store,
            name,
            store.verify(config.base),
            canonical_from_peft(lora, arch),
            alpha=config.lora_alpha,
            lineage=lineage,
            dtype=dtype,
            metrics=metrics,
            extra=extra,
            alias=options.alias,
        )
    with store.publish(name) as staging:
        save_file(tensors, str(staging.path / WEIGHTS_FILE), metadata={"format": "pt"})
        if tok.json_path is not None:
            shutil.copyfile(tok.json_path, staging.path / TOKENIZER_FILE)
        else:
            tok.tokenizer.save(str(staging.path / TOKENIZER_FILE))
        (staging.path / LOG_COPY).write_text("".join(json.dumps(r) + "\n" for r in log))
        plot_curve(log, staging.path / CURVE_FILE)
        (staging.path / CARD_FILE).write_text(model_card(**card_args) + options.card_appendix)
        stored = staging.commit(config=arch, dtype=dtype, tokenizer=tok.info, lineage=lineage, metrics=metrics)
    if options.alias is not None:
        store.promote(stored.ref, options.alias)
    return stored


def final_metrics(state: dict[str, Any], log: list[dict[str, Any]]) -> dict[str, Any]:
    last = log[-10:]
    best = state["best_eval_loss"]
    return {
        "train_loss": sum(r["loss"] for r in last) / len(last) if last else None,  # last 10 steps
        "best_eval_loss": best,
        "eval_perplexity": math.exp(best) if best is not None else None,
        "best_step": state["best_step"],
        "steps": state["step"],
        "tokens_seen": state["tokens"],
        "stopped_early": state["stopped_early"],
    }


def _default_prompt(config: TrainConfig) -> str:
    """The first few words of the first held-out (else training) document."""
    first = Path((config.eval_file or config.data)[0])
    docs = read_documents(first) if first.is_file() else []
    words = docs[0].split()[:6] if docs else []
    return " ".join(words) or "The"
