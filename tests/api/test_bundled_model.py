"""The bundled default model (models/default, committed): its files match the manifest's hashes, it beats
the unigram baseline its card reports, and the service serves it as `make serve` does (default@prod from
the repo's store). It is never retrained here: `python -m model_store.default_model build` does that."""

import json

import pytest

from model_store.registry import ModelStore, default_root
from tests.support.live import serve


@pytest.fixture(scope="module")
def bundled():
    store = ModelStore(default_root())
    return store, store.verify("default@prod")  # raises on any file whose sha256 differs from the manifest


def test_manifest_hashes_verify_and_it_is_small_enough_to_commit(bundled):
    store, version = bundled
    assert version.manifest.dtype == "float16"
    sizes = sum(p.stat().st_size for p in version.path.iterdir())
    assert sizes <= 40 * 2**20, f"{sizes / 2**20:.1f} MiB in {version.path}"
    arch = version.manifest.config
    assert arch.n_positions == 1024 and 10e6 <= arch.num_parameters <= 30e6


def test_card_and_metrics_report_held_out_perplexity_against_the_unigram_baseline(bundled):
    _, version = bundled
    metrics = version.manifest.metrics
    assert metrics["heldout_perplexity"] < metrics["unigram_perplexity"] / 2
    card = (version.path / "README.md").read_text()
    for needed in (
        "unigram baseline",
        f"{metrics['heldout_perplexity']:.1f}",
        "greedy:",
        "sampled:",
        "Public domain",
        "## Corpus and license",
    ):
        assert needed in card, needed


def test_the_service_serves_it_by_default(bundled):
    with serve(default_root(), model="default@prod") as live:
        models = live.client.get("/v1/models").json()["data"]
        assert models[0]["id"].startswith("default")
        body = {
            "model": "default",
            "prompt": "It is a truth universally acknowledged",
            "max_tokens": 12,
            "temperature": 0,
        }
        first = live.client.post("/v1/completions", json=body).json()
        again = live.client.post("/v1/completions", json=body).json()
        assert first["usage"]["completion_tokens"] == 12, json.dumps(first)
        assert first["choices"][0]["text"] == again["choices"][0]["text"]  # greedy is deterministic
        assert first["choices"][0]["text"].strip()
        scored = live.client.post(
            "/v1/score",
            json={
                "model": "default",
                "context": "In the beginning God created",
                "continuations": [" the heaven and the earth", " xq zv"],
            },
        ).json()
        plausible, noise = scored["results"]
        assert plausible["mean_logprob"] > noise["mean_logprob"]
