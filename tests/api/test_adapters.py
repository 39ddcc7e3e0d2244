"""LoRA adapters served beside their base (`ADAPTERS`): a request names one as its `model` and gets what the
merged model would give; `/v1/models` lists them; an adapter that cannot be served stops the start with a
message naming it."""

import asyncio
import json
import os
import shutil

import httpx
import pytest
import torch
from safetensors.torch import load_file

from model_store import IntegrityError, ModelStore, StoreError
from model_store.adapters import merged, publish_adapter
from model_store.manifest import ADAPTER_FILE, WEIGHTS_FILE, AdapterInfo, Lineage
from service.config import ServiceConfig
from service.engine import SamplingParams
from service.metrics import Metrics
from service.model import load_model
from service.serving import ModelServer
from tests.engine.test_engine import make_engine, run_all
from tests.support.live import serve

RANK = 4


def _random_adapter(store: ModelStore, base_ref: str, name: str, seed: int, rank: int = RANK):
    base = store.verify(base_ref)
    shapes = AdapterInfo(base_ref, "", rank, 8.0, ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")).tensor_shapes(
        base.manifest.config
    )
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: 0.2 * torch.randn(shape, generator=gen) for k, shape in shapes.items()}
    lineage = Lineage(source="local-directory", parent=base.ref)
    return publish_adapter(store, name, base, tensors, alpha=8.0, lineage=lineage, dtype="float32"), tensors


@pytest.fixture(scope="module")
def lora_store(http_store, tmp_path_factory):
    """The HTTP tests' store (tiny@1 prod, tiny@2, tiny@3) plus tiny-lora@1 (of tiny@1), other-lora@1 (of
    tiny@2), wide-lora@1 (of tiny@1, rank 16) and third-lora@1 (of tiny@1); and tiny-lora's tensors."""
    root = tmp_path_factory.mktemp("lora-store") / "store"
    shutil.copytree(http_store[0], root)
    store = ModelStore(root)
    _, tensors = _random_adapter(store, "tiny@1", "tiny-lora", seed=1)
    _random_adapter(store, "tiny@2", "other-lora", seed=2)
    _random_adapter(store, "tiny@1", "wide-lora", seed=3, rank=16)
    _random_adapter(store, "tiny@1", "third-lora", seed=5)
    return store, tensors


@pytest.fixture(scope="module")
def lora_live(lora_store):
    with serve(lora_store[0].root, adapters="tiny-lora@1") as live:
        yield live


@pytest.fixture(scope="module")
def expected(lora_store):
    """Greedy text of the base and of the merged model (tiny@1 with tiny-lora added in) alone, per prompt."""
    store, tensors = lora_store
    base = load_model(store, "tiny@1")
    merged_model = load_model(store, "tiny@1")
    weights = load_file(str(store.verify("tiny@1").path / WEIGHTS_FILE))
    info = store.verify("tiny-lora@1").manifest.adapter
    merged_model.model.load_state_dict(merged(weights, tensors, info), strict=True)
    params = dict(temperature=0.0, max_tokens=12, ignore_eos=True)

    def text(loaded, prompt):
        return run_all(make_engine(loaded), {0: [("r", prompt, SamplingParams(**params))]})["r"][1]

    prompts = [[5, 17, 33, 2, 9], [100, 3, 3, 41, 7, 8, 250], [64, 1]]
    return {
        (i, ref): text(m, p) for i, p in enumerate(prompts) for ref, m in ((None, base), ("lora", merged_model))
    }, prompts


def _complete(client, prompt, model, **extra):
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True, **extra}
    if model is not None:
        body["model"] = model
    return client.post("/v1/completions", json=body)


def test_models_lists_each_adapter_with_its_base(lora_live):
    data = lora_live.client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["tiny@1", "tiny-lora@1"]
    assert data[1]["parent"] == "tiny@1" and data[1]["root"] == "tiny-lora" and data[1]["lora_rank"] == RANK
    assert "parent" not in data[0]


