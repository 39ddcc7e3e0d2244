"""The global batch decides the numbers, not how it is split: 2 DDP processes (gloo, launched the way
torchrun launches them) equal 1 process, and 8 x 1 accumulation equals 2 x 4.

All in float32 (bf16 off) on every CPU: `--bf16 auto` turns bf16 autocast on where the CPU has AMX, and
bf16 (8 significant bits) rounds each micro-batch's gradient matmuls, sums over its own B x T rows, so the
split shows in the gradient norms from step 1 (2e-5 relative) and Adam carries it into the losses: 6.9e-4 and
8.0e-4 apart within 6 steps on an AVX-512/AMX Xeon. Measured in float32 there: losses at most 1.4e-6 apart,
gradient norms 1e-7 relative (in float64: norms 3e-16, weights 2e-12). The bounds still catch a wrong
accumulation, measured: no `/ grad_accum` on the loss gives 4x gradient norms, `/ grad_accum**2` losses
1.3e-2 apart, a logged sum instead of a mean 19.8 apart, and DDP without the gradient all-reduce 0.12 apart.
"""

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

SETTINGS = dict(steps=6, eval_every=3, negatives=2, bf16="off")  # float32 on every CPU, see above


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
        "--bf16",
        "off",
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
