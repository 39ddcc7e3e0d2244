"""The machinery of the long reliability suites (`python -m reliability.run`) and of their fast versions in
the test suite (tests/reliability/test_faults.py): the model store to serve, `python -m service` as a
subprocess, a bounded asyncio/httpx load generator with random valid requests, and the figures.

Nothing here is imported by the service. Outcomes of a request, as the suites count them:

- `ok`: 200 and a well-formed body (a stream: every choice finished, no error event, `data: [DONE]` last);
- `429`: 429 with a `Retry-After` header (and its client-side latency, send to response);
- `client_abort`: the client hung up mid-stream on purpose;
- `5xx`: a 5xx status, or a stream's error event with a 5xx code;
- `error`: anything else (another status, a malformed body, a stream error event, a timeout, a transport
  error), with the reason in `detail`.
"""

import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
GAUGES = ("gpt2_serve_num_requests_running", "gpt2_serve_num_requests_waiting", "gpt2_serve_kv_cache_usage_ratio")

# ---- the model to serve ----------------------------------------------------------------------------------

WORDS = (
    "the quick brown fox jumps over lazy dog serving language models means batching requests that arrive "
    "at different times tokens positions and caches every sequence decodes its own position a of to in is "
    "on for with as by this was from be or are not but have"
).split()
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Serving language models means batching requests that arrive at different times.",
    "Tokens, positions and caches: every sequence decodes at its own position.",
    "Caf\u00e9 na\u00efve fa\u00e7ade \u2014 r\u00e9sum\u00e9. \U0001f600 \u4f60\u597d\uff0c\u4e16\u754c\u3002",
    "def forward(self, x):\n    return self.proj(self.act(self.fc(x)))\n",
    " ".join(WORDS),
] * 20
TINY_CONFIG = dict(n_layer=2, n_head=4, n_embd=64, n_positions=256, initializer_range=0.2)


def build_tiny_store(root: Path, name: str = "tiny", versions: int = 2) -> str:
    """A store with `versions` random tiny GPT-2s (2 layers, 64 wide, 256 positions, a ~400-token byte-level
    BPE trained here), version 1 aliased `prod`. Returns "name@prod". Imitates tests/conftest.py."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from model_store import ModelStore
    from model_store.import_hf import import_hf

    hf_logging.disable_progress_bar()

    store = ModelStore(root)
    with tempfile.TemporaryDirectory(prefix="tiny-hf-") as tmp:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tok.train_from_iterator(_CORPUS, trainer)
        eos = tok.token_to_id("<|endoftext|>")
        for version in range(1, versions + 1):
            src = Path(tmp) / f"v{version}"
            torch.manual_seed(10 + version)
            cfg = GPT2Config(vocab_size=tok.get_vocab_size(), bos_token_id=eos, eos_token_id=eos, **TINY_CONFIG)
            GPT2LMHeadModel(cfg).eval().save_pretrained(src)
            tok.save(str(src / "tokenizer.json"))
            import_hf(store, str(src), name, alias="prod" if version == 1 else None)
    return f"{name}@prod"


def choose_model(
    model: str | None, store: str | None, workdir: Path, *, tiny: bool = False, log=print
) -> tuple[Path, str]:
    """(store root, reference) to serve: `model` in `store` (default MODEL_STORE_ROOT, else the repo's
    models/) when given; else the bundled `default@prod` when the repo's store has it (and not `tiny`);
    else a tiny random GPT-2 built in `workdir`."""
    from model_store import ModelStore
    from model_store.errors import StoreError
    from model_store.registry import store_root

    if model:
        root = store_root(store or os.environ.get("MODEL_STORE_ROOT") or None)
        ModelStore(root).resolve(model)  # fails early and clearly on an unknown reference
        return root, model
    root = store_root(store or None)
    if not tiny:
        try:
            ModelStore(root).resolve("default@prod")
            return root, "default@prod"
        except (StoreError, ValueError):
            log(f"default@prod is not in {root}")
    path = workdir / "store"
    log(f"building a tiny random GPT-2 in {path}")
    return path, build_tiny_store(path)


def copy_model(root: Path, ref: str, dest: Path) -> Path:
    """A writable copy (in `dest`) of the store holding `ref`'s name: every version and the aliases."""
    name = ref.split("@", 1)[0]
    shutil.copytree(root / name, dest / name, ignore=shutil.ignore_patterns(".lock"))
    for path in (dest / name).rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dest


