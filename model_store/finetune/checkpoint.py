"""A run directory and what survives a `kill -9` in it.

    <run_dir>/config.json      the resolved TrainConfig (written once, at the start)
    <run_dir>/checkpoint.pt    the last checkpoint: trainable weights, optimizer, scheduler, every process's
                               RNG states, step and tokens seen (the data position), the best weights so far
    <run_dir>/log.jsonl        one line per optimizer step

Checkpoints and the config are written to a temporary file, fsynced, then renamed over the old one, so the
file on disk is always a complete checkpoint. The log is appended without fsync: a resume cuts it back to
the checkpoint's step, dropping steps that will be replayed and any torn last line.
"""

import json
import os
import random
from pathlib import Path
from typing import Any

import torch

from ..errors import StoreError
from ..registry import _fsync_dir

CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.jsonl"


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        if isinstance(obj, str):
            fh.write(obj.encode())
        else:
            torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CHECKPOINT_FILE
    if not path.is_file():
        raise StoreError(f"nothing to resume: {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad file
        raise StoreError(f"cannot read checkpoint {path}: {exc}") from None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / LOG_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill; only ever the last
            break
    return records


def truncate_log(run_dir: Path, step: int) -> None:
    """Keep the log's records up to and including `step` (the checkpoint being resumed)."""
    kept = [r for r in read_log(run_dir) if r["step"] <= step]
    atomic_save("".join(json.dumps(r) + "\n" for r in kept), run_dir / LOG_FILE)
