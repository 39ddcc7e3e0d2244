"""LoRA adapters as store versions: `finetune --export-adapter` and `import-adapter` (a peft directory) publish
the adapter alone, naming its exact base; applied to the base it gives the merged export's weights; the
store's readers and loaders tell an adapter from a model."""

import dataclasses
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_store import IntegrityError, ModelStore, StoreError, UnsupportedModelError
from model_store.__main__ import main
from model_store.adapters import _peft_alpha, import_peft, merged, read_adapter
from model_store.finetune.config import RunOptions
from model_store.finetune.export import export_run, restore_model
from model_store.hf_format import load_hf_model
from model_store.manifest import ADAPTER_FILE, WEIGHTS_FILE
from service.engine import EngineRequest, SamplingParams
from service.engine.types import Unsupported
from service.model import BatchLayout, load_model
from service.model.lora import Adapter, AdapterRows, AdapterStack
from tests.engine.test_engine import make_engine, random_prompts, run_all
from tests.support.finetune import train_run


@pytest.fixture(scope="module")
def lora_run(tiny_store, corpus, tmp_path_factory):
    """A store with tiny@1, a LoRA run from it exported both ways: merged (tiny-merged@1) and as an adapter
    (tiny-lora@1, the default name)."""
    root = tmp_path_factory.mktemp("adapter-store")
    shutil.copytree(tiny_store.root, root, dirs_exist_ok=True)
    store = ModelStore(root)
    run_dir = root.parent / "run"
    train_run(store, run_dir, corpus, steps=4, lr=2e-2, lora_r=4, export=True, name="tiny-merged")
    adapter = export_run(store, run_dir, RunOptions(run_dir=run_dir, export_adapter=True, progress=False))
    return store, run_dir, adapter


