"""What an exported version says about itself besides the manifest: the README.md model card and the
training-curve PNG (train and held-out loss against tokens seen; matplotlib, Agg canvas, no pyplot state).
"""

from pathlib import Path
from typing import Any

import torch

from ..manifest import ArchConfig
from .config import TrainConfig


@torch.no_grad()
def greedy_sample(model, prompt_ids: list[int], eos_id: int | None, max_new_tokens: int = 48) -> list[int]:
    """Greedy continuation (token ids after the prompt) of an HF GPT2LMHeadModel in eval mode."""
    ids, context = list(prompt_ids), model.config.n_positions
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([ids[-context:]])).logits[0, -1]  # (V,)
        token = int(logits.argmax())
        if token == eos_id:
            break
        ids.append(token)
    return ids[len(prompt_ids) :]


def plot_curve(log: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([r["tokens"] for r in log], [r["loss"] for r in log], label="train", linewidth=1)
    evals = [r for r in log if "eval_loss" in r]
    ax.plot([r["tokens"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title("training curve")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")


def model_card(
    *,
    name: str,
    config: TrainConfig,
    arch: ArchConfig,
    metrics: dict[str, Any],
    data_license: str,
    prompt: str,
    sample: str,
    curve_file: str,
    adapter: bool = False,
) -> str:
    origin = f"fine-tuned from `{config.base}`" if config.base else "trained from scratch"
    method = (
        f"LoRA (r={config.lora_r}, alpha={config.lora_alpha}), stored as an adapter of `{config.base}` (not merged)"
        if adapter
        else f"LoRA (r={config.lora_r}, alpha={config.lora_alpha}), merged into the weights"
        if config.lora
        else "full fine-tuning"
        if config.base
        else "full training"
    )
    objective = "next-token cross-entropy"
    if config.negatives:
        objective += (
            f" + {config.negative_weight} x unlikelihood of {config.negatives} noise tokens per position "
            "(Welleck et al. 2019), noise from the training unigram distribution"
        )
    data = "\n".join(f"- `{Path(p).name}`" for p in config.data)
    held_out = (
        "\n".join(f"- `{Path(p).name}` (held out)" for p in config.eval_file)
        if config.eval_file
        else f"- held out: a seeded random {config.eval_fraction:.0%} of the packed blocks"
    )
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in metrics.items())
    return f"""# {name}

A GPT-2 language model ({arch.n_layer} layers, {arch.n_head} heads, {arch.n_embd} wide, context \
{arch.n_positions}, vocabulary {arch.vocab_size}; {arch.num_parameters:,} parameters), {origin}
with `python -m model_store finetune`.

## Data

{data}
{held_out}

Documents are separated by the end-of-text token and packed into blocks of {config.block_size} tokens.
Data license: **{data_license.rstrip(".")}**. The sha256 of every data file is in the manifest (`lineage.data_sha256`).

## Training

- method: {method}; objective: {objective}
- {config.steps} optimizer steps planned, global batch {config.global_batch} blocks \
({config.batch_size} x {config.grad_accum} accumulation x {config.world_size} processes)
- AdamW (lr {config.lr}, betas {config.beta1}/{config.beta2}, weight decay {config.weight_decay}), \
{config.warmup_steps} warmup steps then cosine decay to {config.min_lr_ratio} x lr; gradient clipping \
{config.max_grad_norm}; dropout {config.dropout}; bf16 autocast `{config.bf16}`; seed {config.seed}
- held-out evaluation every {config.eval_every} steps; the exported weights are the best held-out checkpoint
  (patience: {config.patience if config.patience is not None else "none"})

The full configuration is in the manifest (`lineage.training_config`).

## Metrics

| metric | value |
|---|---|
{rows}

![training curve]({curve_file})

## Sample (greedy)

Prompt: `{prompt}`

```
{prompt}{sample}
```
"""


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