def test_an_adapter_request_gets_what_the_merged_model_gives(lora_live, expected):
    want, prompts = expected
    for i, prompt in enumerate(prompts):
        for name in ("tiny-lora@1", "tiny-lora"):
            r = _complete(lora_live.client, prompt, name)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == want[(i, "lora")] and r.json()["model"] == "tiny-lora@1"
        base = _complete(lora_live.client, prompt, "tiny@1").json()
        assert base["choices"][0]["text"] == want[(i, None)] and base["model"] == "tiny@1"
    assert any(want[(i, "lora")] != want[(i, None)] for i in range(len(prompts)))  # the adapter matters


def test_base_and_adapter_requests_at_once_each_get_their_own(lora_live, expected):
    want, prompts = expected

    async def main():
        async with httpx.AsyncClient(base_url=lora_live.url, timeout=60) as client:
            jobs = [(i, ref) for i in range(len(prompts)) for ref in (None, "lora")] * 2
            bodies = []
            for n, (i, ref) in enumerate(jobs):
                body = {"prompt": prompts[i], "max_tokens": 12, "temperature": 0, "ignore_eos": True}
                body |= {"model": "tiny-lora@1"} if ref else {}
                body |= {"stream": True} if n % 2 else {}
                bodies.append(body)
            replies = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
            return jobs, bodies, replies

    jobs, bodies, replies = asyncio.run(main())
    for (i, ref), body, r in zip(jobs, bodies, replies):
        assert r.status_code == 200, r.text
        if body.get("stream"):
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]
            text = "".join(json.loads(e)["choices"][0]["text"] for e in events)
        else:
            text = r.json()["choices"][0]["text"]
        assert text == want[(i, ref)], (i, ref, body.get("stream"))


