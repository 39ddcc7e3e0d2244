"""The training loop: AdamW with linear warmup and cosine decay, gradient accumulation and clipping, bf16
autocast where the hardware has bf16 matrix units, DDP under torchrun, held-out evaluation with early
stopping, checkpoints a killed run resumes from exactly, a progress bar and a per-step JSONL log.

`finetune` is the whole run (set up, train, export); `Trainer` is one run's loop and state. Everything
random is a function of the seed: model init, the data order (`data.SampleOrder`), the noise tokens
(`objective.noise_generator`), and dropout through each process's RNG, which checkpoints save.
"""

import contextlib
import dataclasses
import gc
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..errors import StoreError
from ..hardware import has_bf16_matrix_units
from ..refs import parse_ref, validate_alias, validate_name
from ..registry import ModelStore, StoredVersion
from .checkpoint import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    LOG_FILE,
    atomic_save,
    load_checkpoint,
    rng_state,
    set_rng_state,
    truncate_log,
)
from .config import RunOptions, TrainConfig, read_config
from .data import Dataset, SampleOrder, load_dataset, micro_batch_positions
from .distributed import Group, process_group
from .model import TokenizerSource, build_model, load_tokenizer, load_trainable_state, resolve_base, trainable_state
from .objective import lm_loss, noise_generator, sample_noise


@dataclass
class RunState:
    """What a checkpoint restores besides weights, optimizer and scheduler."""

    step: int = 0  # optimizer steps done; the data position is step * global batch
    tokens: int = 0  # training tokens consumed, all processes
    best_eval_loss: float | None = None
    best_step: int | None = None
    best_state: dict[str, torch.Tensor] | None = None
    evals_since_best: int = 0
    stopped_early: bool = False


@dataclass(frozen=True)
class RunResult:
    config: TrainConfig
    state: RunState
    exported: StoredVersion | None


def finetune(store: ModelStore, config: TrainConfig | None, options: RunOptions) -> RunResult:
    """Run (or resume, when `options.resume`) a training run in `options.run_dir`, then export it."""
    with process_group(options.device) as group:
        config = _run_config(store, config, options, group)
        tok = load_tokenizer(store, config)
        config = config.resolved(n_positions=_n_positions(store, config))
        model = build_model(store, config, tok)
        dataset = _load_data(config, tok)
        config = config.resolved(n_positions=model.config.n_positions, num_train_blocks=len(dataset.train))
        trainer = Trainer(model, config, dataset, group, options)
        try:
            if options.resume:
                trainer.restore(load_checkpoint(options.run_dir))
            elif group.is_main:
                _start_run_dir(options.run_dir, config)
            trainer.run()
        finally:
            trainer.release_group()
        group.barrier()
        exported = None
        if options.export and group.is_main:
            from .export import export_run

            exported = export_run(store, options.run_dir, options)
        group.barrier()
        return RunResult(config, trainer.state, exported)


def _run_config(store: ModelStore, config: TrainConfig | None, options: RunOptions, group: Group) -> TrainConfig:
    if options.resume:
        config = read_config(options.run_dir / CONFIG_FILE)
        changed = {k: v for k, v in options.overrides.items() if _as_saved(v) != _as_saved(getattr(config, k))}
        if changed:
            shown = ", ".join(f"{k}={v!r} (run has {getattr(config, k)!r})" for k, v in changed.items())
            raise StoreError(f"--resume continues the run as configured; these options differ: {shown}")
        if group.world_size != config.world_size:
            raise StoreError(f"the run used {config.world_size} processes; resume it with the same number")
    else:
        assert config is not None
        if (options.run_dir / CHECKPOINT_FILE).exists():  # checked by every process, before any collective
            raise StoreError(f"{options.run_dir} already holds a run; continue it with --resume or pick another")
        changes: dict[str, Any] = {"world_size": group.world_size}
        changes["data"] = tuple(str(Path(p).resolve()) for p in config.data)
        changes["eval_file"] = tuple(str(Path(p).resolve()) for p in config.eval_file)
        if config.base is not None:
            changes["base"] = resolve_base(store, config.base).ref  # pin `latest` / aliases to a version
        elif Path(config.tokenizer).expanduser().is_dir():
            changes["tokenizer"] = str(Path(config.tokenizer).expanduser().resolve())
        else:
            changes["tokenizer"] = resolve_base(store, config.tokenizer).ref
        config = dataclasses.replace(config, **changes)
    if options.export:
        name = options.name or (parse_ref(config.base).name if config.base else None)
        if name is None:
            raise StoreError("a model trained from scratch needs --name for its store entry (or --no-export)")
        validate_name(name)
        if options.alias is not None:
            validate_alias(options.alias)
    return config


