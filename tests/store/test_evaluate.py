"""`model_store.evaluate` and `eval`: strided perplexity against brute-force references, bits per byte,
SQuAD-style EM / F1, and `--record` as a new manifest revision that leaves the weights alone."""

import json
import math
import threading

import pytest
import torch
from tokenizers import Tokenizer
from transformers import GPT2LMHeadModel

from model_store import ModelStore
from model_store.__main__ import main
from model_store.evaluate import (
    bits_per_byte,
    completion_quality,
    exact_match,
    normalize_answer,
    perplexity,
    token_f1,
    token_nll,
)
from model_store.hf_format import load_hf_model
from model_store.import_hf import import_hf
from model_store.manifest import sha256_file

CONTEXT = 32


@pytest.fixture(scope="module")
def tiny(make_hf_model, tmp_path_factory):
    """A tiny random GPT-2 with a 32-token context in a store; the HF model loaded from the store version."""
    src = make_hf_model(seed=3, config={"n_positions": CONTEXT})
    store = ModelStore(tmp_path_factory.mktemp("eval-store"))
    stored = import_hf(store, str(src), "tiny")
    tokenizer = Tokenizer.from_file(str(stored.path / "tokenizer.json"))
    return store, load_hf_model(stored), tokenizer, src


def random_ids(n, vocab, seed):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def full_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)  # (T, V)


def test_store_version_loads_as_the_same_hf_model(tiny):
    _, model, _, src = tiny
    reference = GPT2LMHeadModel.from_pretrained(src).eval()
    ids = random_ids(CONTEXT, model.config.vocab_size, 1)
    assert torch.allclose(full_logprobs(model, ids), full_logprobs(reference, ids), atol=1e-5)


@pytest.mark.parametrize("stride", [1, 5, 16, 31])
def test_strided_nll_equals_per_token_brute_force(tiny, stride):
    _, model, _, _ = tiny
    ids = random_ids(150, model.config.vocab_size, 2)
    got = token_nll(model, ids, CONTEXT, stride, batch_size=3)
    # Brute force: token i alone, after the context its window allows. Windows start every `stride` tokens;
    # the first one that reaches past i (start + CONTEXT > i) scores it, so with stride 1 that is the full
    # CONTEXT - 1 tokens and never less than CONTEXT - stride.
    total = 0.0
    for i in range(1, len(ids)):
        start = 0 if i < CONTEXT else ((i - CONTEXT) // stride + 1) * stride
        assert min(i, CONTEXT - stride) <= i - start <= CONTEXT - 1
        total -= full_logprobs(model, ids[start : i + 1])[-2, ids[i]].item()
    assert got.num_scored == len(ids) - 1
    assert abs(got.nll / got.num_scored - total / (len(ids) - 1)) <= 1e-4
    assert abs(math.exp(got.nll / got.num_scored) - math.exp(total / (len(ids) - 1))) <= 1e-4 * math.exp(total / 149)


def test_stride_equal_to_context_is_plain_chunks(tiny):
    _, model, _, _ = tiny
    ids = random_ids(100, model.config.vocab_size, 3)  # chunks of 32, 32, 32, 4
    got = token_nll(model, ids, CONTEXT, CONTEXT)
    total, count = 0.0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), CONTEXT):  # HF's loss: mean over the chunk's len - 1 predictions
            chunk = torch.tensor([ids[begin : begin + CONTEXT]])
            total += model(chunk, labels=chunk).loss.item() * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1
    assert got.num_scored == count == len(ids) - 4
    assert abs(got.nll - total) <= 1e-4 * count
    assert abs(math.exp(got.nll / got.num_scored) - math.exp(total / count)) <= 1e-4 * math.exp(total / count)


def test_bits_per_byte_formula():
    assert bits_per_byte(10 * math.log(2), 5) == pytest.approx(2.0, rel=1e-12)
    assert bits_per_byte(math.log(256) * 3, 3) == pytest.approx(8.0, rel=1e-12)  # uniform over bytes