def test_scoring_and_chat_run_with_the_adapter(lora_live):
    client = lora_live.client
    sums = {}
    for model in ("tiny@1", "tiny-lora@1"):
        r = client.post("/v1/score", json={"model": model, "text": "the cat sat on the mat"})
        assert r.status_code == 200 and r.json()["model"] == model, r.text
        sums[model] = r.json()["results"][0]["sum_logprob"]
    assert sums["tiny@1"] != sums["tiny-lora@1"]
    chat = client.post(
        "/v1/chat/completions",
        json={"model": "tiny-lora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert chat.status_code == 200 and chat.json()["model"] == "tiny-lora@1", chat.text


def test_an_unknown_model_is_a_404_naming_what_is_served(lora_live):
    r = _complete(lora_live.client, [1, 2], "other-lora@1")
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "'tiny@1', 'tiny-lora@1'" in error["message"]


@pytest.mark.parametrize(
    "adapters, settings, error, message",
    [
        ("tiny@2", {}, StoreError, "ADAPTERS: tiny@2 is a model, not a LoRA adapter"),
        ("other-lora@1", {}, StoreError, "ADAPTERS: other-lora@1 is an adapter of tiny@2; MODEL is tiny@1"),
        ("wide-lora@1", {"MAX_LORA_RANK": "8"}, StoreError, "wide-lora@1 has rank 16, over MAX_LORA_RANK=8"),
        ("corrupt-lora@1", {}, IntegrityError, f"corrupt-lora@1: {ADAPTER_FILE} fails its sha256 check"),
    ],
)
def test_an_adapter_that_cannot_be_served_stops_the_start(lora_store, tmp_path, adapters, settings, error, message):
    root = tmp_path / "store"
    shutil.copytree(lora_store[0].root, root)
    store = ModelStore(root)
    if adapters.startswith("corrupt"):
        stored, _ = _random_adapter(store, "tiny@1", "corrupt-lora", seed=4)
        file = stored.path / ADAPTER_FILE
        os.chmod(file, 0o644)
        with open(file, "r+b") as fh:
            fh.seek(-4, os.SEEK_END)
            fh.write(b"\x01\x02\x03\x04")
    env = {"MODEL": "tiny@1", "MODEL_STORE_ROOT": str(root), "DTYPE": "float32", "KV_CACHE_MEMORY": "16MiB"}
    config = ServiceConfig.from_env({**env, "ADAPTERS": adapters, "NUM_THREADS": "1", **settings})
    server = ModelServer(config, store, Metrics())
    with pytest.raises(error, match=message):
        asyncio.run(server.start())


def test_a_reload_to_another_base_leaves_its_adapters_out(lora_store, tmp_path):
    with serve(lora_store[0].root, adapters="tiny-lora@1") as live:
        r = live.client.post("/admin/reload", json={"model": "tiny@2"})
        assert r.status_code == 200, r.text
        assert [m["id"] for m in live.client.get("/v1/models").json()["data"]] == ["tiny@2"]
        assert _complete(live.client, [1, 2], "tiny-lora@1").status_code == 404
        r = live.client.post("/admin/reload", json={"model": "tiny@1"})
        assert [m["id"] for m in live.client.get("/v1/models").json()["data"]] == ["tiny@1", "tiny-lora@1"]


def _ids(client):
    return [m["id"] for m in client.get("/v1/models").json()["data"]]


def test_adapters_load_and_unload_while_serving(lora_store, expected):
    want, prompts = expected
    with serve(lora_store[0].root, max_adapters=2) as live:
        client = live.client
        assert _ids(client) == ["tiny@1"]
        assert _complete(client, prompts[0], "tiny-lora@1").status_code == 404
        r = client.post("/admin/adapters", json={"adapter": "tiny-lora@1"})
        assert r.status_code == 200 and r.json()["adapter"]["parent"] == "tiny@1" and r.json()["evicted"] == []
        assert _complete(client, prompts[0], "tiny-lora").json()["choices"][0]["text"] == want[(0, "lora")]
        assert client.post("/admin/adapters", json={"adapter": "wide-lora@1"}).json()["evicted"] == []
        _complete(client, prompts[1], "tiny-lora@1")  # wide-lora is now the least recently used
        r = client.post("/admin/adapters", json={"adapter": "third-lora@1"})
        assert r.status_code == 200 and r.json()["evicted"] == ["wide-lora@1"]
        assert _ids(client) == ["tiny@1", "tiny-lora@1", "third-lora@1"]
        assert _complete(client, prompts[0], "wide-lora@1").status_code == 404
        assert _complete(client, prompts[0], "tiny-lora@1").json()["choices"][0]["text"] == want[(0, "lora")]

        for ref, status, words in [
            ("other-lora@1", 400, "is an adapter of tiny@2"),
            ("tiny@2", 400, "is a model, not a LoRA adapter"),
            ("nope@1", 404, "no model named 'nope'"),
        ]:
            r = client.post("/admin/adapters", json={"adapter": ref})
            assert r.status_code == status and words in r.json()["error"]["message"], r.text

        assert client.delete("/admin/adapters/third-lora@1").json() == {
            "object": "adapter.deleted",
            "id": "third-lora@1",
            "deleted": True,
        }
        assert client.delete("/admin/adapters/third-lora@1").status_code == 404
        assert _ids(client) == ["tiny@1", "tiny-lora@1"]


def test_an_adapter_in_use_is_neither_unloaded_nor_evicted(lora_store, monkeypatch):
    """The engine refuses to drop an adapter a request runs with (tests/finetune/test_adapters.py); here the
    engine says so for every adapter, as it would with a request of each in flight."""
    with serve(lora_store[0].root, adapters="tiny-lora@1,wide-lora@1", max_adapters=2) as live:
        client, engine = live.client, live.app.state.server.current().engine.engine
        remove = engine.remove_adapter

        def in_use(ref):
            raise ValueError(f"adapter {ref} is in use")

        monkeypatch.setattr(engine, "remove_adapter", in_use)
        r = client.delete("/admin/adapters/tiny-lora@1")
        assert r.status_code == 409 and r.json()["error"]["code"] == "adapters_busy"
        r = client.post("/admin/adapters", json={"adapter": "third-lora@1"})
        assert r.status_code == 409 and "are in use" in r.json()["error"]["message"]
        assert _ids(client) == ["tiny@1", "tiny-lora@1", "wide-lora@1"]
        monkeypatch.setattr(engine, "remove_adapter", remove)
        r = client.post("/admin/adapters", json={"adapter": "third-lora@1"})
        assert r.status_code == 200 and r.json()["evicted"] == ["tiny-lora@1"]
        assert _ids(client) == ["tiny@1", "wide-lora@1", "third-lora@1"]
