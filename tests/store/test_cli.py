"""`python -m model_store` as a user runs it: real subprocesses, exit codes, one-line errors."""

import json
import os
import subprocess
import sys

import pytest

from model_store.errors import IntegrityError
from model_store.registry import ModelStore
from service.model import load_model


def cli(root, *args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "model_store", "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_one_line_error(result, fragment):
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def store_with_tiny(tmp_path_factory, make_hf_model):
    root = tmp_path_factory.mktemp("cli") / "store"
    assert cli(root, "import-hf", str(make_hf_model()), "--name", "tiny").returncode == 0
    return root


def test_import_list_show_verify_promote(tmp_path, make_hf_model):
    root = tmp_path / "store"
    src = make_hf_model()

    first = cli(root, "import-hf", str(src), "--name", "tiny")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "tiny@1"
    second = cli(root, "import-hf", str(src), "--name", "tiny", "--alias", "staging")
    assert second.stdout.strip() == "tiny@2"

    listing = cli(root, "list")
    assert listing.returncode == 0
    lines = listing.stdout.splitlines()
    assert lines[0].split()[:3] == ["REF", "ALIASES", "DTYPE"]
    assert lines[1].split()[:2] == ["tiny@1", "-"] and lines[2].split()[:2] == ["tiny@2", "staging,latest"]

    rows = json.loads(cli(root, "list", "--json").stdout)
    assert [r["ref"] for r in rows] == ["tiny@1", "tiny@2"]

    shown = cli(root, "show", "tiny@1")
    manifest = json.loads(shown.stdout)
    assert manifest["name"] == "tiny" and manifest["version"] == 1 and manifest["config"]["n_layer"] == 2
    assert json.loads(cli(root, "show", "tiny").stdout)["version"] == 2  # bare name is latest

    verified = cli(root, "verify", "tiny@staging")
    assert verified.returncode == 0 and verified.stdout.startswith("ok tiny@2")

    promoted = cli(root, "promote", "tiny@1", "prod")
    assert promoted.returncode == 0 and promoted.stdout.strip() == "tiny@prod -> 1"
    assert json.loads(cli(root, "show", "tiny@prod").stdout)["version"] == 1


def test_one_corrupt_byte_fails_verify_and_load(tmp_path, make_hf_model):
    root = tmp_path / "store"
    assert cli(root, "import-hf", str(make_hf_model()), "--name", "tiny").returncode == 0
    weights = root / "tiny" / "1" / "model.safetensors"
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))

    assert_one_line_error(cli(root, "verify", "tiny@1"), "tiny@1: model.safetensors fails its sha256 check")
    with pytest.raises(IntegrityError, match="model.safetensors"):
        load_model(ModelStore(root), "tiny@1")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["show", "../x"], "invalid model name '../x'"),
        (["show", "/etc/passwd"], "invalid model name"),
        (["show", ""], "empty"),
        (["show", "ghost"], "no model named 'ghost'"),
        (["verify", "tiny@9"], "tiny has no version 9 (versions: 1)"),
        (["show", "tiny@prod"], "tiny has no alias 'prod'"),
        (["promote", "tiny@1", "latest"], "'latest' is implicit"),
        (["import-hf", "/no/such/dir", "--name", "x"], "no such directory: /no/such/dir"),
        (["import-hf", ".", "--name", "../x"], "invalid model name '../x'"),
    ],
)
def test_errors_are_one_clear_line(store_with_tiny, args, fragment):
    assert_one_line_error(cli(store_with_tiny, *args), fragment)


def test_non_gpt2_is_refused_on_the_command_line(tmp_path, make_hf_model):
    src = make_hf_model()
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="bert", architectures=["BertForMaskedLM"])
    (src / "config.json").write_text(json.dumps(config))
    assert_one_line_error(cli(tmp_path / "s", "import-hf", str(src), "--name", "b"), "model_type 'bert'")


@pytest.mark.parametrize(
    "env",
    [
        {"HF_HUB_OFFLINE": "1"},
        {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},  # nothing listens on port 9
    ],
    ids=["offline-flag", "unreachable-endpoint"],
)
def test_hub_id_offline_fails_at_once_with_directions(tmp_path, env):
    env = {**env, "HF_HOME": str(tmp_path / "hf-home")}  # an empty cache: nothing to fall back on
    result = cli(tmp_path / "store", "import-hf", "openai-community/gpt2", "--name", "gpt2", env=env, timeout=60)
    assert_one_line_error(result, "Hugging Face hub is unreachable")
    assert "python -m model_store import-hf DIR --name NAME" in result.stderr
    assert not (tmp_path / "store" / "gpt2").exists()
