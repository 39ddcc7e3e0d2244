"""(b) kill -9 of `python -m model_store finetune` during its export, frozen the moment its staging
directory reaches a stage: the store's listing is unchanged, every version verifies, and a `--resume` then
publishes a complete version.
"""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from reliability.scenarios import Check
from reliability.server import REPO
from reliability.traffic import WORDS

# Export stages as seen in the staging directory: finetune's export writes the weights, the tokenizer, the
# step log, the plot and the card, then the commit writes manifest.json and renames the directory.
STAGES = {
    "staging-created": lambda d: True,
    "weights-written": lambda d: (d / "tokenizer.json").exists(),
    "manifest-written": lambda d: (d / "manifest.json").exists(),
}


def model_store_cli(root: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "model_store", "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def kill_export_at(root: Path, name: str, argv: list[str], stage: str, timeout: float = 600) -> dict:
    """Run `python -m model_store finetune argv`; the moment its staging directory reaches `stage`, freeze it
    (SIGSTOP, so the kill lands exactly there) and kill -9 it. `hit`: the kill landed inside the export."""
    staging_root = root / ".staging"
    proc = subprocess.Popen(
        [sys.executable, "-m", "model_store", "--root", str(root), "finetune", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    reached = STAGES[stage]
    deadline = time.monotonic() + timeout
    hit = None
    try:
        while time.monotonic() < deadline and hit is None:
            if staging_root.is_dir():
                for d in staging_root.glob(f"{name}.{proc.pid}.*"):
                    if reached(d):
                        proc.send_signal(signal.SIGSTOP)
                        hit = d
                        break
            if hit is None and proc.poll() is not None:
                break
            time.sleep(0.0005)
    finally:
        proc.kill()  # SIGKILL, i.e. kill -9
        _, err = proc.communicate(timeout=60)
    return {
        "stage": stage,
        "hit": hit is not None,
        "rc": proc.returncode,
        "staging_left": hit is not None and hit.exists(),
        "stderr": err[-400:],
    }


def finetune_kill(
    root: Path, ref: str, workdir: Path, stages: list[str], seed: int = 0, finish: bool = True
) -> tuple[dict, list[Check]]:
    """(b) In a store `root` holding `ref` (a copy: it is written to), kill -9 `python -m model_store finetune`
    during its export at each of `stages` (the first run trains 2 steps; later ones `--resume` it), then
    let a `--resume` finish. After every kill `list` must be unchanged and `verify` pass for every
    version; the final `--resume` (unless not `finish`) publishes a complete, verified version and cleans
    the staging area."""
    name = ref.split("@", 1)[0]
    data = workdir / "ft-data.txt"
    rng = random.Random(seed)
    data.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(60)) + "\n")
    run_dir = workdir / "ft-run"
    before = model_store_cli(root, "list", "--json").stdout
    first = [
        ref,
        "--data",
        str(data),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--block-size",
        "32",
        "--checkpoint-every",
        "1",
        "--eval-every",
        "2",
        "--run-dir",
        str(run_dir),
        "--name",
        name,
        "--alias",
        "candidate",
        "--no-progress",
    ]
    resume = ["--resume", "--run-dir", str(run_dir), "--name", name, "--alias", "candidate", "--no-progress"]
    kills, checks = [], []
    for stage in stages:
        for _attempt in range(3):  # a narrow stage can be missed (the publisher got past it first): retry
            k = kill_export_at(root, name, resume if (run_dir / "checkpoint.pt").exists() else first, stage)
            listing = model_store_cli(root, "list", "--json").stdout
            if k["hit"] or listing != before:
                break
        versions = [row["ref"] for row in json.loads(listing or "[]")]
        k["list_unchanged"] = listing == before
        k["verify"] = {v: model_store_cli(root, "verify", v).returncode for v in versions}
        kills.append(k)
        checks += [
            (f"(b) kill -9 at {stage}: landed inside the export", k["hit"], "" if k["hit"] else k["stderr"][-200:]),
            (f"(b) kill -9 at {stage}: `list` unchanged", k["list_unchanged"], ""),
            (
                f"(b) kill -9 at {stage}: `verify` passes for every version",
                bool(k["verify"]) and all(rc == 0 for rc in k["verify"].values()),
                str(k["verify"]),
            ),
        ]
    if not finish:
        return {"kills": kills}, checks
    done = model_store_cli(root, "finetune", *resume)
    new_ref = done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else None
    verify_new = model_store_cli(root, "verify", new_ref).returncode if new_ref else None
    leftovers = sorted(p.name for p in (root / ".staging").iterdir()) if (root / ".staging").is_dir() else []
    fig = {"kills": kills, "resume_published": new_ref, "resume_verify_rc": verify_new, "staging_leftovers": leftovers}
    checks.append(
        (
            "(b) a --resume afterwards publishes a complete, verified version; no staging left",
            new_ref is not None and verify_new == 0 and not leftovers,
            (done.stderr or "")[-300:] if new_ref is None else "",
        )
    )
    return fig, checks
