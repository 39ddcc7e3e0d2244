"""The clients users already have, unmodified, against a live server: the official `openai` SDK, and
lm-evaluation-harness's `local-completions` model, whose results must equal its `hf` model on the same
weights in float32."""

from pathlib import Path

import openai
import pytest
import yaml


@pytest.fixture(scope="module")
def sdk(live):
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def test_openai_sdk_completion_and_stream(sdk):
    kwargs = dict(model="tiny@1", prompt="The quick brown", max_tokens=12, temperature=0)
    full = sdk.completions.create(**kwargs, logprobs=2)
    (choice,) = full.choices
    assert full.object == "text_completion" and full.model == "tiny@1"
    assert choice.text and choice.finish_reason in ("length", "stop")
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == full.usage.completion_tokens
    assert all(len(top) >= 1 for top in choice.logprobs.top_logprobs)
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    chunks = list(sdk.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        choice.finish_reason
    ]
    assert chunks[-1].usage == full.usage

    two = sdk.completions.create(
        model="tiny", prompt=["The quick brown", "Tokens, positions"], max_tokens=4, temperature=0
    )
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == sdk.completions.create(
        **{**kwargs, "max_tokens": 4}
    ).choices[0].text


def test_openai_sdk_chat_and_stream(sdk):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there."}]
    full = sdk.chat.completions.create(
        model="tiny@1", messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
    )
    (choice,) = full.choices
    assert full.object == "chat.completion" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("length", "stop")
    assert len(choice.logprobs.content) == full.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)

    stream = sdk.chat.completions.create(model="tiny@1", messages=messages, max_tokens=8, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_openai_sdk_errors_are_typed(sdk):
    with pytest.raises(openai.NotFoundError) as info:
        sdk.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        sdk.completions.create(model="tiny@1", prompt="x", max_tokens=1, temperature=2.5)
    assert info.value.param == "temperature" and info.value.code == "invalid_value"


# -- lm-evaluation-harness -----------------------------------------------------------------------------------

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
RELATIVE = {"perplexity": 1e-4, "word_perplexity": 1e-4, "byte_perplexity": 1e-4, "bits_per_byte": 1e-4}
EXACT = {"acc", "acc_norm", "exact_match"}


def task_configs(cache_dir: Path) -> list[dict]:
    """The local task set as lm-eval configs: JSONL files through the `json` builder, no download."""
    configs = []
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        kwargs = config["dataset_kwargs"]
        kwargs["data_files"] = {split: str(TASKS_DIR / name) for split, name in kwargs["data_files"].items()}
        kwargs["cache_dir"] = str(cache_dir)
        configs.append(config)
    return configs


@pytest.fixture(scope="module")
def lm_eval(tmp_path_factory):
    """lm_eval, offline: no hub, no dataset download (imported here, not at collection: it is heavy)."""
    mp = pytest.MonkeyPatch()
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        mp.setenv(name, "1")
    mp.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-datasets")))
    import datasets
    import huggingface_hub.constants
    import lm_eval
    import lm_eval.evaluator

    # Already-imported modules read those variables at import: set the values they keep.
    mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    mp.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)  # torch's collect_env: slow, irrelevant
    yield lm_eval
    mp.undo()


def evaluate(lm_eval, model: str, model_args: str, cache_dir: Path, batch_size: int = 1) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=task_configs(cache_dir),
        task_manager=TaskManager(include_defaults=False),
        batch_size=batch_size,
        log_samples=True,
        bootstrap_iters=0,
        cache_requests=False,
    )


def completions_requests(live) -> float:
    (family,) = live.server.metrics.requests.collect()
    return sum(
        s.value for s in family.samples if s.name.endswith("_total") and s.labels["endpoint"] == "/v1/completions"
    )


def per_doc(results: dict, task: str) -> list:
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


@pytest.fixture(scope="module")
def hf_reference(http_store, lm_eval, tmp_path_factory):
    """lm-eval's own `hf` model on the same weights, float32 on the CPU. It scores rolling windows of
    max_length tokens, local-completions of max_length - 2 (one kept for the generated token, one for the
    window's context): 254 here gives both the same windows."""
    args = f"pretrained={http_store[1][1]},dtype=float32,device=cpu,max_length=254"
    return evaluate(lm_eval, "hf", args, tmp_path_factory.mktemp("hf-eval"))


@pytest.mark.parametrize(
    "variant",
    [
        # Token-id prompts, the server's tokenizer endpoints (no local tokenizer), one request at a time.
        "tokenizer_backend=remote",
        # The tokenizer from the HF directory, 4 prompts per request, 4 requests in flight (aiohttp).
        "tokenizer={hf_dir},tokenizer_backend=huggingface,num_concurrent=4",
        # Text prompts: the server tokenizes (`<|endoftext|>` in the text must become the single EOS id).
        "tokenizer_backend=remote,tokenized_requests=False",
    ],
    ids=["remote-tokens", "hf-tokenizer-batched-concurrent", "remote-text"],
)
def test_lm_eval_local_completions_equals_hf(live, http_store, lm_eval, hf_reference, tmp_path, variant):
    # The model's context as max_length (GPT-2 users pass 1024); max_retries=1 so a server error fails fast.
    args = f"base_url={live.url}/v1/completions,model=tiny@1,max_length=256,max_retries=1," + variant.format(
        hf_dir=http_store[1][1]
    )
    batched = "num_concurrent" in variant
    before = completions_requests(live)
    served = evaluate(lm_eval, "local-completions", args, tmp_path, batch_size=4 if batched else 1)
    reference = hf_reference
    lm_requests = sum(len(s["resps"]) for samples in served["samples"].values() for s in samples)
    if batched:  # several prompts per HTTP request (a list of token-id lists), answered in order
        assert completions_requests(live) - before <= lm_requests / 2

    compared = {}
    for task, expected in reference["results"].items():
        got = served["results"][task]
        for key, value in expected.items():
            metric = key.split(",")[0]
            if metric in EXACT:
                assert got[key] == value, (task, key, got[key], value)
            elif metric in RELATIVE:
                assert got[key] == pytest.approx(value, rel=RELATIVE[metric]), (task, key, got[key], value)
            else:
                continue
            compared[f"{task}/{metric}"] = (got[key], value)
    print("\nserver vs hf:", compared)
    assert set(compared) == {
        "tiny_mc/acc",
        "tiny_mc/acc_norm",
        "tiny_next/perplexity",
        "tiny_next/acc",
        "tiny_gen/exact_match",
        "tiny_rolling/word_perplexity",
        "tiny_rolling/byte_perplexity",
        "tiny_rolling/bits_per_byte",
    }

    # Beyond the aggregates: every document's scores and generations.
    for task in ("tiny_mc", "tiny_next", "tiny_rolling"):
        for got, want in zip(per_doc(served, task), per_doc(reference, task), strict=True):
            got_ll = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in got]
            want_ll = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in want]
            assert got_ll == pytest.approx(want_ll, rel=1e-4, abs=1e-4), task
            if task != "tiny_rolling":
                assert [r[0][1] for r in got] == [r[0][1] for r in want], task  # is_greedy
    assert per_doc(served, "tiny_gen") == per_doc(reference, "tiny_gen")
    assert served["results"]["tiny_next"]["acc,none"] > 0  # some continuations are the greedy ones
