"""A publishing process killed at any point leaves no partial version that `list` or a loader can see.

A real `python -m model_store import-hf` process is frozen (SIGSTOP) the moment its staging directory
reaches a given stage, checked from outside while frozen, then killed with SIGKILL.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model_store.errors import NotFoundError
from model_store.registry import STAGING_DIR, ModelStore

# Large enough (about 60 MB) that each stage lasts long enough to be caught by polling.
BIG = {"n_layer": 6, "n_embd": 512, "n_head": 8, "initializer_range": 0.02}
STAGES = {
    "writing-weights": lambda d: (d / "model.safetensors").exists(),
    "weights-written": lambda d: (d / "tokenizer.json").exists(),
    "manifest-written": lambda d: (d / "manifest.json").exists(),
}


def start_import(root: Path, src: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "model_store", "--root", str(root), "import-hf", str(src), "--name", "big"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def freeze_at(proc: subprocess.Popen, root: Path, reached, deadline_s: float = 120) -> Path:
    """Poll until a staging directory satisfies `reached`, then SIGSTOP the publisher. Returns the dir."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        for staging in (root / STAGING_DIR).glob("big.*") if (root / STAGING_DIR).is_dir() else []:
            if reached(staging):
                proc.send_signal(signal.SIGSTOP)
                return staging
        if proc.poll() is not None:
            pytest.fail(f"publisher finished before the stage was reached: {proc.returncode} {proc.stderr.read()}")
        time.sleep(0.0005)
    pytest.fail("stage not reached in time")


def assert_nothing_visible(root: Path) -> None:
    store = ModelStore(root)
    assert store.names() == [] and store.versions("big") == []
    with pytest.raises(NotFoundError):
        store.resolve("big")
    listing = subprocess.run(
        [sys.executable, "-m", "model_store", "--root", str(root), "list"], capture_output=True, text=True, timeout=60
    )
    assert listing.returncode == 0 and "big" not in listing.stdout


@pytest.fixture(scope="module")
def big_model(make_hf_model) -> Path:
    return make_hf_model(config=BIG)


@pytest.mark.parametrize("stage", list(STAGES))
def test_killed_publisher_leaves_no_version(tmp_path, big_model, stage):
    root = tmp_path / "store"
    proc = start_import(root, big_model)
    try:
        staging = freeze_at(proc, root, STAGES[stage])
        assert_nothing_visible(root)  # while frozen mid-publish
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert staging.exists(), "the kill happened partway: its staging directory is left behind"
    assert_nothing_visible(root)

    # The next publish cleans the dead publisher's staging directory and gets version 1, complete.
    done = start_import(root, big_model)
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    assert out.strip() == "big@1"
    assert not staging.exists()
    assert ModelStore(root).verify("big@1").manifest.version == 1


def test_killed_publisher_never_damages_existing_versions(tmp_path, big_model):
    root = tmp_path / "store"
    first = start_import(root, big_model)
    assert first.wait(timeout=300) == 0
    before = ModelStore(root).verify("big@1").manifest
    proc = start_import(root, big_model)
    try:
        freeze_at(proc, root, STAGES["manifest-written"])
        assert ModelStore(root).versions("big") == [1]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert ModelStore(root).versions("big") == [1]
    assert ModelStore(root).verify("big@1").manifest == before