def add_version_copy(root: Path, ref: str) -> str:
    """Publish a copy of `ref`'s files as a new version of the same name (a reload target when a store has
    only one version). Returns its "name@version"."""
    from model_store import ModelStore
    from model_store.manifest import MANIFEST_FILE, Lineage

    store = ModelStore(root)
    stored = store.resolve(ref)
    m = stored.manifest
    with store.publish(m.name) as staging:
        for entry in m.files:
            if entry.path != MANIFEST_FILE:
                (staging.path / entry.path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(stored.path / entry.path, staging.path / entry.path)
        new = staging.commit(
            config=m.config,
            dtype=m.dtype,
            tokenizer=m.tokenizer,
            lineage=Lineage(source="copy", parent=m.ref),
            metrics={},
        )
    return new.ref


# ---- the server process ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# `python -m service` with a fault injected into the engine: once the file named by RELIABILITY_FAULT_TRIGGER
# exists, the next engine step raises (once). A test hook of the runner only: the service has none.
FAULTY_SERVER = """
import os, sys
from service.engine.engine import Engine
trigger, step = os.environ["RELIABILITY_FAULT_TRIGGER"], Engine.step
def failing_step(self):
    if os.path.exists(trigger):
        os.unlink(trigger)
        raise RuntimeError("injected fault: an engine step raised")
    return step(self)
Engine.step = failing_step
from service.__main__ import main
sys.exit(main())
"""


class ServerProcess:
    """`python -m service` (or `python *argv`) on 127.0.0.1 and a free port, output in a log file, in its own
    session; `stop()` (SIGTERM, then SIGKILL) always ends it."""

    def __init__(
        self,
        root: Path,
        ref: str,
        settings: dict[str, object],
        log: Path,
        *,
        argv: list[str] | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log = log
        env = {
            **os.environ,
            "MODEL": ref,
            "MODEL_STORE_ROOT": str(root),
            "HOST": HOST,
            "PORT": str(self.port),
            **{k: str(v) for k, v in settings.items()},
            **(extra_env or {}),
        }
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, *(argv or ["-m", "service"])],
                env=env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 180) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the server was not ready within {timeout:.0f} s:\n{self.log_tail()}")

    def rss_kib(self) -> int | None:
        """Resident memory (VmRSS) of the server process, from /proc; None once it is gone."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def read_gauges(text: str) -> dict[str, float]:
    """The three routing gauges from a /metrics body, summed over label sets."""
    values = dict.fromkeys(GAUGES, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in values:
            values[name] += float(line.rsplit(" ", 1)[1])
    return values


async def wait_idle(client: httpx.AsyncClient, timeout: float = 30.0) -> tuple[bool, dict[str, float], float]:
    """Poll /metrics until running, waiting and KV usage are all 0 (bounded). Returns (reached, last
    gauges, seconds it took)."""
    start = time.monotonic()
    gauges: dict[str, float] = {}
    while True:
        try:
            gauges = read_gauges((await client.get("/metrics", timeout=10)).text)
        except httpx.HTTPError as exc:
            gauges = {"error": str(exc)}  # type: ignore[dict-item]
        if gauges and all(gauges.get(g) == 0.0 for g in GAUGES):
            return True, gauges, time.monotonic() - start
        if time.monotonic() - start > timeout:
            return False, gauges, time.monotonic() - start
        await asyncio.sleep(0.1)


async def model_info(client: httpx.AsyncClient) -> dict:
    card = (await client.get("/v1/models")).json()["data"][0]
    tok = (await client.get("/tokenizer_info")).json()
    return {
        "id": card["id"],
        "max_model_len": card["max_model_len"],
        "vocab_size": tok["vocab_size"],
        "eos_token_id": tok["eos_token_id"],
    }


# ---- requests ----------------------------------------------------------------------------------------------


@dataclass
class Spec:
    kind: str
    path: str
    body: dict
    stream: bool = False
    abort_after: int | None = None  # a stream: hang up after this many events
    expect: int = 1  # choices (completions) or results (score) in a complete answer


@dataclass
class Result:
    kind: str
    outcome: str  # ok, 429, client_abort, 5xx, error
    status: int | None
    latency: float
    start: float
    detail: str = ""
    retry_after: float | None = None  # a 429's Retry-After, in seconds


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _token(rng: random.Random, vocab: int, eos: int | None) -> int:
    """A random token id other than EOS."""
    t = rng.randrange(vocab - 1)
    return t + 1 if eos is not None and t >= eos else t


def _sampling(rng: random.Random, info: dict, max_new: int) -> dict:
    body: dict = {"max_tokens": rng.randint(1, max_new)}
    if rng.random() < 0.7:
        body["temperature"] = rng.choice([0.0, 0.5, 0.8, 1.0, 1.3])
    if rng.random() < 0.3:
        body["top_p"] = rng.choice([0.5, 0.9, 1.0])
    if rng.random() < 0.3:
        body["top_k"] = rng.choice([-1, 0, 1, 5, 50])
    if rng.random() < 0.15:
        body["min_p"] = rng.choice([0.0, 0.05, 0.1])
    if rng.random() < 0.2:
        body[rng.choice(["presence_penalty", "frequency_penalty"])] = rng.choice([-1.0, 0.5, 1.5])
    if rng.random() < 0.15:
        body["repetition_penalty"] = rng.choice([0.8, 1.1, 1.3])
    if rng.random() < 0.3:
        body["seed"] = rng.randrange(1 << 30)
    if rng.random() < 0.2:
        body["stop"] = rng.choice(["\n", [" the", "."], ["fox"]])
    if rng.random() < 0.1:
        body["logit_bias"] = {str(rng.randrange(info["vocab_size"])): rng.choice([-100.0, 5.0])}
    if rng.random() < 0.2:
        body["ignore_eos"] = True
    if rng.random() < 0.15:
        body["min_tokens"] = rng.randint(0, body["max_tokens"])
    if rng.random() < 0.2:
        body["n"] = 2
    return body


def mixed_request(rng: random.Random, info: dict, *, abort_fraction: float = 0.1, max_new: int = 32) -> Spec:
    """One random valid request of the soak mix: completions and chat (streaming or not), scoring (texts,
    context + continuations, rolling). `abort_fraction` of the streams hang up after 1-3 events."""
    max_len, vocab, eos = info["max_model_len"], info["vocab_size"], info["eos_token_id"]
    max_new = min(max_new, max_len // 4)
    kind = rng.choices(
        ["completion", "completion_stream", "chat", "chat_stream", "score_text", "score_cont", "score_rolling"],
        weights=[30, 25, 10, 10, 8, 9, 8],
    )[0]
    stream = kind.endswith("_stream")
    abort_after = rng.randint(1, 3) if stream and rng.random() < abort_fraction else None
    if kind.startswith("completion"):
        body = _sampling(rng, info, max_new)
        if rng.random() < 0.5:
            body["prompt"] = _words(rng, 1, 20)
        else:
            body["prompt"] = [_token(rng, vocab, eos) for _ in range(rng.randint(1, 48))]
        if rng.random() < 0.3:
            body["logprobs"] = rng.randint(0, 3)
            body["echo"] = rng.random() < 0.3
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": rng.random() < 0.5}
        return Spec(kind, "/v1/completions", body, stream, abort_after, body.get("n", 1))
    if kind.startswith("chat"):
        body = _sampling(rng, info, max_new)
        roles = ["user", "assistant"]
        body["messages"] = [{"role": roles[i % 2], "content": _words(rng, 1, 12)} for i in range(rng.choice([1, 1, 3]))]
        if rng.random() < 0.2:
            body["logprobs"] = True
            body["top_logprobs"] = rng.randint(0, 3)
        if stream:
            body["stream"] = True
        return Spec(kind, "/v1/chat/completions", body, stream, abort_after, body.get("n", 1))
    top = rng.choice([0, 0, 1, 3])
    if kind == "score_text":
        texts = [_words(rng, 2, 30) for _ in range(rng.randint(1, 2))]
        return Spec(kind, "/v1/score", {"text": texts, "top_logprobs": top}, expect=len(texts))
    if kind == "score_cont":
        conts = [" " + _words(rng, 1, 5) for _ in range(rng.randint(1, 3))]
        return Spec(
            kind,
            "/v1/score",
            {"context": _words(rng, 3, 20), "continuations": conts, "top_logprobs": top},
            expect=len(conts),
        )
    # rolling: about 1.2-2.4 contexts of text in windows of half a context (2 to 4 windows); ~1.5 tokens a word
    words = int(max_len * rng.uniform(1.2, 2.4) / 1.5)
    return Spec(
        kind, "/v1/score", {"text": _words(rng, words, words), "rolling": True, "stride": max_len // 2}, expect=1
    )


def fixed_request(rng: random.Random, info: dict, prompt_len: int, new_tokens: int, spread: float = 0.0) -> Spec:
    """The overload suite's request: non-streaming, `prompt_len` random token ids (no prefix shared), exactly
    `new_tokens` generated (or uniformly within +-`spread` of it), greedy. A spread keeps closed-loop clients
    from running in lockstep (all admitted, prefilled and finished in the same steps), which flatters a
    baseline measured at exactly the admitted concurrency."""
    vocab, eos = info["vocab_size"], info["eos_token_id"]
    prompt = [_token(rng, vocab, eos) for _ in range(prompt_len)]
    lo, hi = max(1, round(new_tokens * (1 - spread))), max(1, round(new_tokens * (1 + spread)))
    body = {"prompt": prompt, "max_tokens": rng.randint(lo, hi), "ignore_eos": True, "temperature": 0.0}
    return Spec("completion", "/v1/completions", body)


def _error_outcome(status: int | None) -> str:
    return "5xx" if status is not None and status >= 500 else "error"


def _check_body(spec: Spec, data: dict) -> str:
    """'' when a complete non-streaming answer looks right, else what is wrong."""
    if spec.path == "/v1/score":
        results = data.get("results")
        if not isinstance(results, list) or len(results) != spec.expect:
            return f"score: {spec.expect} results expected, got {None if results is None else len(results)}"
        return ""
    choices = data.get("choices")
    if not isinstance(choices, list) or len(choices) != spec.expect:
        return f"{spec.expect} choices expected, got {None if choices is None else len(choices)}"
    if any(c.get("finish_reason") not in ("stop", "length") for c in choices):
        return f"finish reasons {[c.get('finish_reason') for c in choices]}"
    return "" if "usage" in data else "no usage"


def _check_stream(spec: Spec, events: list[str]) -> tuple[str, str]:
    """(outcome, detail) of a stream read to its end."""
    if not events or events[-1] != "[DONE]":
        return "error", f"the stream did not end with [DONE] (last: {events[-1][:200] if events else 'nothing'})"
    finished: dict[int, str | None] = {}
    for raw in events[:-1]:
        try:
            event = json.loads(raw)
        except json.JSONDecodeError:
            return "error", f"an event is not JSON: {raw[:200]}"
        if "error" in event:
            err = event["error"]
            code = err.get("code")
            outcome = "5xx" if code in ("internal_error", "service_unavailable") else "error"
            return outcome, f"error event: {code}: {err.get('message', '')[:200]}"
        for choice in event.get("choices", []):
            finished.setdefault(choice["index"], None)
            if choice.get("finish_reason"):
                finished[choice["index"]] = choice["finish_reason"]
    if len(finished) != spec.expect or None in finished.values():
        return "error", f"choices finished: {finished} ({spec.expect} expected)"
    return "ok", ""


async def execute(client: httpx.AsyncClient, spec: Spec, t0: float, timeout: float = 120.0) -> Result:
    start = time.monotonic()

    def result(outcome: str, status: int | None, detail: str = "", headers=None) -> Result:
        retry_after = None
        if headers is not None and "retry-after" in headers:
            with contextlib.suppress(ValueError):
                retry_after = float(headers["retry-after"])
        return Result(spec.kind, outcome, status, time.monotonic() - start, start - t0, detail, retry_after)

    try:
        async with asyncio.timeout(timeout):
            if not spec.stream:
                r = await client.post(spec.path, json=spec.body)
                if r.status_code == 429:
                    return result(
                        "429" if "retry-after" in r.headers else "error",
                        429,
                        "" if "retry-after" in r.headers else "429 without Retry-After",
                        r.headers,
                    )
                if r.status_code != 200:
                    return result(_error_outcome(r.status_code), r.status_code, r.text[:300])
                problem = _check_body(spec, r.json())
                return result("error" if problem else "ok", 200, problem)
            async with client.stream("POST", spec.path, json=spec.body) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode(errors="replace")
                    if r.status_code == 429:
                        ok = "retry-after" in r.headers
                        return result("429" if ok else "error", 429, "" if ok else "429 without Retry-After", r.headers)
                    return result(_error_outcome(r.status_code), r.status_code, text[:300])
                events: list[str] = []
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if spec.abort_after is not None and len(events) >= spec.abort_after and events[-1] != "[DONE]":
                            return result("client_abort", 200)  # leaving the block closes the connection
                outcome, detail = _check_stream(spec, events)
                return result(outcome, 200, detail)
    except TimeoutError:
        return result("error", None, f"no complete answer within {timeout:.0f} s")
    except httpx.HTTPError as exc:
        return result("error", None, f"{type(exc).__name__}: {exc}")


@dataclass
class LoadReport:
    results: list[Result] = field(default_factory=list)
    duration: float = 0.0
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, KiB)


async def drive(
    url: str,
    clients: int,
    duration: float,
    make: Callable[[random.Random], Spec],
    *,
    max_requests: int = 1_000_000,
    seed: int = 0,
    retry_pause: tuple[float, float] | None = None,
    request_timeout: float = 120.0,
    server: ServerProcess | None = None,
    stagger: float = 0.0,
    rss_every: float = 1.0,
    report: LoadReport | None = None,
) -> LoadReport:
    """`clients` closed-loop clients send `make(rng)` requests until `duration` seconds have passed or
    `max_requests` were sent; a client that got 429 waits before its next request, as told by Retry-After
    (times a random factor in [0.5, 1.5], so retries spread), or for a random time in `retry_pause`.
    Requests in flight at the deadline run to their end (bounded by `request_timeout`). Each client starts
    after a random delay of up to `stagger` seconds. Samples the server's RSS every `rss_every` seconds."""
    report = report or LoadReport()
    t0 = time.monotonic()
    deadline = t0 + duration
    sent = 0
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)

    async with httpx.AsyncClient(base_url=url, timeout=request_timeout, limits=limits) as client:

        async def worker(i: int) -> None:
            nonlocal sent
            rng = random.Random(seed * 100_003 + i)
            if stagger:
                await asyncio.sleep(rng.uniform(0, stagger))
            while time.monotonic() < deadline and sent < max_requests:
                sent += 1
                res = await execute(client, make(rng), t0, request_timeout)
                report.results.append(res)
                if res.outcome == "429":
                    pause = (
                        rng.uniform(*retry_pause) if retry_pause else (res.retry_after or 1.0) * rng.uniform(0.5, 1.5)
                    )
                    await asyncio.sleep(pause)

        async def sample_rss() -> None:
            while server is not None:
                rss = server.rss_kib()
                if rss is not None:
                    report.rss.append((time.monotonic() - t0, rss))
                await asyncio.sleep(rss_every)

        sampler = asyncio.ensure_future(sample_rss())
        try:
            await asyncio.gather(*(worker(i) for i in range(clients)))
        finally:
            sampler.cancel()
    report.duration = time.monotonic() - t0
    if server is not None and (rss := server.rss_kib()) is not None:
        report.rss.append((report.duration, rss))
    return report