def test_text_perplexity_scores_every_token_after_bos_and_counts_utf8_bytes(tiny):
    _, model, tokenizer, _ = tiny
    text = "Caf\u00e9 na\u00efve \U0001f600. " + "The quick brown fox jumps over the lazy dog. " * 3
    eos = tokenizer.token_to_id("<|endoftext|>")
    result = perplexity(model, tokenizer, text, batch_size=2, bos_token_id=eos)
    ids = tokenizer.encode(text).ids
    assert len(ids) > CONTEXT and result["stride"] == CONTEXT // 2
    assert result["num_bytes"] == len(text.encode("utf-8")) > len(text)
    assert result["num_tokens"] == result["num_scored"] == len(ids)  # BOS gives the first token a context
    assert result["nll_nats"] == pytest.approx(token_nll(model, [eos, *ids], CONTEXT, CONTEXT // 2).nll, rel=1e-6)
    assert result["bits_per_byte"] == pytest.approx(result["nll_nats"] / math.log(2) / result["num_bytes"], rel=1e-12)
    assert result["perplexity"] == pytest.approx(math.exp(result["nll_nats"] / result["num_scored"]), rel=1e-12)


def test_uniform_model_has_perplexity_vocab_size(tiny):
    _, model, tokenizer, _ = tiny
    uniform = GPT2LMHeadModel(model.config).eval()
    with torch.no_grad():
        uniform.transformer.wte.weight.zero_()  # tied head: every logit is 0
    text = "Serving language models means batching requests that arrive at different times. " * 4
    result = perplexity(uniform, tokenizer, text, stride=8)
    vocab = model.config.vocab_size
    assert result["perplexity"] == pytest.approx(vocab, rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(result["num_scored"] * math.log2(vocab) / len(text), rel=1e-5)


@pytest.mark.parametrize(
    "text, normalized",
    [
        ("The  Cat's hat!", "cats hat"),
        ("An apple, a pear and THE plum.", "apple pear and plum"),
        ("theatre another anthem", "theatre another anthem"),  # articles only as whole words
        ("  \tNew\nYork  ", "new york"),
        ("a an the", ""),
    ],
)
def test_squad_normalisation(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_and_token_f1_by_hand():
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("Eiffel Tower in Paris", "eiffel tower") == 0.0
    # pred words: cat sat on mat; reference: cat on mat -> 3 shared, P = 3/4, R = 1, F1 = 6/7
    assert token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    # repeated words count once per occurrence: pred cat cat, ref cat -> P = 1/2, R = 1, F1 = 2/3
    assert token_f1("cat cat", "the cat") == pytest.approx(2 / 3)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("the", "a") == 1.0  # both empty after normalisation
    assert token_f1("", "cat") == 0.0 and token_f1("cat", "") == 0.0


def greedy_by_hand(model, tokenizer, prompt, max_new_tokens, eos):
    ids = tokenizer.encode(prompt).ids
    new = []
    for _ in range(max_new_tokens):
        token = full_logprobs(model, ids + new)[-1].argmax().item()
        if token == eos:
            break
        new.append(token)
    return tokenizer.decode(new).split("\n")[0]


def test_completion_quality_scores_greedy_completions(tiny):
    _, model, tokenizer, _ = tiny
    eos = tokenizer.token_to_id("<|endoftext|>")
    prompts = ["The quick brown fox", "Tokens, positions and caches:"]
    own = greedy_by_hand(model, tokenizer, prompts[0], 6, eos)
    examples = [
        {"prompt": prompts[0], "reference": own},  # exactly what greedy decoding gives: EM 1, F1 1
        {"prompt": prompts[1], "reference": ["zebra quartz", "never said"]},  # random model: EM 0, F1 0
    ]
    assert normalize_answer(own)  # the test means something only if the completion has words
    result = completion_quality(model, tokenizer, examples, max_new_tokens=6, eos_token_id=eos)
    assert result["num_examples"] == 2
    assert result["exact_match"] == 0.5 and result["f1"] == 0.5
    half = {"prompt": prompts[0], "reference": [own + " zebra", "zebra"]}  # best of the references counts
    best = completion_quality(model, tokenizer, [half], max_new_tokens=6, eos_token_id=eos)
    n = len(normalize_answer(own).split())
    assert best["exact_match"] == 0.0 and best["f1"] == pytest.approx(2 * n / (2 * n + 1))


def run_cli(capsys, store, *args):
    status = main(["--root", str(store.root), *args])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def texts(tmp_path):
    text = tmp_path / "held-out.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8, encoding="utf-8")
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"prompt": "The quick brown", "reference": "fox"}) + "\n", encoding="utf-8")
    return text, qa


def test_cli_eval_prints_table_and_json(tiny, texts, capsys):
    store = tiny[0]
    status, out, err = run_cli(
        capsys,
        store,
        "eval",
        "tiny@1",
        "--text",
        str(texts[0]),
        "--qa",
        str(texts[1]),
        "--json",
        "--max-new-tokens",
        "8",
    )
    assert status == 0, err
    data = json.loads(out)
    assert data["ref"] == "tiny@1" and data["text"]["perplexity"] > 1 and data["qa"]["num_examples"] == 1
    assert data["text"]["sha256"] == sha256_file(texts[0])
    status, out, _ = run_cli(capsys, store, "eval", "tiny", "--text", str(texts[0]))
    assert status == 0 and f"{data['text']['perplexity']:.4f}" in out and "bits per byte" in out
    assert store.resolve("tiny@1").manifest.revision == 1  # no --record, no new revision


def test_cli_eval_errors_are_one_line(tiny, texts, capsys):
    store = tiny[0]
    status, out, err = run_cli(capsys, store, "eval", "tiny@1")
    assert status == 1 and out == "" and err.strip() == "error: nothing to evaluate: pass --text FILE and/or --qa FILE"
    status, _, err = run_cli(capsys, store, "eval", "tiny@1", "--text", str(texts[0]), "--stride", "0")
    assert status == 1 and err.startswith("error: stride must be a positive integer")
    bad = texts[1].with_name("bad.jsonl")
    bad.write_text('{"prompt": "x"}\n')
    status, _, err = run_cli(capsys, store, "eval", "tiny@1", "--qa", str(bad), "--max-new-tokens", "8")
    assert status == 1 and "bad.jsonl:1: expected" in err


def test_record_adds_a_manifest_revision_and_keeps_weights_and_earlier_metrics(make_hf_model, tmp_path, texts, capsys):
    store = ModelStore(tmp_path / "store")
    stored = import_hf(store, str(make_hf_model(seed=4, config={"n_positions": CONTEXT})), "tiny")
    files_before = stored.manifest.files
    hashes_before = {f.path: sha256_file(stored.path / f.path) for f in files_before}
    store.record_metrics("tiny@1", {"train": {"loss": 1.5}})

    status, _, err = run_cli(capsys, store, "eval", "tiny@1", "--text", str(texts[0]), "--record")
    assert status == 0 and "manifest revision 3" in err
    status, _, _ = run_cli(
        capsys, store, "eval", "tiny@1", "--qa", str(texts[1]), "--record", "--label", "qa", "--max-new-tokens", "8"
    )
    assert status == 0

    manifest = store.verify("tiny@1").manifest  # every file still matches its recorded hash
    assert manifest.revision == 4
    assert manifest.files == files_before
    assert {f.path: sha256_file(stored.path / f.path) for f in manifest.files} == hashes_before
    assert manifest.metrics["train"] == {"loss": 1.5}
    assert manifest.metrics["eval:held-out.txt"]["text"]["num_bytes"] == texts[0].stat().st_size
    assert manifest.metrics["qa"]["qa"]["num_examples"] == 1
    assert [h["revision"] for h in manifest.history] == [2, 3, 4]
    assert [list(h["metrics"]) for h in manifest.history] == [["train"], ["eval:held-out.txt"], ["qa"]]
    assert all(h["recorded_at"].endswith("Z") for h in manifest.history)

    store.record_metrics("tiny", {"train": {"loss": 1.2}})  # a key recorded again: latest shown, old kept
    manifest = store.resolve("tiny@1").manifest
    assert manifest.metrics["train"] == {"loss": 1.2} and manifest.history[0]["metrics"]["train"] == {"loss": 1.5}
    assert manifest.revision == 5 and manifest.created_at == stored.manifest.created_at


def test_concurrent_records_lose_nothing(make_hf_model, tmp_path):
    store = ModelStore(tmp_path / "store")
    import_hf(store, str(make_hf_model(seed=4, config={"n_positions": CONTEXT})), "tiny")
    threads = [threading.Thread(target=store.record_metrics, args=("tiny@1", {f"k{i}": i})) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    manifest = store.verify("tiny@1").manifest
    assert manifest.revision == 9 and manifest.metrics == {f"k{i}": i for i in range(8)}
    assert sorted(h["revision"] for h in manifest.history) == list(range(2, 10))
