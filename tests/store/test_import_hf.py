"""import-hf from local HF directories: every weight layout, both tokenizer forms, and refusals."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import GPT2LMHeadModel, GPT2Tokenizer

from model_store.errors import StoreError, UnsupportedModelError
from model_store.hf_format import canonical_from_hf, hf_from_canonical
from model_store.import_hf import import_hf


def hf_state(model_dir: Path) -> dict[str, torch.Tensor]:
    return GPT2LMHeadModel.from_pretrained(model_dir).state_dict()


@pytest.mark.parametrize("weights", ["safetensors", "sharded", "bin", "sharded-bin"])
def test_every_weight_layout_imports_to_the_same_canonical_tensors(store, make_hf_model, weights):
    src = make_hf_model(weights=weights, seed=1)
    stored = import_hf(store, str(src), "tiny")
    assert stored.ref == "tiny@1"
    tensors = load_file(stored.path / "model.safetensors")
    reference = hf_state(make_hf_model(weights="safetensors", seed=1))
    # The round trip back to HF layout reproduces HF's own tensors exactly (transposes, tied head).
    back = hf_from_canonical(tensors, stored.manifest.config)
    assert set(back) == set(reference)
    for key, value in reference.items():
        assert torch.equal(back[key], value), key
    assert "lm_head.weight" not in tensors and not any(k.endswith(("attn.bias", "masked_bias")) for k in tensors)


def test_conv1d_weights_are_stored_transposed(store, make_hf_model):
    src = make_hf_model(seed=2)
    stored = import_hf(store, str(src), "tiny")
    tensors = load_file(stored.path / "model.safetensors")
    ref = hf_state(src)
    assert torch.equal(tensors["h.0.attn.qkv.weight"], ref["transformer.h.0.attn.c_attn.weight"].t())
    assert torch.equal(tensors["h.1.mlp.fc.weight"], ref["transformer.h.1.mlp.c_fc.weight"].t())
    assert torch.equal(tensors["h.1.ln_2.bias"], ref["transformer.h.1.ln_2.bias"])


def test_manifest_describes_the_source(store, make_hf_model, tokenizer_dir):
    src = make_hf_model(config={"n_inner": 96, "activation_function": "relu"})
    manifest = import_hf(store, str(src), "tiny").manifest
    cfg = manifest.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_positions, cfg.n_inner) == (2, 4, 64, 128, 96)
    assert cfg.activation_function == "relu" and cfg.vocab_size == 400
    assert manifest.dtype == "float32"
    eos = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).token_to_id("<|endoftext|>")
    assert manifest.tokenizer.eos_token_id == eos and manifest.tokenizer.bos_token_id == eos
    assert manifest.lineage.source == "local-directory" and manifest.lineage.source_path == str(src.resolve())


def test_vocab_and_merges_become_an_equivalent_tokenizer_json(store, make_hf_model):
    src = make_hf_model(tokenizer="vocab")
    assert not (src / "tokenizer.json").exists()
    stored = import_hf(store, str(src), "tiny")
    ours = Tokenizer.from_file(str(stored.path / "tokenizer.json"))
    theirs = GPT2Tokenizer.from_pretrained(src)
    text = "The quick brown fox \u2014 caf\u00e9 \U0001f600 \u4f60\u597d<|endoftext|>serving"
    assert ours.encode(text).ids == theirs(text)["input_ids"]
    assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text


def test_dtype_conversion_is_recorded(store, make_hf_model):
    stored = import_hf(store, str(make_hf_model()), "tiny", dtype="bfloat16")
    assert stored.manifest.dtype == "bfloat16"
    assert load_file(stored.path / "model.safetensors")["wte.weight"].dtype == torch.bfloat16


def test_chat_template_and_alias(store, make_hf_model):
    src = make_hf_model()
    template = "{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    stored = import_hf(store, str(src), "chat", alias="prod")
    assert stored.manifest.tokenizer.chat_template == template
    assert store.resolve("chat@prod").manifest.version == 1


def test_untied_head_is_kept(store, make_hf_model):
    src = make_hf_model(config={"tie_word_embeddings": False})
    stored = import_hf(store, str(src), "untied")
    tensors = load_file(stored.path / "model.safetensors")
    assert torch.equal(tensors["lm_head.weight"], hf_state(src)["lm_head.weight"])
    assert not torch.equal(tensors["lm_head.weight"], tensors["wte.weight"])


@pytest.mark.parametrize(
    "config, fragment",
    [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "model_type 'llama' (LlamaForCausalLM)"),
        ({"architectures": ["GPT2ForSequenceClassification"]}, "GPT2ForSequenceClassification is not supported"),
        ({"add_cross_attention": True}, "cross-attention"),
        ({"activation_function": "mish"}, "activation_function 'mish'"),
    ],
)
def test_non_gpt2_models_are_refused_by_name(store, make_hf_model, config, fragment):
    src = make_hf_model()
    data = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**data, **config}))
    with pytest.raises(StoreError) as err:
        import_hf(store, str(src), "bad")
    assert fragment in str(err.value)
    assert store.names() == []


def test_config_that_disagrees_with_the_weights_is_refused(store, make_hf_model):
    src = make_hf_model()
    data = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**data, "n_embd": 32}))
    with pytest.raises(UnsupportedModelError, match="wte.weight has shape"):
        import_hf(store, str(src), "bad")


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_in_a_bin_checkpoint_is_never_run(store, make_hf_model, tmp_path):
    src = make_hf_model(weights="bin")
    marker = tmp_path / "pwned"
    with open(src / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"wte.weight": _Exploit(marker)}, fh)
    with pytest.raises(StoreError, match="refused to load pytorch_model.bin"):
        import_hf(store, str(src), "evil")
    assert not marker.exists()


@pytest.mark.parametrize(
    "remove, fragment",
    [
        (["model.safetensors"], "has no weights"),
        (["tokenizer.json"], "has no tokenizer"),
        (["config.json"], "no config.json"),
    ],
)
def test_missing_files_are_named(store, make_hf_model, remove, fragment):
    src = make_hf_model()
    for name in remove:
        (src / name).unlink()
    with pytest.raises(StoreError, match=fragment):
        import_hf(store, str(src), "bad")


def test_bad_arguments_fail_before_any_work(store, tmp_path):
    with pytest.raises(StoreError, match="invalid model name"):
        import_hf(store, str(tmp_path), "../escape")
    with pytest.raises(StoreError, match="'latest' is implicit"):
        import_hf(store, str(tmp_path), "ok", alias="latest")
    with pytest.raises(StoreError, match="no such directory: ./missing"):
        import_hf(store, "./missing", "ok")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        import_hf(store, str(tmp_path / "file.txt"), "ok")


def test_canonical_conversion_rejects_unknown_tensors(make_hf_model):
    src = make_hf_model()
    state = hf_state(src)
    state["transformer.h.9.ln_1.weight"] = torch.zeros(64)
    from model_store.hf_format import arch_config_from_hf

    cfg = arch_config_from_hf(json.loads((src / "config.json").read_text()))
    with pytest.raises(UnsupportedModelError, match="unexpected tensors in checkpoint: h.9.ln_1.weight"):
        canonical_from_hf(state, cfg)
