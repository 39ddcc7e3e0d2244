"""llama.cpp as a baseline beside the engine benchmark (bench/engine.py --llama-cpp DIR).

    .venv/bin/python bench/llama_cpp.py build [--dir build/llama-cpp]   # once per machine: ~20 min on 2 cores

`build` compiles llama-bench, llama-batched-bench, llama-quantize and llama-server (CPU backend,
-march=native) from the llama.cpp source that PyPI's `llama-cpp-python` source distribution vendors, so
nothing but the package registry is needed; it prints the directory of the binaries. The benchmarks then
write the model they measure as GGUF with the vendored `gguf-py` (f32, `write_gguf`); bench/engine.py
quantizes a copy to q8_0 with llama-quantize and times both with `llama-bench` (batch 1) and
`llama-batched-bench` (many parallel sequences); bench/http_load.py serves the f32 one with `llama-server`
(`serve_command`). Not a project dependency: nothing here is imported by the service.
"""

import argparse
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import synthetic_vocab  # noqa: E402

VERSION = "0.3.36"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = REPO / "build" / "llama-cpp"
TARGETS = ("llama-bench", "llama-batched-bench", "llama-quantize")  # what bench/engine.py needs
SERVER = "llama-server"  # what bench/http_load.py needs


def source_dir(root: Path) -> Path:
    return root / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"


