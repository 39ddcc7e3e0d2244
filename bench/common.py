"""Helpers shared by the benchmarks: the random GPT-2-small store, timing, and a line describing the machine.

Benchmarks compare against baselines measured in the same run; the machine line says which CPU the
figures came from, because machines of the same kind differ (AVX2-only EPYC vs AMX Xeon).
"""

import functools
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel

from model_store import ModelStore
from model_store.import_hf import import_hf


def median_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median wall time of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{model}, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
        f"{torch.get_num_threads()} threads"
    )


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8")


def cpu_flags() -> str:
    """The CPU's vector and matrix extensions that matter to these kernels, as /proc/cpuinfo names them."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(f for f in SIMD_FLAGS if f in flags) or "none of " + ", ".join(SIMD_FLAGS)


def random_gpt2_small(tmp: Path) -> tuple[ModelStore, GPT2LMHeadModel]:
    """GPT-2-small shape with random weights (seed 0), saved in HF format and imported as `bench` into a
    store under `tmp`. Returns the store and the HF model on the same weights. No download."""
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(attn_pdrop=0, embd_pdrop=0, resid_pdrop=0)).eval()
    hf.save_pretrained(tmp / "hf")
    synthetic_tokenizer(hf.config.vocab_size).save(str(tmp / "hf" / "tokenizer.json"))
    store = ModelStore(tmp / "store")
    import_hf(store, str(tmp / "hf"), "bench")
    return store, hf


EOS = "<|endoftext|>"


@functools.cache  # the store's tokenizer and the GGUF take the same one: built once (~4 s)
def synthetic_vocab(vocab_size: int = 50257, seed: int = 0) -> tuple[list[str], list[tuple[str, str]]]:
    """A GPT-2-sized byte-level BPE vocabulary without a download: the 256 byte symbols, then tokens that
    each extend an earlier one by a letter (a word, or a word after the space symbol, as GPT-2's tokens
    mostly are; up to 8 characters), then `<|endoftext|>` last. Decoding it costs about what decoding GPT-2
    text costs; the benchmarks feed token ids and never encode. Returns (tokens by id, merges)."""
    import random

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord)
    space = chr(0x120)  # the byte-level symbol of " "
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    tokens, merges, seen = list(symbols), [], set(symbols)
    stems = ([space], list(letters))  # most GPT-2 tokens start a word: 60 % here
    rng = random.Random(seed)
    while len(tokens) < vocab_size - 1:
        stem = rng.choice(stems[rng.random() >= 0.6])
        merged = stem + letters[min(int(rng.expovariate(0.15)), 25)]
        if merged in seen:
            continue
        seen.add(merged)
        tokens.append(merged)
        merges.append((stem, merged[-1]))
        if len(merged) < 8:
            stems[merged[0] != space].append(merged)
    tokens.append(EOS)
    return tokens, merges


def synthetic_tokenizer(vocab_size: int = 50257) -> Tokenizer:
    """`synthetic_vocab` as a GPT-2-style byte-level BPE tokenizer (`<|endoftext|>` special)."""
    tokens, merges = synthetic_vocab(vocab_size)
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens[:-1])}, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(EOS, special=True)])
    return tokenizer
