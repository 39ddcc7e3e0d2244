"""Export: the CLI trains a tiny model from scratch and publishes it through the store's publish path; the
version is listed, verified (card, plot and log included), carries lineage and metrics, loads in the
service's runtime; with early stopping the best checkpoint is the one exported."""

import math

import pytest
import torch

from model_store import IntegrityError
from model_store.__main__ import main
from model_store.finetune.export import restore_model
from model_store.hf_format import load_hf_model
from model_store.manifest import sha256_file
from service.model import BatchLayout, KVCache, load_model
from tests.support.finetune import TINY_FT, train_run


def test_cli_from_scratch_exports_a_verified_version_with_lineage(tiny_store, corpus, tokenizer_dir, tmp_path, capsys):
    args = [
        "--root",
        str(tiny_store.root),
        "finetune",
        "--from-scratch",
        "--tokenizer",
        str(tokenizer_dir),
        *[x for k, v in TINY_FT.items() for x in (f"--{k.replace('_', '-')}", str(v))],
        "--data",
        str(corpus),
        "--block-size",
        "32",
        "--batch-size",
        "2",
        "--grad-accum",
        "4",
        "--steps",
        "6",
        "--eval-every",
        "3",
        "--checkpoint-every",
        "3",
        "--run-dir",
        str(tmp_path / "run"),
        "--name",
        "scratch",
        "--alias",
        "prod",
        "--data-license",
        "CC0-1.0",
        "--no-progress",
    ]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == "scratch@1"
    assert tiny_store.aliases("scratch") == {"prod": 1}

    stored = tiny_store.verify("scratch@prod")
    m = stored.manifest
    assert {f.path for f in m.files} == {
        "model.safetensors",
        "tokenizer.json",
        "README.md",
        "training_curve.png",
        "training_log.jsonl",
    }
    assert m.lineage.source == "training" and m.lineage.parent is None
    assert m.lineage.data_sha256 == {str(corpus.resolve()): sha256_file(corpus)}
    cfg = m.lineage.training_config
    assert (cfg["from_scratch"], cfg["grad_accum"], cfg["batch_size"], cfg["steps"]) == (True, 4, 2, 6)
    assert m.metrics["tokens_seen"] == 6 * 8 * 32 and m.metrics["steps"] == 6
    assert m.metrics["eval_perplexity"] == pytest.approx(math.exp(m.metrics["best_eval_loss"]))
    assert m.metrics["train_loss"] > 0 and m.metrics["data_license"] == "CC0-1.0"
    assert m.package_version and m.config.n_layer == 2 and m.tokenizer.eos_token_id is not None
    card = (stored.path / "README.md").read_text()
    assert "trained from scratch" in card and "CC0-1.0" in card and "Sample (greedy)" in card
    assert (stored.path / "training_curve.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    # the service runtime loads it and computes what the exported HF model computes
    loaded = load_model(tiny_store, "scratch@prod")
    ids = torch.tensor(loaded.tokenizer.encode("The quick brown fox").ids)
    cache = KVCache(loaded.model.cfg, num_blocks=4, block_size=16, device="cpu", dtype=loaded.dtype)
    layout = BatchLayout(query_lens=(len(ids),), context_lens=(0,), block_tables=((0,),))
    with torch.no_grad():
        ours = loaded.model.compute_logits(loaded.model(ids, layout.positions(), layout, cache))
        hf = load_hf_model(stored)(input_ids=ids[None]).logits[0]
    assert (ours - hf).abs().max() <= 1e-4

    card_file = stored.path / "README.md"  # verify covers the card too
    card_file.chmod(0o644)
    card_file.write_text(card + "edited\n")
    with pytest.raises(IntegrityError, match="README.md"):
        tiny_store.verify("scratch@1")


def test_early_stopping_exports_the_best_checkpoint(tiny_store, corpus, tmp_path):
    # a learning rate this high makes held-out loss rise after the first steps
    result = train_run(
        tiny_store,
        tmp_path / "run",
        corpus,
        steps=30,
        lr=0.3,
        warmup_steps=0,
        eval_every=1,
        patience=2,
        checkpoint_every=100,
        export=True,
        name="tiny-es",
    )
    state = result.state
    assert state.stopped_early and state.step < 30 and state.best_step == state.step - 2
    exported = load_hf_model(tiny_store.verify(result.exported.ref))
    best, last = restore_model(tiny_store, tmp_path / "run"), restore_model(tiny_store, tmp_path / "run", best=False)
    ids = torch.arange(40)[None]
    with torch.no_grad():
        got = exported(input_ids=ids).logits
        assert (got - best(input_ids=ids).logits).abs().max() <= 1e-5
        assert (got - last(input_ids=ids).logits).abs().max() > 1e-3
    assert result.exported.manifest.metrics["best_step"] == state.best_step