def test_an_adapter_applied_to_its_base_is_the_merged_export(lora_run):
    store, _, adapter = lora_run
    info = adapter.manifest.adapter
    base = store.verify("tiny@1")
    assert adapter.ref == "tiny-lora@1" and info.base == "tiny@1"
    assert info.base_sha256 == {f.path: f.sha256 for f in base.manifest.files}[WEIGHTS_FILE]
    assert (info.rank, info.alpha, info.targets) == (4, 8.0, ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"))
    assert adapter.manifest.config == base.manifest.config and adapter.manifest.lineage.parent == "tiny@1"
    files = {f.path for f in adapter.manifest.files}
    assert {ADAPTER_FILE, "tokenizer.json", "README.md", "training_log.jsonl"} <= files and WEIGHTS_FILE not in files
    assert "stored as an adapter of `tiny@1`" in (adapter.path / "README.md").read_text()

    tensors = read_adapter(store.verify(adapter.ref))
    assert all(t.abs().max() > 0 for k, t in tensors.items() if k.endswith("lora_b"))  # trained: B starts at 0
    want = load_file(str(store.verify("tiny-merged@1").path / WEIGHTS_FILE))
    got = merged(load_file(str(base.path / WEIGHTS_FILE)), tensors, info)
    assert set(got) == set(want)
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-5
    changed = [k for k in want if (want[k] - load_file(str(base.path / WEIGHTS_FILE))[k]).abs().max() > 1e-4]
    assert changed  # the run changed the weights, so the comparison above means something


def test_an_adapter_is_not_loaded_as_a_model(lora_run):
    store, _, adapter = lora_run
    for load in (lambda: load_hf_model(store.verify(adapter.ref)), lambda: load_model(store, adapter.ref)):
        with pytest.raises(StoreError, match=r"tiny-lora@1 is a LoRA adapter of tiny@1, not a model"):
            load()


def test_verify_checks_the_adapter_file_and_its_base(lora_run, tmp_path):
    store, _, adapter = lora_run
    copy = ModelStore(tmp_path / "store")
    shutil.copytree(store.root, copy.root)
    copy.verify(adapter.ref)

    shutil.rmtree(copy.root / "tiny" / "1")  # the base is gone
    with pytest.raises(IntegrityError, match="its base tiny@1 is not in the store"):
        copy.verify(adapter.ref)

    file = copy.root / "tiny-lora" / "1" / ADAPTER_FILE
    os.chmod(file, 0o644)
    with open(file, "r+b") as fh:
        fh.seek(-8, os.SEEK_END)
        fh.write(b"\x00" * 8)
    with pytest.raises(IntegrityError, match=f"{ADAPTER_FILE} fails its sha256 check"):
        copy.verify(adapter.ref)


def test_a_peft_directory_imports_as_the_same_adapter(lora_run, tmp_path):
    store, run_dir, adapter = lora_run
    restore_model(store, run_dir).save_pretrained(tmp_path / "peft")  # peft's own adapter directory
    imported = import_peft(store, tmp_path / "peft", "tiny-peft", "tiny@1")
    assert imported.manifest.adapter.base == "tiny@1" and imported.manifest.adapter.alpha == 8.0
    want, got = read_adapter(store.verify(adapter.ref)), read_adapter(store.verify(imported.ref))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_a_peft_import_refuses_what_serving_does_not_compute(lora_run, tmp_path):
    store, run_dir, _ = lora_run
    source = tmp_path / "peft"
    restore_model(store, run_dir).save_pretrained(source)
    config = json.loads((source / "adapter_config.json").read_text())
    for change, message in [
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "trains biases"),
        ({"peft_type": "IA3"}, "is not LORA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ]:
        (source / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UnsupportedModelError, match=message):
            import_peft(store, source, "bad", "tiny@1")
    (source / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(str(source / "adapter_model.safetensors"))
    save_file(
        {k: v for k, v in tensors.items() if ".h.1.mlp.c_fc.lora_B" not in k}, str(source / "adapter_model.safetensors")
    )
    with pytest.raises(UnsupportedModelError, match="the adapter is missing tensors: h.1.mlp.fc.lora_b"):
        import_peft(store, source, "bad", "tiny@1")
    with pytest.raises(StoreError, match="tiny-lora@1 is a LoRA adapter"):
        import_peft(store, source, "bad", "tiny-lora@1")  # an adapter of an adapter
    assert "bad" not in store.names()


def test_rslora_scale_is_kept_as_alpha_over_rank():
    assert _peft_alpha({"peft_type": "LORA", "r": 4, "lora_alpha": 8}) == 8.0
    assert _peft_alpha({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": True}) == 16.0  # 8/sqrt(4)*4


def test_the_command_line_lists_and_shows_an_adapter(lora_run, capsys):
    store, _, _ = lora_run
    assert main(["--root", str(store.root), "list", "--json"]) == 0
    rows = {r["ref"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["tiny-lora@1"]["adapter"] == {"base": "tiny@1", "rank": 4} and rows["tiny@1"]["adapter"] is None
    assert rows["tiny-lora@1"]["parameters"] < rows["tiny@1"]["parameters"] / 4
    assert main(["--root", str(store.root), "list"]) == 0
    assert "LoRA r=4 of tiny@1" in capsys.readouterr().out
    assert main(["--root", str(store.root), "show", "tiny-lora@1"]) == 0
    assert json.loads(capsys.readouterr().out)["adapter"]["base"] == "tiny@1"
    assert main(["--root", str(store.root), "verify", "tiny-lora@1"]) == 0
    assert (
        main(["--root", str(store.root), "finetune", "tiny@1", "--data", "x", "--run-dir", "r", "--export-adapter"])
        == 1
    )
    assert "--export-adapter needs a LoRA run" in capsys.readouterr().err


def _logits(model, sequences, adapters=None, stack_of=AdapterStack.of):
    """One cache-free forward over `sequences` (lists of ids) together; logits per sequence."""
    layout = BatchLayout.prefill([len(s) for s in sequences])
    ids = torch.tensor([t for s in sequences for t in s])
    row_adapters = [a for a, s in zip(adapters or [None] * len(sequences), sequences) for _ in s]
    rows = AdapterRows.of(row_adapters, stack_of=stack_of)
    logits = model.compute_logits(model(ids, layout.positions(), layout, adapters=rows))
    return list(logits.split([len(s) for s in sequences]))


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn-updates", "torch-updates"])
@pytest.mark.parametrize("compiled", [False, True], ids=["torch-kernels", "chosen-kernels"])
def test_the_runtime_with_an_adapter_computes_the_merged_model(lora_run, compiled, onednn):
    """Rows of the base, of the adapter and of a second adapter in one forward pass: each equals the merged
    model (or the base) computing it alone; float32 logits within 1e-4. The adapters' products by oneDNN
    (packed) and by torch alone (the fallback) both."""
    stack_of = AdapterStack.of if onednn else lambda ads: dataclasses.replace(AdapterStack.of(ads), packed=None)
    store, _, adapter = lora_run
    base, merged_model = load_model(store, "tiny@1").model, load_model(store, "tiny-merged@1").model
    if compiled:
        for model in (base, merged_model):
            model.prepare_kernels(rows=16)
    info = adapter.manifest.adapter
    tensors = read_adapter(store.verify(adapter.ref))
    first = Adapter.from_tensors(adapter.ref, info, tensors, torch.float32, torch.device("cpu"))
    doubled = {k: (2 * v if k.endswith("lora_b") else v) for k, v in tensors.items()}
    second = Adapter.from_tensors("doubled", info, doubled, torch.float32, torch.device("cpu"))
    vocab = base.cfg.vocab_size
    gen = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (21, 5, 13, 3)]

    alone_base = _logits(base, [seqs[0]])[0]
    alone_adapter = _logits(merged_model, [seqs[1]])[0]
    assert onednn is (stack_of((first,)).packed is not None)  # the path this case means to test
    assert (_logits(base, [seqs[1]], [first], stack_of)[0] - alone_adapter).abs().max() <= 1e-4
    together = _logits(base, seqs, [None, first, second, first], stack_of)
    assert (together[0] - alone_base).abs().max() <= 1e-4
    assert (together[1] - alone_adapter).abs().max() <= 1e-4
    assert (together[3] - _logits(merged_model, [seqs[3]])[0]).abs().max() <= 1e-4
    # the second adapter is B doubled: its merged weights are the base's plus twice the update
    base_weights = {k: v.detach().clone() for k, v in base.state_dict().items()}
    second_merged = merged(base_weights, doubled, info)
    twice = load_model(store, "tiny@1").model
    twice.load_state_dict(second_merged, strict=True)
    assert (together[2] - _logits(twice, [seqs[2]])[0]).abs().max() <= 1e-4
    assert (alone_adapter - _logits(base, [seqs[1]])[0]).abs().max() > 1e-3  # the adapter changes the logits


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _adapters(store, adapter, loaded):
    """The trained adapter and a second one (its B doubled), as the engine takes them, and the weights of
    the model the second one merges into."""
    info, tensors = adapter.manifest.adapter, read_adapter(store.verify(adapter.ref))
    doubled = {k: (2 * v if k.endswith("lora_b") else v) for k, v in tensors.items()}
    first = Adapter.from_tensors(adapter.ref, info, tensors, loaded.dtype, loaded.device)
    second = Adapter.from_tensors("doubled@1", info, doubled, loaded.dtype, loaded.device)
    base_weights = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    return first, second, merged(base_weights, doubled, info)


def test_the_engine_runs_adapter_requests_beside_base_ones(lora_run):
    """Greedy requests of the base, the adapter and a second adapter in one engine, staggered: each gets
    exactly the tokens of its merged model served alone; the prefix cache never shares KV across them."""
    store, _, adapter = lora_run
    loaded = load_model(store, "tiny@1")
    first, second, second_weights = _adapters(store, adapter, loaded)
    engine = make_engine(loaded)
    engine.add_adapter(first)
    engine.add_adapter(second)
    vocab = loaded.model.cfg.vocab_size
    prompts = random_prompts(6, vocab, 9, 10, 30)
    shared = prompts[0]  # one prompt under all three, so a cache shared across them would show
    plan = [("base", None, shared), ("a", first.ref, shared), ("b", second.ref, shared)]
    plan += [(f"x{i}", [None, first.ref, second.ref][i % 3], p) for i, p in enumerate(prompts[1:])]

    got, cached, step = {}, {}, 0
    pending = list(plan)
    while pending or engine.has_work:
        if pending:  # one arrival per step: prefixes computed by earlier requests are there to be reused
            rid, ref, prompt = pending.pop(0)
            engine.add(EngineRequest(rid, prompt, GREEDY, adapter=ref))
            got[rid] = []
        for out in engine.step():
            got[out.request_id] += out.token_ids
            if out.stats is not None:
                cached[out.request_id] = out.stats.num_cached_tokens
        step += 1
        assert step < 2000

    merged_model = load_model(store, "tiny-merged@1")
    twice = load_model(store, "tiny@1")
    twice.model.load_state_dict(second_weights, strict=True)
    alone = {None: loaded, first.ref: merged_model, second.ref: twice}
    for rid, ref, prompt in plan:
        want = run_all(make_engine(alone[ref]), {0: [("r", prompt, GREEDY)]})["r"][0]
        assert got[rid] == want, (rid, ref)
    assert got["a"] != got["base"] and got["b"] != got["a"]  # the adapters change what is generated
    assert cached["a"] == 0 and cached["b"] == 0  # not the base's KV for the same prompt


def test_an_adapter_the_engine_does_not_hold_is_refused(lora_run):
    store, _, adapter = lora_run
    loaded = load_model(store, "tiny@1")
    first, _, _ = _adapters(store, adapter, loaded)
    engine = make_engine(loaded)
    with pytest.raises(Unsupported, match="adapter tiny-lora@1 is not loaded"):
        engine.add(EngineRequest("r", [1, 2, 3], GREEDY, adapter=first.ref))
    engine.add_adapter(first)
    engine.add(EngineRequest("r", [1, 2, 3], GREEDY, adapter=first.ref))
    with pytest.raises(ValueError, match="in use"):
        engine.remove_adapter(first.ref)
    while engine.has_work:
        engine.step()
    engine.remove_adapter(first.ref)
    assert first.ref not in engine.adapters
