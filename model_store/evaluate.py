"""Offline evaluation of a store version: perplexity and bits per byte on a text, completion EM / F1.

Perplexity follows HF's "perplexity of fixed-length models": windows of the model's context start every
`stride` tokens (`windows.rolling_windows`), and each token is scored once, in the first window that
covers it with context, so past the first window every token sees at least `context - stride` tokens.
The text is preceded by the tokenizer's BOS (GPT-2: `<|endoftext|>`) when it has one, so its first token
is scored too and bits per byte covers the whole text. Completion quality is greedy decoding, cut at the
first stop string, compared with the reference after SQuAD's answer normalisation.

Runs HF `GPT2LMHeadModel` in float32 under `torch.no_grad`. Owns the metrics; the store owns recording them
(`ModelStore.record_metrics`), the CLI owns printing them.
"""

import json
import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import StoreError
from .manifest import sha256_file
from .windows import rolling_windows

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


@dataclass(frozen=True)
class TokenNLL:
    nll: float  # summed negative log-likelihood of the scored tokens, in nats
    num_scored: int


# --- perplexity -------------------------------------------------------------------------------------


@torch.no_grad()
def token_nll(model, token_ids: list[int], context: int, stride: int, batch_size: int = 8) -> TokenNLL:
    """Sum of -log p(token | its window's preceding tokens) over every token a window scores.

    Windows of equal length are batched; the LM head runs only on the positions that are scored.
    """
    if len(token_ids) < 2:
        raise StoreError("the text is too short to score: it needs at least 2 tokens")
    if not 0 < stride <= context:
        raise StoreError(f"stride must be between 1 and the context length {context}, got {stride}")
    device = next(model.parameters()).device
    ids = torch.tensor(token_ids, device=device)
    windows = rolling_windows(len(token_ids), context, stride)
    by_length: dict[int, list] = {}
    for w in windows:
        by_length.setdefault(w.end - w.start, []).append(w)
    total, count = 0.0, 0
    for length, group in by_length.items():
        for i in range(0, len(group), batch_size):
            batch = group[i : i + batch_size]
            inputs = torch.stack([ids[w.start : w.end] for w in batch])  # (B, T)
            hidden = model.transformer(input_ids=inputs, use_cache=False).last_hidden_state  # (B, T, n_embd)
            for row, w in enumerate(batch):
                first = max(w.score_from, 1)  # 0 only when stride == context: no context, not scored
                logits = model.lm_head(hidden[row, first - 1 : length - 1]).float()  # (n, V)
                targets = ids[w.start + first : w.end]
                total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
                count += len(targets)
    return TokenNLL(total, count)


