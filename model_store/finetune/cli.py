"""The `finetune` subcommand's arguments and handler. Light to import (no torch) so the store's other
commands stay fast; the training modules are imported when the command runs.

Training options default to "not given" (argparse.SUPPRESS): a fresh run fills them from `TrainConfig`'s
defaults, and `--resume` refuses any given option that differs from the run's saved config.
"""

import argparse
from pathlib import Path

from ..errors import StoreError
from ..manifest import STORED_DTYPES
from ..refs import validate_alias, validate_name
from ..registry import ModelStore
from .config import BF16_MODES, RunOptions, TrainConfig

_EPILOG = """examples:
  python -m model_store finetune gpt2@prod --data notes.txt --steps 200 --run-dir runs/notes --name notes
  python -m model_store finetune --from-scratch --tokenizer tok/ --n-layer 4 --n-head 4 --n-embd 256 \\
      --data train.jsonl --eval-file heldout.jsonl --epochs 1 --run-dir runs/small --name small
  python -m model_store finetune --resume --run-dir runs/notes       # after a crash or kill -9
  torchrun --standalone --nproc_per_node 2 -m model_store finetune ...  # DDP
"""


def add_parser(commands) -> None:
    cmd = commands.add_parser(
        "finetune",
        help="fine-tune a version (or train from scratch) and publish the result",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    opt = _train_option(cmd)
    opt("base", nargs="?", metavar="NAME@REF", help="store version to start from")
    opt("--data", nargs="+", metavar="FILE", help="training files: text (one document each) or JSONL with 'text'")
    opt("--from-scratch", action="store_true", help="a fresh GPT-2 instead of a base version")
    for key, default in (("n-layer", 12), ("n-head", 12), ("n-embd", 768), ("n-positions", 1024)):
        opt(f"--{key}", type=int, help=f"with --from-scratch (default {default})")
    opt("--tokenizer", metavar="DIR|NAME@REF", help="with --from-scratch: tokenizer directory or store version")
    opt("--eval-file", nargs="+", metavar="FILE", help="held-out files (default: --eval-fraction of the data)")
    opt("--eval-fraction", type=float, help="held-out fraction of the training blocks (default 0.05)")
    opt("--block-size", type=int, help="tokens per training sequence (default min(1024, n_positions))")
    opt("--batch-size", type=int, help="sequences per micro-batch per process (default 8)")
    opt("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    opt("--steps", type=int, help="optimizer steps")
    opt("--epochs", type=float, help="passes over the training blocks, instead of --steps")
    opt("--lr", type=float, help="peak learning rate (default 6e-4 scratch, 2e-4 LoRA, 5e-5 fine-tuning)")
    opt("--min-lr-ratio", type=float, help="cosine decays to lr times this (default 0.1)")
    opt("--warmup-steps", type=int, help="linear warmup steps (default 5%% of steps)")
    opt("--weight-decay", type=float, help="AdamW weight decay on matrices (default 0.01)")
    opt("--max-grad-norm", type=float, help="gradient clipping norm (default 1.0)")
    opt("--dropout", type=float, help="dropout rate while training (default 0)")
    opt("--bf16", choices=BF16_MODES, help="bf16 autocast; auto: where the hardware has bf16 matrix units")
    opt("--seed", type=int, help="seed of init, data order, noise and dropout (default 0)")
    opt("--checkpoint-every", type=int, help="steps between checkpoints (default 100)")
    opt("--eval-every", type=int, help="steps between held-out evaluations (default 100)")
    opt("--eval-max-blocks", type=int, help="evaluate on at most this many held-out blocks (default all)")
    opt("--patience", type=int, help="stop after this many evaluations without improvement")
    opt("--negatives", type=int, help="unlikelihood: noise tokens per position (default 0: off)")
    opt("--negative-weight", type=float, help="unlikelihood weight lambda (default 1.0)")
    opt("--lora-r", type=int, help="LoRA rank (default 0: full fine-tuning); needs peft")
    opt("--lora-alpha", type=float, help="LoRA alpha (default 2 * r)")
    opt("--lora-dropout", type=float, help="LoRA dropout (default 0)")

    cmd.add_argument("--run-dir", type=Path, required=True, help="checkpoints, config and log of this run")
    cmd.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    cmd.add_argument("--name", help="store name of the result (default: the base's name)")
    cmd.add_argument("--alias", help="also point this alias at the new version")
    cmd.add_argument("--dtype", choices=STORED_DTYPES, help="stored dtype (default: the base's; float32 scratch)")
    cmd.add_argument("--data-license", default="unknown", help="license of the data, for the model card")
    cmd.add_argument("--sample-prompt", help="prompt of the card's greedy sample (default: held-out text)")
    cmd.add_argument("--device", default="cpu", help="cpu, cuda (default cpu)")
    cmd.add_argument("--no-export", dest="export", action="store_false", help="train only; publish nothing")
    cmd.add_argument(
        "--export-adapter",
        action="store_true",
        help="with --lora-r: publish the adapter alone, as a version that names its base (default name: BASE-lora)",
    )
    cmd.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    cmd.set_defaults(handler=run)


def _train_option(cmd: argparse.ArgumentParser):
    def add(*flags, **kwargs):
        cmd.add_argument(*flags, default=argparse.SUPPRESS, **kwargs)

    return add


def run(store: ModelStore, args: argparse.Namespace) -> int:
    if args.name is not None:
        validate_name(args.name)
    if args.alias is not None:
        validate_alias(args.alias)
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    options = RunOptions(
        run_dir=args.run_dir,
        resume=args.resume,
        name=args.name,
        alias=args.alias,
        dtype=args.dtype,
        data_license=args.data_license,
        sample_prompt=args.sample_prompt,
        export=args.export,
        export_adapter=args.export_adapter,
        progress=args.progress,
        device=args.device,
        overrides=given,
    )
    if "steps" in given and "epochs" in given:
        raise StoreError("give --steps or --epochs, not both")
    if args.export_adapter and not args.resume and not given.get("lora_r"):
        raise StoreError("--export-adapter needs a LoRA run (--lora-r)")
    config = None if args.resume else TrainConfig.from_dict(given)
    from .train import finetune  # pulls in torch

    result = finetune(store, config, options)
    if result.exported is not None:
        print(result.exported.ref)
    return 0
