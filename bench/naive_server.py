"""The server a user writes without a serving stack, as a baseline for bench/http_load.py: FastAPI and one
HF `generate` at a time under a lock (batch 1, greedy, exactly `max_new_tokens` new tokens).

    python bench/naive_server.py --model HF_DIR [--host 127.0.0.1] [--port 8765] [--threads 2]

`GET /health` answers once the model is loaded; `POST /generate {"input_ids": [...], "max_new_tokens": N}`
answers `{"output_ids": [...], "n_new": N, "gen_s": seconds}`. Needs only torch, transformers, fastapi and
uvicorn, so it runs in the project's venv or in a baseline venv alike.
"""

import argparse
import threading
import time

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import GPT2LMHeadModel


class GenerateRequest(BaseModel):
    input_ids: list[int]
    max_new_tokens: int = 64


def build_app(model_dir: str, threads: int) -> FastAPI:
    torch.set_num_threads(threads)
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    pad = model.config.eos_token_id if model.config.eos_token_id is not None else 0
    lock = threading.Lock()  # one generate at a time: what a plain endpoint around `generate` does
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"ok": True, "torch_threads": torch.get_num_threads()}

    @app.post("/generate")
    def generate(req: GenerateRequest) -> dict:  # a plain def: FastAPI runs it in its thread pool
        ids = torch.tensor([req.input_ids])
        n = req.max_new_tokens
        with lock, torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=pad,
            )
            seconds = time.perf_counter() - start
        new = out[0, ids.shape[1] :].tolist()
        return {"output_ids": new, "n_new": len(new), "gen_s": seconds}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an HF GPT-2 directory (save_pretrained)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    uvicorn.run(build_app(args.model, args.threads), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