# ---- figures -----------------------------------------------------------------------------------------------


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return math.nan
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    f = int(k)
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


def summarize(results: list[Result], duration: float) -> dict:
    count = lambda o: sum(1 for r in results if r.outcome == o)  # noqa: E731
    ok = [r.latency for r in results if r.outcome == "ok"]
    rejected = [r.latency for r in results if r.outcome == "429"]
    return {
        "sent": len(results),
        "completed": count("ok"),
        "rejected_429": count("429"),
        "client_aborts": count("client_abort"),
        "5xx": count("5xx"),
        "other_errors": count("error"),
        "duration_s": round(duration, 1),
        "latency_p50_s": pct(ok, 50),
        "latency_p95_s": pct(ok, 95),
        "latency_max_s": max(ok, default=math.nan),
        "latency_429_p50_ms": pct(rejected, 50) * 1000,
        "latency_429_p95_ms": pct(rejected, 95) * 1000,
        "latency_429_max_ms": max(rejected, default=math.nan) * 1000,
        "by_kind": {k: sum(1 for r in results if r.kind == k) for k in sorted({r.kind for r in results})},
    }


def rss_growth(samples: list[tuple[float, int]], duration: float) -> dict:
    """RSS just after warm-up (the first 10 % of the run, at least 60 s, at most half of it) and at the end
    of the load, each the median of a window of samples (10 % of the run, at least 5 s): single samples
    swing by several percent with the allocator's high-water marks. Growth between them, in percent."""
    if not samples:
        return {"rss_start_mib": math.nan, "rss_end_mib": math.nan, "rss_growth_pct": math.nan}
    warmup = min(max(0.1 * duration, 60.0), 0.5 * duration)
    window = max(0.1 * duration, 5.0)
    start_w = [kib for t, kib in samples if warmup <= t <= warmup + window] or [samples[-1][1]]
    end_w = [kib for t, kib in samples if t >= samples[-1][0] - window]
    start, end = pct(start_w, 50), pct(end_w, 50)
    return {
        "warmup_s": round(warmup, 1),
        "window_s": round(window, 1),
        "rss_first_mib": samples[0][1] / 1024,
        "rss_start_mib": start / 1024,
        "rss_end_mib": end / 1024,
        "rss_peak_mib": max(k for _, k in samples) / 1024,
        "rss_growth_pct": 100.0 * (end - start) / start,
    }