def _n_positions(store: ModelStore, config: TrainConfig) -> int:
    if config.from_scratch:
        return config.n_positions
    return resolve_base(store, config.base, verify=False).manifest.config.n_positions


def _as_saved(value: Any) -> Any:
    return json.loads(json.dumps(list(value) if isinstance(value, tuple) else value))


def _load_data(config: TrainConfig, tok: TokenizerSource) -> Dataset:
    return load_dataset(
        [Path(p) for p in config.data],
        [Path(p) for p in config.eval_file],
        tok.tokenizer,
        eos_id=tok.info.eos_token_id,
        block_size=config.block_size,
        eval_fraction=config.eval_fraction,
        seed=config.seed,
    )


def _start_run_dir(run_dir: Path, config: TrainConfig) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_save(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n", run_dir / CONFIG_FILE)
    atomic_save("", run_dir / LOG_FILE)


def lr_factor(config: TrainConfig, step: int) -> float:
    """Multiplier of the peak learning rate for 0-based optimizer step `step`."""
    warmup = config.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, config.steps - warmup))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def use_bf16(mode: str, device: torch.device) -> bool:
    return mode == "on" or (mode == "auto" and has_bf16_matrix_units(device))


class Trainer:
    def __init__(
        self, model: torch.nn.Module, config: TrainConfig, dataset: Dataset, group: Group, options: RunOptions
    ) -> None:
        self.config, self.dataset, self.group, self.options = config, dataset, group, options
        self.module = model.to(group.device)
        self.net = self.module
        if group.world_size > 1:
            ids = [group.device.index] if group.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.module, device_ids=ids)
        params = [p for p in self.module.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},  # biases, LayerNorm
        ]
        self.params = params
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(config, s))
        self.order = SampleOrder(len(dataset.train), config.seed)
        self.unigram = dataset.unigram.float()
        self.bf16 = use_bf16(config.bf16, group.device)
        self.state = RunState()
        torch.manual_seed(config.seed + 1 + group.rank)  # dropout; a resume restores the saved states instead
        self.tokens_per_step = config.global_batch * config.block_size

    # --- one step ------------------------------------------------------------------------------------

    def train_step(self, step: int) -> dict[str, float]:
        c, sums = self.config, torch.zeros(3, dtype=torch.float64)
        for micro in range(c.grad_accum):
            start = micro_batch_positions(
                step, micro, self.group.rank, batch_size=c.batch_size, grad_accum=c.grad_accum, world_size=c.world_size
            )
            block = self.dataset.train.tokens[self.order.blocks(start, c.batch_size)]  # (B, T + 1)
            inputs, targets = block[:, :-1], block[:, 1:]
            noise = self._noise(start, targets) if c.negatives else None
            last = micro == c.grad_accum - 1
            sync = contextlib.nullcontext() if last or c.world_size == 1 else self.net.no_sync()
            with sync:
                with self._autocast():
                    logits = self.net(input_ids=inputs.to(self.group.device)).logits  # (B, T, V)
                parts = lm_loss(logits, targets.to(self.group.device), noise, c.negative_weight)
                (parts.loss / c.grad_accum).backward()
            ul = parts.unlikelihood.item() if parts.unlikelihood is not None else 0.0
            sums += torch.tensor([parts.loss.item(), parts.ce.item(), ul], dtype=torch.float64)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm).item()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss, ce, ul = self.group.all_mean((sums / c.grad_accum).tolist())
        record = {"loss": loss, "lr": lr, "grad_norm": grad_norm}
        if c.negatives:
            record.update(ce=ce, unlikelihood=ul)
        return record

    def _noise(self, start: int, targets: torch.Tensor) -> torch.Tensor:
        c = self.config
        rows = [
            sample_noise(t, self.unigram, c.negatives, noise_generator(c.seed, start + i))
            for i, t in enumerate(targets)
        ]
        return torch.stack(rows).to(self.group.device)  # (B, T, K)

    def _autocast(self):
        return torch.autocast(self.group.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean cross-entropy per token over the held-out blocks (each process takes every world_size-th)."""
        c, model = self.config, self.module
        model.eval()
        blocks = self.dataset.held_out.tokens[: c.eval_max_blocks][self.group.rank :: c.world_size]
        total, count = 0.0, 0
        for i in range(0, len(blocks), c.batch_size):
            batch = blocks[i : i + c.batch_size].to(self.group.device)
            with self._autocast():
                logits = model(input_ids=batch[:, :-1]).logits
            total += lm_loss(logits, batch[:, 1:]).ce.item() * batch[:, 1:].numel()
            count += batch[:, 1:].numel()
        model.train()
        total, count = self.group.all_sum([total, count])
        return total / count

    # --- the loop ------------------------------------------------------------------------------------

    def release_group(self) -> None:
        """Drop the DistributedDataParallel wrapper while the process group is still registered. Freed later,
        its reducer could hold the group's last reference, and the group's destructor then joins gloo's
        threads with the GIL held while one of them waits for the GIL to free a tensor: a deadlock (seen in
        a two-process run on CPU, in ProcessGroupGloo::~ProcessGroupGloo)."""
        self.net = self.module
        gc.collect()  # the wrapper, were it in a reference cycle

    def run(self) -> RunState:
        c, s = self.config, self.state
        bar = tqdm(
            total=c.steps,
            initial=s.step,
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not (self.options.progress and self.group.is_main),
        )
        with bar:
            while s.step < c.steps and not s.stopped_early:
                began = time.perf_counter()
                record = {"step": s.step + 1, **self.train_step(s.step)}
                s.step += 1
                s.tokens += self.tokens_per_step
                elapsed = time.perf_counter() - began
                record.update(tokens=s.tokens, tokens_per_s=self.tokens_per_step / elapsed)
                if s.step % c.eval_every == 0 or s.step == c.steps:
                    record["eval_loss"] = self._evaluate_and_track()
                self._log(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                if s.step % c.checkpoint_every == 0 or s.step == c.steps or s.stopped_early:
                    self.save_checkpoint()
        return s

    def _evaluate_and_track(self) -> float:
        s, loss = self.state, self.evaluate()
        if s.best_eval_loss is None or loss < s.best_eval_loss:
            s.best_eval_loss, s.best_step, s.evals_since_best = loss, s.step, 0
            s.best_state = trainable_state(self.module)
        else:
            s.evals_since_best += 1
            if self.config.patience is not None and s.evals_since_best >= self.config.patience:
                s.stopped_early = True
                self._say(
                    f"early stop at step {s.step}: no improvement in {s.evals_since_best} evaluations "
                    f"(best {s.best_eval_loss:.4f} at step {s.best_step})"
                )
        return loss

    def _log(self, record: dict[str, Any]) -> None:
        if self.group.is_main:
            with open(self.options.run_dir / LOG_FILE, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def _say(self, message: str) -> None:
        if self.group.is_main:
            tqdm.write(message, file=sys.stderr)

    # --- checkpoints ---------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        rngs = self.group.gather(rng_state())  # every process's, so dropout continues identically
        if not self.group.is_main:
            return
        s = self.state
        checkpoint = {
            "format": 1,
            "model": trainable_state(self.module),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rngs,
            "state": {k: v for k, v in dataclasses.asdict(s).items() if k != "best_state"},
            "best_state": s.best_state,
            "global_batch": self.config.global_batch,
            "data_sha256": self.dataset.data_sha256,
        }
        path = self.options.run_dir / CHECKPOINT_FILE
        atomic_save(checkpoint, path)
        self._say(f"checkpoint: step {s.step} -> {path}")

    def restore(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint["data_sha256"] != self.dataset.data_sha256:
            raise StoreError("the data files changed since the run started; resume needs the same data")
        if checkpoint["global_batch"] != self.config.global_batch:
            raise StoreError("the global batch differs from the run's; resume needs the same data order")
        load_trainable_state(self.module, checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_state(checkpoint["rng"][self.group.rank])
        self.state = RunState(**checkpoint["state"], best_state=checkpoint["best_state"])
        if self.group.is_main:
            truncate_log(self.options.run_dir, self.state.step)
        self._say(f"resumed from step {self.state.step} of {self.config.steps}")
