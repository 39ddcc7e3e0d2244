"""What serving LoRA adapters costs: the engine called directly with 64 concurrent requests on the base alone,
against the same load spread over 8 adapters (each request names one, so every step mixes them), in one run.

    .venv/bin/python bench/adapters.py [--rounds 2] [--rank 8] [--adapters 8]

GPT-2-small shape, random weights, adapters of random weights on every projection (attn.qkv, attn.proj,
mlp.fc, mlp.proj); 32-token prompts, 128 generated tokens (forced), greedy; closed loop: a finished request
is replaced at the next step. Rounds alternate the two loads. Goal: the mixed load at >= 0.8x the base's
generated tokens per second.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).resolve().parent.parent)]  # bench/, the repo
from common import machine, random_gpt2_small  # noqa: E402

from model_store.adapters import publish_adapter, read_adapter  # noqa: E402
from model_store.manifest import ADAPTER_TARGETS, AdapterInfo, Lineage  # noqa: E402
from service.engine import Engine, EngineConfig, EngineRequest, SamplingParams, SchedulerConfig  # noqa: E402
from service.model import KVCache, load_model  # noqa: E402
from service.model.lora import Adapter  # noqa: E402

PROMPT, NEW, CLIENTS = 32, 128, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2 * CLIENTS, help="requests per load (default 128)")
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        store, _ = random_gpt2_small(Path(tmp))
        loaded = load_model(store, "bench", dtype="float32")
        base = store.verify("bench")
        info = AdapterInfo(base.ref, "", args.rank, 2.0 * args.rank, ADAPTER_TARGETS)
        shapes = info.tensor_shapes(base.manifest.config)
        adapters = []
        for i in range(args.adapters):
            gen = torch.Generator().manual_seed(i)
            tensors = {k: 0.02 * torch.randn(s, generator=gen) for k, s in shapes.items()}
            lineage = Lineage(source="local-directory", parent=base.ref)
            stored = publish_adapter(store, f"a{i}", base, tensors, alpha=info.alpha, lineage=lineage, dtype="float32")
            adapter_info = stored.manifest.adapter
            adapters.append(
                Adapter.from_tensors(stored.ref, adapter_info, read_adapter(stored), loaded.dtype, loaded.device)
            )
        kv_bytes = int(CLIENTS * (PROMPT + NEW) * 1.25) * KVCache.bytes_per_token(loaded.model.cfg, loaded.dtype) + (
            1 << 26
        )
        scheduler = SchedulerConfig(max_num_seqs=CLIENTS, max_num_batched_tokens=2048, max_model_len=1024)
        engine = Engine(loaded, EngineConfig(scheduler, kv_bytes, seed=0))
        for adapter in adapters:
            engine.add_adapter(adapter)
        print(f"engine kernels: {engine.kernels}; {args.adapters} adapters of rank {args.rank}")
        gen = torch.Generator().manual_seed(7)
        prompts = torch.randint(0, 50256, (args.requests, PROMPT), generator=gen).tolist()
        names = [a.ref for a in adapters]
        run(engine, prompts[:CLIENTS], [None] * CLIENTS)  # warm-up
        results = {"base": [], "mixed": []}
        for r in range(args.rounds):
            for load in ("base", "mixed") if r % 2 == 0 else ("mixed", "base"):
                refs = [None] * len(prompts) if load == "base" else [names[i % len(names)] for i in range(len(prompts))]
                tok_s = run(engine, prompts, refs)
                results[load].append(tok_s)
                print(f"round {r + 1}: {load:5s} {tok_s:7.1f} generated tok/s", flush=True)
        base_tok, mixed_tok = statistics.median(results["base"]), statistics.median(results["mixed"])
        print(f"\nmedians over {args.rounds} rounds, {CLIENTS} concurrent, {args.requests} requests per load")
        print(f"base alone           {base_tok:7.1f} tok/s")
        print(f"over {args.adapters} adapters (r={args.rank}) {mixed_tok:7.1f} tok/s")
        ratio = mixed_tok / base_tok
        print(f"ratio {ratio:.2f} (goal >= 0.8: {'met' if ratio >= 0.8 else 'NOT met'}) ({machine()})")


def run(engine: Engine, prompts: list[list[int]], refs: list[str | None]) -> float:
    """The closed loop: CLIENTS requests in flight; generated tokens per second."""
    params = SamplingParams(temperature=0.0, max_tokens=NEW, min_tokens=NEW, ignore_eos=True)
    todo = list(range(len(prompts)))[::-1]
    generated = 0

    def add() -> None:
        i = todo.pop()
        engine.add(EngineRequest(f"r{i}-{time.monotonic_ns()}", prompts[i], params, adapter=refs[i]))

    start = time.perf_counter()
    for _ in range(min(CLIENTS, len(todo))):
        add()
    while engine.has_work:
        for out in engine.step():
            generated += len(out.token_ids)
            if out.finished and todo:
                add()
    return generated / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
