import json

import pytest

from model_store.errors import StoreError
from model_store.manifest import ArchConfig, FileEntry, Lineage, Manifest, TokenizerInfo

GPT2_SMALL = ArchConfig(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257, n_inner=3072)


def make_manifest(**changes) -> Manifest:
    fields = dict(
        name="m",
        version=1,
        created_at="2026-11-28T00:00:00Z",
        config=GPT2_SMALL,
        dtype="float32",
        files=(FileEntry("model.safetensors", 10, "ab" * 32),),
        tokenizer=TokenizerInfo(eos_token_id=50256, bos_token_id=50256, chat_template="{{ messages }}"),
        lineage=Lineage(source="huggingface-hub", hub_id="gpt2", hub_revision="abc"),
        metrics={"perplexity": 29.4},
        package_version="0.1.0",
    )
    return Manifest(**{**fields, **changes})


def test_json_round_trip():
    manifest = make_manifest()
    assert Manifest.from_dict(json.loads(manifest.to_json())) == manifest


def test_manifest_records_architecture_dtype_files_tokenizer_lineage_and_metrics():
    data = json.loads(make_manifest().to_json())
    assert data["schema_version"] == 1 and data["name"] == "m" and data["version"] == 1 and data["created_at"]
    cfg = data["config"]
    for key in (
        "n_layer",
        "n_head",
        "n_embd",
        "n_positions",
        "vocab_size",
        "layer_norm_epsilon",
        "activation_function",
    ):
        assert key in cfg
    assert data["dtype"] == "float32"
    assert data["files"] == [{"path": "model.safetensors", "size": 10, "sha256": "ab" * 32}]
    assert data["tokenizer"]["eos_token_id"] == 50256 and data["tokenizer"]["chat_template"] == "{{ messages }}"
    assert data["lineage"]["hub_id"] == "gpt2" and "training_config" in data["lineage"]
    assert data["metrics"] == {"perplexity": 29.4}


def test_gpt2_small_parameter_count_matches_hf():
    # GPT2LMHeadModel(GPT2Config()).num_parameters() == 124,439,808 (tied head counted once)
    assert GPT2_SMALL.num_parameters == 124_439_808


@pytest.mark.parametrize("drop", ["config", "files", "name", "tokenizer"])
def test_malformed_manifest_is_a_clear_error(drop):
    data = json.loads(make_manifest().to_json())
    del data[drop]
    with pytest.raises(StoreError, match="malformed manifest"):
        Manifest.from_dict(data)


def test_future_schema_is_refused():
    data = json.loads(make_manifest().to_json())
    data["schema_version"] = 99
    with pytest.raises(StoreError, match="schema_version 99"):
        Manifest.from_dict(data)


@pytest.mark.parametrize(
    "changes, fragment",
    [
        (dict(n_embd=100, n_head=12), "not divisible"),
        (dict(activation_function="mish"), "activation_function 'mish'"),
        (dict(n_layer=0), "n_layer must be a positive integer"),
    ],
)
def test_arch_config_validation(changes, fragment):
    fields = {**GPT2_SMALL.__dict__, **changes}
    with pytest.raises(StoreError, match=fragment):
        ArchConfig(**fields)
