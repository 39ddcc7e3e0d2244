"""A run killed with SIGKILL right after a checkpoint resumes to the same per-step losses, evaluations and
weights as an uninterrupted run. Dropout and unlikelihood noise are on, so the saved RNG states and the
noise seeding are exercised too."""

import os
import signal

import pytest
import torch

from model_store.errors import StoreError
from model_store.finetune.checkpoint import CHECKPOINT_FILE, read_log
from model_store.finetune.config import RunOptions
from model_store.finetune.train import finetune
from tests.support.finetune import (
    BASE_RUN,
    assert_same_weights,
    final_weights,
    fork_cli,
    losses,
    train_run,
    wait_status,
)

EXTRA = dict(steps=16, dropout=0.1, negatives=2, negative_weight=0.5)


def _flags(settings: dict) -> list[str]:
    return [arg for k, v in settings.items() for arg in (f"--{k.replace('_', '-')}", str(v))]


def _evals(run_dir):
    return [(r["step"], r["eval_loss"]) for r in read_log(run_dir) if "eval_loss" in r]


def test_kill_9_then_resume_matches_an_uninterrupted_run(tiny_store, corpus, tmp_path, one_thread):
    train_run(tiny_store, tmp_path / "ref", corpus, **EXTRA)

    run_dir = tmp_path / "killed"
    pid, stderr = fork_cli(
        [
            "--root",
            str(tiny_store.root),
            "finetune",
            "tiny@1",
            "--data",
            str(corpus),
            *_flags({**BASE_RUN, **EXTRA}),
            "--run-dir",
            str(run_dir),
            "--no-export",
            "--no-progress",
        ]
    )
    try:
        for line in stderr:  # printed after the checkpoint's rename
            if line.startswith("checkpoint: step 4 "):
                break
    finally:
        os.kill(pid, signal.SIGKILL)
        stderr.close()
    assert wait_status(pid) == -signal.SIGKILL
    killed_at = torch.load(run_dir / CHECKPOINT_FILE, weights_only=True)["state"]["step"]
    assert 4 <= killed_at < 16

    resumed = train_run(tiny_store, run_dir, corpus, resume=True)
    assert resumed.state.step == 16
    assert [r["step"] for r in read_log(run_dir)] == list(range(1, 17))  # cut back to the checkpoint, replayed
    want, got = losses(tmp_path / "ref"), losses(run_dir)
    assert max(abs(a - b) for a, b in zip(want, got)) <= 1e-5, (want, got)
    ref_evals, evals = _evals(tmp_path / "ref"), _evals(run_dir)
    assert [s for s, _ in evals] == [s for s, _ in ref_evals] == [4, 8, 12, 16]
    assert max(abs(a - b) for (_, a), (_, b) in zip(evals, ref_evals)) <= 1e-5
    assert_same_weights(final_weights(tmp_path / "ref"), final_weights(run_dir), atol=1e-6)


def test_resume_refuses_a_changed_option_and_a_fresh_run_refuses_a_used_dir(tiny_store, corpus, tmp_path):
    train_run(tiny_store, tmp_path / "run", corpus, steps=2)
    with pytest.raises(StoreError, match="already holds a run"):
        train_run(tiny_store, tmp_path / "run", corpus, steps=2)
    options = RunOptions(run_dir=tmp_path / "run", resume=True, export=False, progress=False, overrides={"lr": 1.0})
    with pytest.raises(StoreError, match="lr=1.0"):
        finetune(tiny_store, None, options)