def perplexity(
    model, tokenizer, text: str, *, stride: int | None = None, batch_size: int = 8, bos_token_id: int | None = None
) -> dict[str, Any]:
    """Perplexity (per scored token) and bits per byte (whole NLL over the text's UTF-8 bytes)."""
    context = model.config.n_positions
    stride = stride or max(1, context // 2)
    token_ids = tokenizer.encode(text).ids
    if bos_token_id is not None:
        token_ids = [bos_token_id, *token_ids]
    result = token_nll(model, token_ids, context, stride, batch_size)
    num_bytes = len(text.encode("utf-8"))
    return {
        "perplexity": math.exp(result.nll / result.num_scored),
        "bits_per_byte": bits_per_byte(result.nll, num_bytes),
        "nll_nats": result.nll,
        "num_tokens": len(token_ids) - (bos_token_id is not None),
        "num_scored": result.num_scored,
        "num_bytes": num_bytes,
        "context": context,
        "stride": stride,
    }


def bits_per_byte(nll_nats: float, num_bytes: int) -> float:
    return nll_nats / math.log(2) / num_bytes


# --- completion quality ----------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, drop punctuation, drop articles, collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 on normalised words; when either side is empty, 1 only if both are."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def greedy_completion(model, tokenizer, prompt: str, max_new_tokens: int, eos_token_id: int | None) -> str:
    """Greedy continuation of `prompt` (keeping its last tokens if it would overflow the context)."""
    keep = model.config.n_positions - max_new_tokens
    if keep < 1:
        raise StoreError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the context")
    prompt_ids = tokenizer.encode(prompt).ids[-keep:] or ([eos_token_id] if eos_token_id is not None else [])
    if not prompt_ids:
        raise StoreError("an empty prompt needs a tokenizer with an end-of-text token to start from")
    device = next(model.parameters()).device
    inputs = torch.tensor([prompt_ids], device=device)
    output = model.generate(
        inputs,
        attention_mask=torch.ones_like(inputs),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id if eos_token_id is not None else 0,
    )
    new = [t for t in output[0, len(prompt_ids) :].tolist() if t != eos_token_id]
    return tokenizer.decode(new)


def completion_quality(
    model,
    tokenizer,
    examples: list[dict[str, Any]],
    *,
    max_new_tokens: int = 32,
    stop: tuple[str, ...] = ("\n",),
    eos_token_id: int | None = None,
) -> dict[str, Any]:
    """Mean exact match and token F1 (as fractions) of greedy completions; a list of references scores its best."""
    em = f1 = 0.0
    for example in examples:
        prediction = cut_at_stop(
            greedy_completion(model, tokenizer, example["prompt"], max_new_tokens, eos_token_id), stop
        )
        references = example["reference"] if isinstance(example["reference"], list) else [example["reference"]]
        em += max(exact_match(prediction, r) for r in references)
        f1 += max(token_f1(prediction, r) for r in references)
    n = len(examples)
    return {"exact_match": em / n, "f1": f1 / n, "num_examples": n, "max_new_tokens": max_new_tokens}


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def read_qa(path: Path) -> list[dict[str, Any]]:
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
        except json.JSONDecodeError as exc:
            raise StoreError(f"{path}:{number}: not JSON ({exc})") from None
        reference = example.get("reference") if isinstance(example, dict) else None
        valid_reference = isinstance(reference, str) or (
            isinstance(reference, list) and reference and all(isinstance(r, str) for r in reference)
        )
        if not isinstance(example.get("prompt") if isinstance(example, dict) else None, str) or not valid_reference:
            raise StoreError(f'{path}:{number}: expected {{"prompt": str, "reference": str or [str, ...]}}')
        examples.append(example)
    if not examples:
        raise StoreError(f"{path} has no examples")
    return examples


# --- one evaluation run ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalConfig:
    text: Path | None = None
    qa: Path | None = None
    stride: int | None = None
    batch_size: int = 8
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ("\n",)
    device: str = "cpu"

    def __post_init__(self) -> None:
        for key in ("stride", "batch_size", "max_new_tokens"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise StoreError(f"{key.replace('_', '-')} must be a positive integer, got {value}")


def evaluate(store, ref: str, config: EvalConfig) -> tuple[Any, dict[str, Any]]:
    """Verify and load `ref`, run the evaluations `config` asks for; returns (StoredVersion, results)."""
    from tokenizers import Tokenizer

    from .hf_format import load_hf_model

    if config.text is None and config.qa is None:
        raise StoreError("nothing to evaluate: pass --text FILE and/or --qa FILE")
    for path in (config.text, config.qa):
        if path is not None and not path.is_file():
            raise StoreError(f"no such file: {path}")
    stored = store.verify(ref)
    model = load_hf_model(stored, device=config.device)
    tokenizer = Tokenizer.from_file(str(stored.path / stored.manifest.tokenizer.file))
    info = stored.manifest.tokenizer
    results: dict[str, Any] = {}
    if config.text is not None:
        text = config.text.read_text(encoding="utf-8")
        bos = info.bos_token_id if info.bos_token_id is not None else info.eos_token_id
        scores = perplexity(
            model, tokenizer, text, stride=config.stride, batch_size=config.batch_size, bos_token_id=bos
        )
        results["text"] = {"file": config.text.name, "sha256": sha256_file(config.text), **scores}
    if config.qa is not None:
        quality = completion_quality(
            model,
            tokenizer,
            read_qa(config.qa),
            max_new_tokens=config.max_new_tokens,
            stop=config.stop,
            eos_token_id=info.eos_token_id,
        )
        results["qa"] = {"file": config.qa.name, "sha256": sha256_file(config.qa), **quality}
    return stored, results


def format_table(ref: str, results: dict[str, Any]) -> str:
    rows = [("METRIC", "VALUE")]
    if "text" in results:
        t = results["text"]
        rows += [
            (f"perplexity ({t['file']})", f"{t['perplexity']:.4f}"),
            ("bits per byte", f"{t['bits_per_byte']:.4f}"),
            ("tokens scored / bytes", f"{t['num_scored']} / {t['num_bytes']}"),
            ("context / stride", f"{t['context']} / {t['stride']}"),
        ]
    if "qa" in results:
        q = results["qa"]
        rows += [
            (f"exact match ({q['file']})", f"{100 * q['exact_match']:.2f}"),
            ("token F1", f"{100 * q['f1']:.2f}"),
            ("examples", str(q["num_examples"])),
        ]
    width = max(len(r[0]) for r in rows)
    return "\n".join([ref] + [f"{name.ljust(width)}  {value}" for name, value in rows])