def build(root: Path) -> Path:
    """Download (once) and build; returns the directory holding the binaries."""
    root.mkdir(parents=True, exist_ok=True)
    src = source_dir(root)
    if not src.is_dir():
        archive = root / f"llama_cpp_python-{VERSION}.tar.gz"
        if not archive.is_file():
            pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
            subprocess.run([*pip, f"llama-cpp-python=={VERSION}", "-d", str(root)], check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
    out = src / "build"
    configure = ["cmake", "-S", str(src), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON"]
    configure += ["-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"]
    configure += ["-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON"]
    subprocess.run(configure, check=True, stdout=subprocess.DEVNULL)
    jobs = str(len(os.sched_getaffinity(0)))
    subprocess.run(["cmake", "--build", str(out), "-j", jobs, "--target", *TARGETS, SERVER], check=True)
    return out / "bin"


def find_binaries(path: Path) -> Path:
    """The binaries' directory, given it or the root `build` used."""
    for candidate in (path, source_dir(path) / "build" / "bin"):
        if all((candidate / t).is_file() for t in TARGETS):
            return candidate
    raise FileNotFoundError(f"no llama.cpp binaries ({', '.join(TARGETS)}) under {path}: run bench/llama_cpp.py build")


def server_binary(path: Path) -> Path:
    """llama-server, given the binaries' directory or the root `build` used."""
    server = find_binaries(path) / SERVER
    if not server.is_file():
        raise FileNotFoundError(f"no {SERVER} in {server.parent}: run bench/llama_cpp.py build again")
    return server


def serve_command(path: Path, model: Path, host: str, port: int, parallel: int, ctx_per_slot: int, threads: int):
    """llama-server on `model` with `parallel` slots of `ctx_per_slot` tokens each, continuous batching."""
    cmd = [str(server_binary(path)), "-m", str(model), "--host", host, "--port", str(port)]
    cmd += ["-np", str(parallel), "-c", str(parallel * ctx_per_slot), "--cont-batching", "-t", str(threads)]
    cmd += ["-tb", str(threads), "-b", "2048", "-ub", "512", "--no-webui"]
    return cmd


def _gguf_module(bin_dir: Path):
    """The gguf-py package vendored beside the binaries' source tree."""
    for parent in bin_dir.resolve().parents:
        if (parent / "gguf-py" / "gguf").is_dir():
            sys.path.insert(0, str(parent / "gguf-py"))
            import gguf

            return gguf
    raise FileNotFoundError(f"no gguf-py beside {bin_dir}")


def write_gguf(hf_model, out: Path, bin_dir: Path) -> Path:
    """An HF GPT2LMHeadModel as an f32 GGUF that llama.cpp runs, with the benchmarks' synthetic byte-level
    vocabulary (bench/common.py), so that llama-server decodes the same text as our service."""
    gguf = _gguf_module(bin_dir)
    cfg = hf_model.config
    writer = gguf.GGUFWriter(str(out), "gpt2")
    writer.add_context_length(cfg.n_positions)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    tokens, merges = synthetic_vocab(cfg.vocab_size)  # the vocabulary the benchmarks' store has
    writer.add_token_list(tokens)
    kinds = [gguf.TokenType.NORMAL] * (cfg.vocab_size - 1) + [gguf.TokenType.CONTROL]  # <|endoftext|> last
    writer.add_token_types(kinds)
    writer.add_token_merges([f"{a} {b}" for a, b in merges])
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    for name, tensor in _gguf_tensors(hf_model):
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _gguf_tensors(hf_model):
    """(GGUF name, float32 array) in llama.cpp's GPT-2 layout. HF's Conv1D weights are (in, out); GGUF wants
    (out, in), as nn.Linear stores them."""
    state = {k: v.detach().float().numpy() for k, v in hf_model.transformer.state_dict().items()}
    yield "token_embd.weight", state["wte.weight"]
    yield "position_embd.weight", state["wpe.weight"]
    for i in range(hf_model.config.n_layer):
        h = f"h.{i}."
        blk = f"blk.{i}."
        pairs = {
            "attn_norm": "ln_1",
            "attn_qkv": "attn.c_attn",
            "attn_output": "attn.c_proj",
            "ffn_norm": "ln_2",
            "ffn_up": "mlp.c_fc",
            "ffn_down": "mlp.c_proj",
        }
        for ours, theirs in pairs.items():
            weight = state[h + theirs + ".weight"]
            yield blk + ours + ".weight", np.ascontiguousarray(weight.T if weight.ndim == 2 else weight)
            yield blk + ours + ".bias", state[h + theirs + ".bias"]
    yield "output_norm.weight", state["ln_f.weight"]
    yield "output_norm.bias", state["ln_f.bias"]
    yield "output.weight", state["wte.weight"]  # tied


def quantize(bin_dir: Path, f32: Path, out: Path, kind: str = "q8_0") -> Path:
    subprocess.run([str(bin_dir / "llama-quantize"), str(f32), str(out), kind], check=True, capture_output=True)
    return out


def _run(cmd: list[str], no_repack: list[str]) -> tuple[str, bool]:
    """Run a llama.cpp benchmark; if it crashes, once more without weight repacking (its AMX/AVX-512 repacked
    q8_0 kernels crash on some machines). Returns the output and whether repacking was on."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode == 0:
        return done.stdout, True
    return subprocess.run(cmd + no_repack, check=True, capture_output=True, text=True).stdout, False


def batch1_ms_per_token(bin_dir: Path, model: Path, prompt: int, new_tokens: int, threads: int) -> tuple[float, bool]:
    """`llama-bench -p PROMPT -n NEW`: the generation test's time per token (ms), its own mean of 5 runs, and
    whether weight repacking was on."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(model), "-p", str(prompt), "-n", str(new_tokens)]
    cmd += ["-t", str(threads), "-o", "json"]
    out, repacked = _run(cmd, ["--repack", "0"])
    generation = next(r for r in json.loads(out) if r["n_gen"] == new_tokens and r["n_prompt"] == 0)
    return 1000.0 / generation["avg_ts"], repacked


def batched_tok_s(
    bin_dir: Path, model: Path, prompt: int, new_tokens: int, parallel: int, threads: int
) -> tuple[float, bool]:
    """`llama-batched-bench`, `parallel` sequences of `prompt` + `new_tokens`: generated tokens per second of
    the whole run, prefill included (as bench/engine.py counts ours), and whether repacking was on."""
    ctx = parallel * (prompt + new_tokens) + 64
    cmd = [str(bin_dir / "llama-batched-bench"), "-m", str(model), "-c", str(ctx), "-b", "2048", "-ub", "512"]
    cmd += ["-npp", str(prompt), "-ntg", str(new_tokens), "-npl", str(parallel), "-t", str(threads)]
    cmd += ["--output-format", "jsonl"]
    out, repacked = _run(cmd, ["--no-repack"])
    row = next(json.loads(line) for line in out.splitlines() if line.startswith("{"))
    return parallel * new_tokens / row["t"], repacked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download llama-cpp-python's source and build the benchmark binaries")
    b.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args()
    if args.command == "build":
        print(build(args.dir))


if __name__ == "__main__":
    main()