def failures(results: list[Result], outcomes: tuple[str, ...] = ("5xx", "error"), limit: int = 3) -> list[str]:
    """The first few failed requests of the given outcomes, with what went wrong."""
    bad = [r for r in results if r.outcome in outcomes]
    return [f"{r.kind} {r.status}: {r.detail}" for r in bad[:limit]]


def table(title: str, rows: list[tuple[str, object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * len(title)] + [f"  {k:<{width}}  {fmt(v)}" for k, v in rows]
    return "\n".join(lines)


def as_json(obj) -> str:
    def default(o):
        if isinstance(o, Path):
            return str(o)
        if hasattr(o, "__dataclass_fields__"):
            return asdict(o)
        return repr(o)

    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    return json.dumps(clean(obj), indent=2, default=default)


# ---- faults (shared by the runner and the fast tests) ---------------------------------------------------------

Check = tuple[str, bool, str]


def _stream_until_end(url: str, body: dict, admitted: threading.Event, out: dict) -> None:
    """A streaming request in a thread: its status, its events, when it ended. `admitted` is set when the
    response starts (the service starts a stream once the engine has queued it)."""
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
            out["status"] = r.status_code
            out["events"] = []
            admitted.set()
            for line in r.iter_lines():
                if line.startswith("data: "):
                    out["events"].append(line[6:])
    except httpx.HTTPError as exc:
        out["exception"] = f"{type(exc).__name__}: {exc}"
    finally:
        out["end"] = time.monotonic()
        admitted.set()


def stream_ending(out: dict) -> str:
    """'done' (final chunk, then [DONE]), 'error' (an error event, then [DONE]) or 'bad: ...'."""
    events = out.get("events") or []
    if out.get("status") != 200 or not events or events[-1] != "[DONE]":
        last = events[-1][:120] if events else None
        return f"bad: status {out.get('status')}, last event {last}, {out.get('exception', '')}"
    last = json.loads(events[-2]) if len(events) >= 2 else {}
    if "error" in last:
        return "error"
    if last.get("choices") and last["choices"][0].get("finish_reason"):
        return "done"
    return "bad: no final chunk"


def sigterm_streams(
    server: ServerProcess, streams: int, drain_timeout: float, seed: int = 0
) -> tuple[dict, list[Check]]:
    """(a) Start `streams` streams (half to half the context, half to all of it) on a server started with
    DRAIN_TIMEOUT = `drain_timeout` that admits them all (MAX_NUM_SEQS + MAX_WAITING_REQUESTS >= streams); once each has
    started (admitted: running or waiting), SIGTERM the server. Every stream must end with its final chunk or an error
    event, then [DONE], within DRAIN_TIMEOUT (+2 s); a new request meanwhile gets 503; the exit status is 0."""
    info = asyncio.run(_info(server.url))
    rng = random.Random(seed)
    outs: list[dict] = [{} for _ in range(streams)]
    admitted = [threading.Event() for _ in range(streams)]
    threads = []
    for i in range(streams):
        body = {
            "prompt": [_token(rng, info["vocab_size"], info["eos_token_id"]) for _ in range(8)],
            "max_tokens": info["max_model_len"] // (2 if i % 2 == 0 else 1) - 8,
            "ignore_eos": True,
            "stream": True,
        }
        threads.append(
            threading.Thread(target=_stream_until_end, args=(server.url, body, admitted[i], outs[i]), daemon=True)
        )
    for t in threads:
        t.start()
    for e in admitted:
        e.wait(120)
    in_flight = sum(1 for o in outs if "end" not in o and o.get("status") == 200)
    t_sig = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    refused = None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and refused is None:
        try:
            r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=5)
            refused = r.status_code if r.status_code != 200 else None
        except httpx.HTTPError:
            break
    for t in threads:
        t.join(drain_timeout + 60)
    try:
        code = server.proc.wait(drain_timeout + 60)
    except subprocess.TimeoutExpired:
        code = None
    t_exit = time.monotonic()
    endings = [stream_ending(o) for o in outs]
    late = [round(o["end"] - t_sig, 2) for o in outs if o["end"] - t_sig > drain_timeout + 2]
    bad = [e for e in endings if e.startswith("bad")]
    fig = {
        "streams": streams,
        "in_flight_at_sigterm": in_flight,
        "drain_timeout_s": drain_timeout,
        "finished": endings.count("done"),
        "cut_with_error_event": endings.count("error"),
        "bad": bad[:3],
        "last_stream_end_s": round(max(o["end"] for o in outs) - t_sig, 2),
        "exit_code": code,
        "exit_after_s": round(t_exit - t_sig, 2),
        "new_request_while_draining": refused,
    }
    checks = [
        ("(a) every stream was admitted and in flight at SIGTERM", in_flight == streams, f"{in_flight}/{streams}"),
        ("(a) every stream ended with its final chunk or an error event, then [DONE]", not bad, str(bad[:3])),
        ("(a) all ended within DRAIN_TIMEOUT (+2 s)", not late, f"late: {late}"),
        ("(a) a new request while draining gets 503", refused == 503, f"got {refused}"),
        ("(a) exit status 0", code == 0, f"exit {code} after {fig['exit_after_s']} s"),
    ]
    return fig, checks


async def _info(url: str) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return await model_info(client)


# Export stages as seen in the staging directory: finetune's export writes the weights, the tokenizer, the
# step log, the plot and the card, then the commit writes manifest.json and renames the directory.
STAGES = {
    "staging-created": lambda d: True,
    "weights-written": lambda d: (d / "tokenizer.json").exists(),
    "manifest-written": lambda d: (d / "manifest.json").exists(),
}


def model_store_cli(root: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "model_store", "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def kill_export_at(root: Path, name: str, argv: list[str], stage: str, timeout: float = 600) -> dict:
    """Run `python -m model_store finetune argv`; the moment its staging directory reaches `stage`, freeze it
    (SIGSTOP, so the kill lands exactly there) and kill -9 it. `hit`: the kill landed inside the export."""
    staging_root = root / ".staging"
    proc = subprocess.Popen(
        [sys.executable, "-m", "model_store", "--root", str(root), "finetune", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    reached = STAGES[stage]
    deadline = time.monotonic() + timeout
    hit = None
    try:
        while time.monotonic() < deadline and hit is None:
            if staging_root.is_dir():
                for d in staging_root.glob(f"{name}.{proc.pid}.*"):
                    if reached(d):
                        proc.send_signal(signal.SIGSTOP)
                        hit = d
                        break
            if hit is None and proc.poll() is not None:
                break
            time.sleep(0.0005)
    finally:
        proc.kill()  # SIGKILL, i.e. kill -9
        _, err = proc.communicate(timeout=60)
    return {
        "stage": stage,
        "hit": hit is not None,
        "rc": proc.returncode,
        "staging_left": hit is not None and hit.exists(),
        "stderr": err[-400:],
    }


def finetune_kill(
    root: Path, ref: str, workdir: Path, stages: list[str], seed: int = 0, finish: bool = True
) -> tuple[dict, list[Check]]:
    """(b) In a store `root` holding `ref` (a copy: it is written to), kill -9 `python -m model_store finetune`
    during its export at each of `stages` (the first run trains 2 steps; later ones `--resume` it), then
    let a `--resume` finish. After every kill `list` must be unchanged and `verify` pass for every
    version; the final `--resume` (unless not `finish`) publishes a complete, verified version and cleans
    the staging area."""
    name = ref.split("@", 1)[0]
    data = workdir / "ft-data.txt"
    rng = random.Random(seed)
    data.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(60)) + "\n")
    run_dir = workdir / "ft-run"
    before = model_store_cli(root, "list", "--json").stdout
    first = [
        ref,
        "--data",
        str(data),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--block-size",
        "32",
        "--checkpoint-every",
        "1",
        "--eval-every",
        "2",
        "--run-dir",
        str(run_dir),
        "--name",
        name,
        "--alias",
        "candidate",
        "--no-progress",
    ]
    resume = ["--resume", "--run-dir", str(run_dir), "--name", name, "--alias", "candidate", "--no-progress"]
    kills, checks = [], []
    for stage in stages:
        for _attempt in range(3):  # a narrow stage can be missed (the publisher got past it first): retry
            k = kill_export_at(root, name, resume if (run_dir / "checkpoint.pt").exists() else first, stage)
            listing = model_store_cli(root, "list", "--json").stdout
            if k["hit"] or listing != before:
                break
        versions = [row["ref"] for row in json.loads(listing or "[]")]
        k["list_unchanged"] = listing == before
        k["verify"] = {v: model_store_cli(root, "verify", v).returncode for v in versions}
        kills.append(k)
        checks += [
            (f"(b) kill -9 at {stage}: landed inside the export", k["hit"], "" if k["hit"] else k["stderr"][-200:]),
            (f"(b) kill -9 at {stage}: `list` unchanged", k["list_unchanged"], ""),
            (
                f"(b) kill -9 at {stage}: `verify` passes for every version",
                bool(k["verify"]) and all(rc == 0 for rc in k["verify"].values()),
                str(k["verify"]),
            ),
        ]
    if not finish:
        return {"kills": kills}, checks
    done = model_store_cli(root, "finetune", *resume)
    new_ref = done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else None
    verify_new = model_store_cli(root, "verify", new_ref).returncode if new_ref else None
    leftovers = sorted(p.name for p in (root / ".staging").iterdir()) if (root / ".staging").is_dir() else []
    fig = {"kills": kills, "resume_published": new_ref, "resume_verify_rc": verify_new, "staging_leftovers": leftovers}
    checks.append(
        (
            "(b) a --resume afterwards publishes a complete, verified version; no staging left",
            new_ref is not None and verify_new == 0 and not leftovers,
            (done.stderr or "")[-300:] if new_ref is None else "",
        )
    )
    return fig, checks


def engine_fault(
    server: ServerProcess, trigger: Path, concurrency: int, seed: int = 0, settle: float = 20.0
) -> tuple[dict, list[Check]]:
    """(e) On a server started with FAULTY_SERVER (RELIABILITY_FAULT_TRIGGER=`trigger`) and MAX_NUM_SEQS >=
    `concurrency`: `concurrency` long requests (half streaming) run, then the next engine step raises.
    Every one must get an explicit error (a 5xx, or a stream's error event); then, for up to `settle`
    seconds, the service must either exit non-zero or keep serving, and never answer /ready 200 while a
    request fails."""

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            info = await model_info(client)
            rng = random.Random(seed)

            def long(stream: bool) -> Spec:
                return Spec(
                    "completion",
                    "/v1/completions",
                    {
                        "prompt": [_token(rng, info["vocab_size"], info["eos_token_id"]) for _ in range(8)],
                        "max_tokens": info["max_model_len"] - 8,
                        "ignore_eos": True,
                        "stream": stream,
                    },
                    stream,
                )

            t0 = time.monotonic()
            tasks = [asyncio.ensure_future(execute(client, long(i % 2 == 0), t0, 120)) for i in range(concurrency)]
            deadline = time.monotonic() + 60
            while read_gauges((await client.get("/metrics")).text)["gpt2_serve_num_requests_running"] < concurrency:
                assert time.monotonic() < deadline, "the requests never all ran"
                await asyncio.sleep(0.02)
            trigger.touch()
            t_fault = time.monotonic()
            results = await asyncio.gather(*tasks)
            ready_while_failing, probes = 0, []
            while time.monotonic() - t_fault < settle and server.proc.poll() is None:
                try:
                    ready = (await client.get("/ready", timeout=5)).status_code
                except httpx.HTTPError:
                    ready = None
                probe = await execute(
                    client, Spec("completion", "/v1/completions", {"prompt": "x", "max_tokens": 2}), t0, 30
                )
                probes.append((ready, probe.outcome))
                ready_while_failing += ready == 200 and probe.outcome != "ok"
                await asyncio.sleep(0.2)
            return results, time.monotonic() - t_fault, ready_while_failing, probes

    results, settled, ready_while_failing, probes = asyncio.run(main())
    try:
        code = server.proc.wait(30)
    except subprocess.TimeoutExpired:
        code = None
    outcomes = [r.outcome for r in results]
    serving = code is None and bool(probes) and probes[-1] == (200, "ok")
    fig = {
        "requests_in_flight": len(results),
        "their_outcomes": {o: outcomes.count(o) for o in sorted(set(outcomes))},
        "then": "exited" if code is not None else "kept serving" if serving else "neither",
        "exit_code": code,
        "ready_200_while_failing": ready_while_failing,
        "settled_after_s": round(settled, 2),
        "errors_seen": sorted({r.detail[:100] for r in results})[:2],
    }
    checks = [
        (
            "(e) every request in flight got an explicit error (5xx, or an error event)",
            all(o == "5xx" for o in outcomes),
            str(fig["their_outcomes"]),
        ),
        (
            "(e) then the service exits non-zero or keeps serving",
            code not in (None, 0) or serving,
            f"exit {code}, last probes {probes[-3:]}",
        ),
        ("(e) never /ready 200 while requests fail", ready_while_failing == 0, f"{ready_while_failing} probes"),
    ]
    return fig, checks
