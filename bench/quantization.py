"""What QUANTIZATION=int8 costs in quality, on the bundled default model (real trained weights) and its own
held-out text (the split the model never saw in training, rebuilt from the pinned Debian packages):

    .venv/bin/python bench/quantization.py [--model default@prod] [--corpus build/corpus] [--json PATH]

- held-out perplexity and bits per byte, float32 against int8 (windows of the full context, stride half
  of it; each scored token once, as `model_store evaluate` scores);
- KL(float32 || int8) per token, mean and 99th percentile, over the same scored positions;
- greedy agreement: 64 prompts (32 tokens cut from the held-out text at even intervals) x 64 generated
  tokens (ignore_eos) through the engine, float32 against int8: the share of positions with the same
  token, the share of sequences identical throughout, and the mean number of tokens before they differ.

Deterministic (no sampling); the figures are in docs/engine.md. Not part of the test suite.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from model_store import ModelStore
from model_store.default_model.corpus import prepare_corpus
from model_store.windows import rolling_windows
from service.engine import Engine, EngineConfig, EngineRequest, SamplingParams, SchedulerConfig
from service.model import BatchLayout, load_model

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS, PROMPT_LEN, NEW_TOKENS = 64, 32, 64


def heldout_text(corpus: Path) -> str:
    if not (corpus / "heldout.txt").exists():
        print(f"preparing the held-out split in {corpus} (apt-get download of the pinned packages)", flush=True)
        prepare_corpus(corpus, corpus.parent / "debs")
    return (corpus / "heldout.txt").read_text(encoding="utf-8")


@torch.inference_mode()
def window_logprobs(model, ids: torch.Tensor, quantization: str) -> torch.Tensor:
    """Float64 log-softmax (n, V) of the logits that predict ids[1:] ... for one window."""
    model.prepare_kernels(quantization=quantization)
    layout = BatchLayout.prefill([len(ids)])
    return model.compute_logits(model(ids, layout.positions(), layout)).double().log_softmax(-1)


def scoring(model, token_ids: list[int]) -> dict:
    context = model.cfg.n_positions
    ids = torch.tensor(token_ids)
    nll = {"none": 0.0, "int8": 0.0}
    kls, count = [], 0
    for w in rolling_windows(len(token_ids), context, context // 2):
        window = ids[w.start : w.end]
        first = max(w.score_from, 1)
        targets = window[first:]
        exact = window_logprobs(model, window, "none")[first - 1 : -1]  # (n, V)
        int8 = window_logprobs(model, window, "int8")[first - 1 : -1]
        for name, lp in (("none", exact), ("int8", int8)):
            nll[name] -= lp.gather(1, targets[:, None]).sum().item()
        kls.append((exact.exp() * (exact - int8)).sum(-1))  # KL(fp32 || int8) per position
        count += len(targets)
    model.prepare_kernels()
    kl = torch.cat(kls)
    return {
        "scored_tokens": count,
        "perplexity_float32": math.exp(nll["none"] / count),
        "perplexity_int8": math.exp(nll["int8"] / count),
        "nll_float32": nll["none"],
        "nll_int8": nll["int8"],
        "kl_mean": kl.mean().item(),
        "kl_p99": kl.quantile(0.99).item(),
        "kl_max": kl.max().item(),
    }


def greedy(store, ref: str, prompts: list[list[int]], quantization: str) -> list[list[int]]:
    loaded = load_model(store, ref, dtype="float32")
    engine = Engine(loaded, EngineConfig(SchedulerConfig(max_num_seqs=64), quantization=quantization))
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add(EngineRequest(f"p{i}", prompt, params))
    out: dict[str, list[int]] = {}
    while engine.has_work:
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
    return [out[f"p{i}"] for i in range(len(prompts))]


def agreement(exact: list[list[int]], int8: list[list[int]]) -> dict:
    same = sum(a == b for x, y in zip(exact, int8) for a, b in zip(x, y))
    prefixes = []
    for x, y in zip(exact, int8):
        n = next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
        prefixes.append(n)
    return {
        "positions_same": same / sum(len(x) for x in exact),
        "sequences_identical": sum(x == y for x, y in zip(exact, int8)) / len(exact),
        "mean_tokens_before_first_difference": sum(prefixes) / len(prefixes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default@prod")
    parser.add_argument("--store", default=str(ROOT / "models"))
    parser.add_argument("--corpus", type=Path, default=ROOT / "build" / "corpus")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    print(machine(), flush=True)
    store = ModelStore(args.store)
    loaded = load_model(store, args.model, dtype="float32")
    text = heldout_text(args.corpus)
    eos = loaded.manifest.tokenizer.eos_token_id
    token_ids = ([eos] if eos is not None else []) + loaded.tokenizer.encode(text).ids
    result = {"machine": machine(), "model": args.model, "heldout_bytes": len(text.encode())}
    result.update(scoring(loaded.model, token_ids))
    result["bits_per_byte_float32"] = result["nll_float32"] / math.log(2) / result["heldout_bytes"]
    result["bits_per_byte_int8"] = result["nll_int8"] / math.log(2) / result["heldout_bytes"]
    step = (len(token_ids) - PROMPT_LEN) // PROMPTS
    prompts = [token_ids[i * step : i * step + PROMPT_LEN] for i in range(PROMPTS)]
    result.update(agreement(greedy(store, args.model, prompts, "none"), greedy(store, args.model, prompts, "int8")))
    for key, value in result.items():
        print(f"  {key}: {value:.6g}" if isinstance(value, float) else f"  {key}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
