"""LoRA (peft, fan_in_fan_out for GPT-2's Conv1D) is merged at export: the store version loads as a plain
GPT2LMHeadModel and gives the adapter model's logits."""

import torch
from transformers import GPT2LMHeadModel

from model_store.finetune.export import restore_model
from model_store.hf_format import load_hf_model
from tests.support.finetune import train_run


def test_exported_merged_weights_equal_the_adapter_model(tiny_store, corpus, tmp_path):
    result = train_run(
        tiny_store,
        tmp_path / "run",
        corpus,
        steps=4,
        lr=2e-2,
        lora_r=4,
        lora_dropout=0.1,
        export=True,
        name="tiny-lora",
    )
    adapted = restore_model(tiny_store, tmp_path / "run")  # the best checkpoint, adapters unmerged
    lora_b = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)  # trained: B starts at zero

    exported = load_hf_model(tiny_store.verify(result.exported.ref))
    assert type(exported) is GPT2LMHeadModel
    base = load_hf_model(tiny_store.verify("tiny@1"))
    ids = torch.randint(0, base.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got, before = adapted(input_ids=ids).logits, exported(input_ids=ids).logits, base(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-5
    assert (got - before).abs().max() > 1e-3  # the adapters changed something, and the export kept it
    manifest = result.exported.manifest
    assert manifest.lineage.parent == "tiny@1" and manifest.lineage.training_config["lora_r"] == 4
