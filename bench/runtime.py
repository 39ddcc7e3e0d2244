"""Benchmark the GPT-2 runtime against HF transformers on the same weights, in the same run.

    .venv/bin/python bench/runtime.py [--quick]

GPT-2-small shape with random weights (no download), imported into a temporary store. Measures prefill of
one 512-token prompt, and greedy decoding of 128 tokens after a 32-token prompt at batch 1 (our KV-cached
forward vs HF `generate`), in float32 and bfloat16. Prints medians of 3 timed runs after a warm-up, and
the ratio to HF. Not part of the test suite; no timing is asserted anywhere.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

from service.model import GPT2, BatchLayout, KVCache, load_model

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, median_time, random_gpt2_small  # noqa: E402


def our_prefill(model: GPT2, ids: torch.Tensor) -> None:
    layout = BatchLayout.prefill([len(ids)])
    model.compute_logits(model(ids, layout.positions(), layout)[-1:])


def our_greedy(model: GPT2, ids: torch.Tensor, new_tokens: int, dtype: torch.dtype) -> None:
    cache = KVCache(model.cfg, 1, len(ids) + new_tokens, device="cpu", dtype=dtype)
    layout = BatchLayout.prefill([len(ids)])
    token = model.compute_logits(model(ids, layout.positions(), layout, cache)[-1:]).argmax(-1)
    for step in range(new_tokens - 1):
        layout = BatchLayout((1,), (len(ids) + step,), ((0,),))
        token = model.compute_logits(model(token, layout.positions(), layout, cache)).argmax(-1)


def hf_greedy(model: GPT2LMHeadModel, ids: torch.Tensor, new_tokens: int) -> None:
    model.generate(ids[None], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (32 new tokens)")
    args = parser.parse_args()
    new_tokens = 32 if args.quick else 128
    print(machine())

    with tempfile.TemporaryDirectory() as tmp:
        store, hf = random_gpt2_small(Path(tmp))
        ours = {dt: load_model(store, "bench", dtype=dt).model for dt in ("float32", "bfloat16")}
        hf_bf16 = GPT2LMHeadModel.from_pretrained(Path(tmp) / "hf", dtype=torch.bfloat16).eval()

        long_prompt = torch.randint(0, 50257, (512,))
        short_prompt = torch.randint(0, 50257, (32,))
        rows = []
        for dt, hf_model in (("float32", hf), ("bfloat16", hf_bf16)):  # each lambda runs at once (no B023 bug)
            torch_dtype = getattr(torch, dt)
            t_ours = median_time(lambda: our_prefill(ours[dt], long_prompt))  # noqa: B023
            t_hf = median_time(lambda: hf_model(long_prompt[None]))  # noqa: B023
            rows.append((f"prefill 512 tokens, {dt}", "tokens/s", 512 / t_ours, 512 / t_hf))
            t_ours = median_time(lambda: our_greedy(ours[dt], short_prompt, new_tokens, torch_dtype))  # noqa: B023
            t_hf = median_time(lambda: hf_greedy(hf_model, short_prompt, new_tokens))  # noqa: B023
            rows.append((f"greedy batch 1, 32+{new_tokens}, {dt}", "tokens/s", new_tokens / t_ours, new_tokens / t_hf))

    print(f"\n{'measure':<36} {'unit':<9} {'ours':>9} {'HF':>9} {'ours/HF':>8}")
    for name, unit, a, b in rows:
        print(f"{name:<36} {unit:<9} {a:>9.1f} {b:>9.1f} {a / b:>7.2f}x")


if __name__ == "__main__":
    main()
