"""The global batch decides the numbers, not how it is split: 2 DDP processes (gloo, launched the way
torchrun launches them) equal 1 process, and 8 x 1 accumulation equals 2 x 4."""

import pytest

from reliability.server import free_port as _free_port
from tests.support.finetune import (
    assert_same_weights,
    final_weights,
    fork_cli,
    grad_norms,
    losses,
    train_run,
    wait_status,
)

SETTINGS = dict(steps=6, eval_every=3, negatives=2)


def test_two_ddp_processes_equal_one_at_the_same_global_batch(tiny_store, corpus, tmp_path, one_thread):
    train_run(tiny_store, tmp_path / "one", corpus, batch_size=4, **SETTINGS)

    run_dir, port = tmp_path / "two", str(_free_port())
    args = [
        "--root",
        str(tiny_store.root),
        "finetune",
        "tiny@1",
        "--data",
        str(corpus),
        "--block-size",
        "32",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--steps",
        "6",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "2",
        "--checkpoint-every",
        "4",
        "--eval-every",
        "3",
        "--negatives",
        "2",
        "--seed",
        "1",
        "--run-dir",
        str(run_dir),
        "--no-export",
        "--no-progress",
    ]
    children = []
    for rank in range(2):  # the environment torchrun gives its workers
        env = {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "TORCHELASTIC_RUN_ID": "test",
        }
        children.append(fork_cli(args, env))
    outputs = [stderr.read() for _, stderr in children]
    assert [wait_status(pid) for pid, _ in children] == [0, 0], outputs

    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "one"), losses(run_dir))) <= 1e-5
    assert grad_norms(run_dir) == pytest.approx(grad_norms(tmp_path / "one"), rel=1e-5)
    assert_same_weights(final_weights(tmp_path / "one"), final_weights(run_dir), atol=1e-5)


def test_batch_8_accum_1_equals_batch_2_accum_4(tiny_store, corpus, tmp_path, one_thread):
    train_run(tiny_store, tmp_path / "a", corpus, batch_size=8, grad_accum=1, **SETTINGS)
    train_run(tiny_store, tmp_path / "b", corpus, batch_size=2, grad_accum=4, **SETTINGS)
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "a"), losses(tmp_path / "b"))) <= 1e-5
    assert grad_norms(tmp_path / "b") == pytest.approx(grad_norms(tmp_path / "a"), rel=1e-5)
    assert_same_weights(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"), atol=1e-5)
    # and a different global batch does not match, so the comparison can tell
    train_run(tiny_store, tmp_path / "c", corpus, batch_size=2, grad_accum=2, **SETTINGS)
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "a"), losses(tmp_path / "c"))) > 1e-3
