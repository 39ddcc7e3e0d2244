"""Production behaviour over real HTTP: API keys on every route, body limits, overload 429s, aborts on
disconnect, metrics (promtool-clean), readiness, hot reload under load, configuration errors."""

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from tokenizers import Tokenizer
from transformers import GPT2LMHeadModel

from service.app import create_app
from service.config import ConfigError, ServiceConfig
from tests.support.live import serve


def metric(live, name: str) -> float:
    text = live.client.get("/metrics").text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def wait_until(condition, timeout=20.0):
    """Poll a condition the server reaches asynchronously (an abort is applied between engine steps)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_api_keys_guard_every_route_but_health_ready_metrics(http_store):
    with serve(http_store[0], api_keys="sk-test-1234,sk-other-5678") as live:
        paths = {
            (path, method.upper())
            for path, item in live.client.get("/openapi.json", headers={"Authorization": "Bearer sk-test-1234"})
            .json()["paths"]
            .items()
            for method in item
        }
        paths |= {("/openapi.json", "GET"), ("/docs", "GET")}
        assert ("/v1/completions", "POST") in paths and ("/admin/reload", "POST") in paths
        for path, method in sorted(paths):
            r = live.client.request(method, path, json={})
            if path in ("/health", "/ready", "/metrics"):
                assert r.status_code == 200, path
            else:
                assert r.status_code == 401, path
                assert r.json()["error"]["code"] == "invalid_api_key"
            wrong = live.client.request(method, path, json={}, headers={"Authorization": "Bearer sk-test-123"})
            assert (wrong.status_code == 401) == (path not in ("/health", "/ready", "/metrics")), path
        ok = live.client.post(
            "/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers={"Authorization": "Bearer sk-other-5678"}
        )
        assert ok.status_code == 200
        assert metric(live, "gpt2_serve_rejections_total") >= 1


def test_body_limits(http_store):
    with serve(http_store[0], max_body_bytes=4096) as live:
        big = {"prompt": "x" * 5000, "max_tokens": 1}
        r = live.client.post("/v1/completions", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: the limit must hold on the bytes actually received
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"x" * 1000
            yield b'"}'

        r = live.client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert live.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_overload_gets_429_with_retry_after_and_admitted_requests_complete(http_store):
    with serve(http_store[0], max_num_seqs=1, max_waiting_requests=1) as live:

        async def burst():
            async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
                req = {"prompt": [1, 2, 3], "max_tokens": 240, "ignore_eos": True}
                return await asyncio.gather(*(client.post("/v1/completions", json=req) for _ in range(6)))

        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 1 and 429 in codes and set(codes) <= {200, 429}
        for r in responses:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "rate_limit_exceeded"
            else:
                assert r.json()["usage"]["completion_tokens"] == 240
        text = live.client.get("/metrics").text
        assert 'gpt2_serve_rejections_total{reason="overload"} ' + str(float(codes.count(429))) in text


def test_client_disconnect_aborts_and_frees_kv(live):
    aborts = metric(live, "gpt2_serve_aborts_total")
    with live.client.stream(
        "POST", "/v1/completions", json={"prompt": [1, 2], "max_tokens": 250, "ignore_eos": True, "stream": True}
    ) as r:
        next(r.iter_lines())  # one event, then hang up
    wait_until(lambda: metric(live, "gpt2_serve_aborts_total") == aborts + 1)
    wait_until(
        lambda: (
            metric(live, "gpt2_serve_kv_cache_usage_ratio") == 0.0
            and metric(live, "gpt2_serve_num_requests_running") == 0
        )
    )
    host, port = live.url.removeprefix("http://").split(":")
    body = b'{"prompt": [1, 2], "max_tokens": 250, "ignore_eos": true}'
    with socket.create_connection((host, int(port))) as sock:  # non-streaming: hang up before the answer
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        wait_until(lambda: metric(live, "gpt2_serve_num_requests_running") == 1)
    wait_until(lambda: metric(live, "gpt2_serve_aborts_total") == aborts + 2)
    wait_until(lambda: metric(live, "gpt2_serve_kv_cache_usage_ratio") == 0.0)


def test_a_client_that_leaves_while_waiting_for_admission_is_aborted_at_once(http_store):
    """Admission waits for the engine's current step (seconds on a long prefill): a client that hangs up
    meanwhile has its request aborted then, not after the step."""
    with serve(http_store[0]) as live:
        async_engine = live.server.served.engine
        engine, gate, inside = async_engine.engine, threading.Event(), threading.Event()
        step = engine.step

        def held_step():
            inside.set()
            assert gate.wait(60)
            return step()

        engine.step = held_step
        first = threading.Thread(target=live.client.post, args=("/v1/completions",), kwargs={"json": {"prompt": "x"}})
        try:
            first.start()
            assert inside.wait(30), "the engine never stepped"
            aborts, submitted = metric(live, "gpt2_serve_aborts_total"), async_engine._submitted
            host, port = live.url.removeprefix("http://").split(":")
            body = b'{"prompt": [1, 2], "max_tokens": 4}'
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(
                    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                )
                wait_until(lambda: async_engine._submitted > submitted)  # it waits for admission now
            wait_until(lambda: metric(live, "gpt2_serve_aborts_total") == aborts + 1)  # the engine is still held
        finally:
            engine.step = step
            gate.set()
            first.join(60)
        wait_until(
            lambda: (
                metric(live, "gpt2_serve_num_requests_running") == 0
                and metric(live, "gpt2_serve_num_requests_waiting") == 0
                and metric(live, "gpt2_serve_kv_cache_usage_ratio") == 0.0
            )
        )


def test_metrics_names_and_promtool(live):
    live.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    text = live.client.get("/metrics").text
    for name in (
        "gpt2_serve_time_to_first_token_seconds_bucket",
        "gpt2_serve_inter_token_latency_seconds_bucket",
        "gpt2_serve_e2e_request_latency_seconds_bucket",
        "gpt2_serve_request_queue_time_seconds_bucket",
        "gpt2_serve_num_requests_running",
        "gpt2_serve_num_requests_waiting",
        "gpt2_serve_kv_cache_usage_ratio",
        "gpt2_serve_prompt_tokens_total",
        "gpt2_serve_generation_tokens_total",
        "gpt2_serve_scored_tokens_total",
        "gpt2_serve_prefix_cache_queries_total",
        "gpt2_serve_prefix_cache_hits_total",
        "gpt2_serve_iteration_sequences_bucket",
        'gpt2_serve_model_info{device="cpu",dtype="float32",model="tiny",version="1"} 1.0',
    ):
        assert name in text, name
    promtool = shutil.which("promtool", path=f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}")
    if promtool is None:
        pytest.skip("promtool not found (make test fetches it with scripts/get-prometheus.sh when apt is available)")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_not_ready_until_loaded(http_store):
    config = ServiceConfig.from_env({"MODEL": "tiny@prod", "MODEL_STORE_ROOT": str(http_store[0])})
    app = create_app(config, start_engine=False)
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        r = client.get("/ready")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = client.post("/v1/completions", json={"prompt": "x"})
        assert (
            r.status_code == 503
            and r.json()["error"]["code"] == "service_unavailable"
            and r.headers["retry-after"] == "1"
        )


def test_hot_reload_under_load_fails_nothing(http_store):
    tok = Tokenizer.from_file(str(http_store[1][2] / "tokenizer.json"))
    with serve(http_store[0]) as live:
        results, stop = [], threading.Event()

        def load():
            with httpx.Client(base_url=live.url, timeout=60) as client:
                while not stop.is_set():
                    results.append(
                        client.post(
                            "/v1/completions", json={"prompt": [4, 5, 6], "max_tokens": 20, "ignore_eos": True}
                        ).status_code
                    )

        threads = [threading.Thread(target=load) for _ in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: len(results) >= 3)
        r = live.client.post("/admin/reload", json={"model": "tiny@2"})
        assert r.status_code == 200 and r.json()["model"]["id"] == "tiny@2"
        count = len(results)
        wait_until(lambda: len(results) >= count + 3)
        stop.set()
        for t in threads:
            t.join()
        assert results and set(results) == {200}
        assert live.client.get("/v1/models").json()["data"][0]["id"] == "tiny@2"
        assert 'model="tiny",version="2"} 1.0' in live.client.get("/metrics").text
        hf2 = GPT2LMHeadModel.from_pretrained(http_store[1][2]).eval()
        expected = hf2.generate(
            torch.tensor([[4, 5, 6]]), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0
        )[0, 3:]
        got = live.client.post(
            "/v1/completions", json={"prompt": [4, 5, 6], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        ).json()
        assert got["choices"][0]["text"] == tok.decode(expected.tolist())
        r = live.client.post("/admin/reload", json={"model": "tiny@9"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_loading_and_warm_up_leave_no_thread_behind(http_store, monkeypatch):
    """torch keeps OpenMP workers for each thread that has run a parallel region, for as long as it lives;
    one such thread beside the engine thread makes every step's parallel regions wait for wake-ups
    (docs/engine.md). A model's load and warm-up, at start and at a reload, run on a thread that ends with
    them, never on a pooled executor thread that would stay."""
    from service import serving

    ran_on, real = [], serving._run_alone

    def recording(*args):
        ran_on.append(threading.current_thread())
        return real(*args)

    monkeypatch.setattr(serving, "_run_alone", recording)
    with serve(http_store[0]) as live:
        assert live.client.post("/admin/reload", json={"model": "tiny@2"}).status_code == 200
        assert len(ran_on) == 2
        for thread in ran_on:
            thread.join(timeout=10)
            assert not thread.is_alive()
        engine_thread = live.server.current().engine._thread
        assert engine_thread not in ran_on and engine_thread.is_alive()


@pytest.mark.parametrize(
    "name, value",
    [
        ("PORT", "80000"),
        ("DTYPE", "fp8"),
        ("KV_CACHE_MEMORY", "lots"),
        ("MAX_NUM_SEQS", "0"),
        ("DRAIN_TIMEOUT", "nan"),
        ("API_KEYS", "short"),
        ("DEVICE", "tpu"),
    ],
)
def test_invalid_configuration_names_the_variable(name, value):
    with pytest.raises(ConfigError, match=f"^{name}="):
        ServiceConfig.from_env({name: value})


def test_configuration_parses_sizes_and_defaults():
    config = ServiceConfig.from_env(
        {"KV_CACHE_MEMORY": "512MiB", "MAX_BODY_BYTES": "1MB", "API_KEYS": " sk-aaaaaaaa , sk-bbbbbbbb "}
    )
    assert config.kv_cache_memory == 512 * 2**20 and config.max_body_bytes == 10**6
    assert config.api_keys == ("sk-aaaaaaaa", "sk-bbbbbbbb") and config.port == 8000 and config.model == "default@prod"
