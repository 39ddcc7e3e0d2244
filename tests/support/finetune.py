"""Running and inspecting fine-tuning runs in the tests: `train_run` (finetune in-process from the fixture
store's tiny@1, on TINY_FT with BASE_RUN's settings), the run's weights, losses and gradient norms,
`assert_same_weights`, and `fork_cli` / `wait_status` to run the CLI in a child process.

Child processes are forked rather than started fresh: a fresh interpreter spends seconds importing torch and
transformers, and the forked child is still a real process (it can be SIGKILLed, it has its own RNG state
and its own torch.distributed rank).
"""

import os
import sys
import threading
from pathlib import Path
from typing import IO

import torch
from tqdm import tqdm

from model_store import ModelStore
from model_store.__main__ import main
from model_store.finetune.checkpoint import CHECKPOINT_FILE, read_log
from model_store.finetune.config import RunOptions, TrainConfig
from model_store.finetune.train import finetune

TINY_FT = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}
# A short run that still has several checkpoints, evaluations and an LR schedule.
BASE_RUN = dict(
    block_size=32,
    batch_size=2,
    grad_accum=2,
    steps=12,
    lr=3e-3,
    warmup_steps=2,
    checkpoint_every=4,
    eval_every=4,
    seed=1,
)


def train_run(
    store: ModelStore,
    run_dir: Path,
    data: Path,
    *,
    resume: bool = False,
    export: bool = False,
    export_adapter: bool = False,
    name: str | None = None,
    **overrides,
):
    """Run finetune in-process from tiny@1 (or resume it); returns the RunResult."""
    settings = {"base": "tiny@1", "data": (str(data),), **BASE_RUN, **overrides}
    config = None if resume else TrainConfig(**settings)
    options = RunOptions(
        run_dir=run_dir, resume=resume, export=export, export_adapter=export_adapter, progress=False, name=name
    )
    return finetune(store, config, options)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / CHECKPOINT_FILE, weights_only=True)["model"]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_log(run_dir)]


def grad_norms(run_dir: Path) -> list[float]:
    """Pre-clipping gradient norms: Adam and clipping hide a gradient's scale from the weights, these do not."""
    return [r["grad_norm"] for r in read_log(run_dir)]


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    """Every weight within atol, except the attention key bias: it shifts all of a query's scores by the same
    amount, so softmax ignores it and its true gradient is 0. Its computed gradient is rounding noise that
    Adam scales to lr-sized steps, different for every way of summing the same batch."""
    assert a.keys() == b.keys()
    e = TINY_FT["n_embd"]
    a, b = dict(a), dict(b)
    for k in [k for k in a if k.endswith("attn.c_attn.bias")]:  # (q, k, v) biases: drop k
        a[k], b[k] = torch.cat([a[k][:e], a[k][2 * e :]]), torch.cat([b[k][:e], b[k][2 * e :]])
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by up to {worst}"


def fork_cli(args: list[str], env: dict[str, str] | None = None) -> tuple[int, IO[str]]:
    """Fork a child running `python -m model_store ARGS` (in-process `main`); returns its pid and its stderr."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            os.close(read_fd)
            sys.stderr = os.fdopen(write_fd, "w", buffering=1)
            os.environ.update(env or {})
            torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork
            # tqdm's write lock is a semaphore shared with the parent across fork: killed while holding it
            # (inside tqdm.write), the child would leave the parent's next progress bar waiting forever.
            tqdm.set_lock(threading.RLock())
            code = main(args)
        finally:
            os._exit(code)
    os.close(write_fd)
    return pid, os.fdopen(read_fd)


def wait_status(pid: int) -> int:
    """The child's exit code, or minus the signal that killed it."""
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
