"""`python -m model_store`: the store's command line (import-hf, import-adapter, list, show, verify, promote,
eval, finetune).

Errors print as one `error: ...` line on stderr with exit status 1 (2 for usage errors), never a
traceback unless --debug. This is the only place the store reads the environment (MODEL_STORE_ROOT).
"""

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import StoreError
from .finetune.cli import add_parser as add_finetune_parser
from .manifest import STORED_DTYPES
from .refs import validate_alias, validate_name
from .registry import ModelStore, store_root


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    store = ModelStore(store_root(args.root or os.environ.get("MODEL_STORE_ROOT")))
    try:
        return args.handler(store, args)
    except StoreError as exc:
        return _fail(str(exc))
    except OSError as exc:
        if args.debug:
            raise
        return _fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted", status=130)
    except Exception as exc:
        if args.debug:
            raise
        return _fail(f"internal error ({type(exc).__name__}: {exc}); rerun with --debug for a traceback")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model_store", description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="store root (default: $MODEL_STORE_ROOT, else the repo's models/)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on unexpected errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cmd = commands.add_parser("import-hf", help="import a HF GPT-2 directory or hub id as a new version")
    cmd.add_argument("source", help="directory with config.json, weights and tokenizer files; or a hub id")
    cmd.add_argument("--name", required=True, help="model name in the store")
    cmd.add_argument("--alias", help="also point this alias at the new version")
    cmd.add_argument("--dtype", choices=STORED_DTYPES, help="stored dtype (default: as in the source)")
    cmd.set_defaults(handler=_import_hf)

    cmd = commands.add_parser("import-adapter", help="import a peft LoRA adapter directory as an adapter version")
    cmd.add_argument("source", type=Path, help="directory with adapter_config.json and adapter_model.safetensors")
    cmd.add_argument("--name", required=True, help="adapter name in the store")
    cmd.add_argument("--base", required=True, metavar="NAME[@REF]", help="the store version it adapts")
    cmd.add_argument("--alias", help="also point this alias at the new version")
    cmd.set_defaults(handler=_import_adapter)

    cmd = commands.add_parser("list", help="list every version with its aliases")
    cmd.add_argument("--json", action="store_true", help="print JSON instead of a table")
    cmd.set_defaults(handler=_list)

    cmd = commands.add_parser("show", help="print a version's manifest")
    cmd.add_argument("ref", metavar="NAME[@REF]")
    cmd.set_defaults(handler=_show)

    cmd = commands.add_parser("verify", help="check every file's sha256; exit 1 on any mismatch")
    cmd.add_argument("ref", metavar="NAME[@REF]")
    cmd.set_defaults(handler=_verify)

    cmd = commands.add_parser("promote", help="point an alias (prod, staging, ...) at a version")
    cmd.add_argument("ref", metavar="NAME@VERSION")
    cmd.add_argument("alias")
    cmd.set_defaults(handler=_promote)

    cmd = commands.add_parser("eval", help="perplexity / bits per byte on a text, EM / F1 of greedy completions")
    cmd.add_argument("ref", metavar="NAME[@REF]")
    cmd.add_argument("--text", type=Path, help="UTF-8 text file: strided-window perplexity and bits per byte")
    cmd.add_argument("--stride", type=int, help="window stride in tokens (default: half the context)")
    cmd.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    cmd.add_argument("--qa", type=Path, help='JSONL of {"prompt": ..., "reference": ...}: greedy EM and token F1')
    cmd.add_argument("--max-new-tokens", type=int, default=32, help="completion length limit (default 32)")
    cmd.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    cmd.add_argument("--json", action="store_true", help="print JSON instead of a table")
    cmd.add_argument("--record", action="store_true", help="add the results to the manifest as a new revision")
    cmd.add_argument("--label", help="metrics key when recording (default: eval:<file names>)")
    cmd.set_defaults(handler=_eval)

    add_finetune_parser(commands)
    return parser


def _import_hf(store: ModelStore, args: argparse.Namespace) -> int:
    validate_name(args.name)  # before the slow torch import below, so typos fail at once
    if args.alias is not None:
        validate_alias(args.alias)
    from .import_hf import import_hf  # pulls in torch; the other commands stay fast

    stored = import_hf(store, args.source, args.name, alias=args.alias, dtype=args.dtype)
    print(stored.ref)
    return 0


def _import_adapter(store: ModelStore, args: argparse.Namespace) -> int:
    validate_name(args.name)
    if args.alias is not None:
        validate_alias(args.alias)
    from .adapters import import_peft  # pulls in torch

    print(import_peft(store, args.source, args.name, args.base, alias=args.alias).ref)
    return 0


def _list(store: ModelStore, args: argparse.Namespace) -> int:
    rows = []
    for name in store.names():
        by_version: dict[int, list[str]] = {}
        for alias, version in store.aliases(name).items():
            by_version.setdefault(version, []).append(alias)
        versions = store.versions(name)
        for version in versions:
            manifest = store.resolve(f"{name}@{version}").manifest
            labels = sorted(by_version.get(version, [])) + (["latest"] if version == versions[-1] else [])
            rows.append(
                {
                    "ref": manifest.ref,
                    "aliases": labels,
                    "dtype": manifest.dtype,
                    "parameters": _parameters(manifest),
                    "bytes": sum(f.size for f in manifest.files),
                    "created_at": manifest.created_at,
                    "source": manifest.lineage.hub_id or manifest.lineage.parent or manifest.lineage.source_path,
                    "adapter": _adapter(manifest),
                }
            )
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no models in {store.root}")
    else:
        _print_table(rows)
    return 0


def _adapter(manifest) -> dict | None:
    return {"base": manifest.adapter.base, "rank": manifest.adapter.rank} if manifest.adapter else None


def _parameters(manifest) -> int:
    if manifest.adapter is None:
        return manifest.config.num_parameters
    return sum(math.prod(shape) for shape in manifest.adapter.tensor_shapes(manifest.config).values())


def _print_table(rows: list[dict]) -> None:
    header = ("REF", "ALIASES", "DTYPE", "PARAMS", "SIZE", "CREATED", "SOURCE")
    lines = [header] + [
        (
            r["ref"],
            ",".join(r["aliases"]) or "-",
            r["dtype"],
            f"{r['parameters'] / 1e6:.1f}M",
            f"{r['bytes'] / 1e6:.1f}MB",
            r["created_at"],
            f"LoRA r={r['adapter']['rank']} of {r['adapter']['base']}" if r["adapter"] else r["source"] or "-",
        )
        for r in rows
    ]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip())


def _show(store: ModelStore, args: argparse.Namespace) -> int:
    print(store.resolve(args.ref).manifest.to_json(), end="")
    return 0


def _verify(store: ModelStore, args: argparse.Namespace) -> int:
    stored = store.verify(args.ref)
    print(f"ok {stored.ref}: {len(stored.manifest.files)} files match their sha256")
    return 0


def _promote(store: ModelStore, args: argparse.Namespace) -> int:
    stored = store.promote(args.ref, args.alias)
    print(f"{stored.manifest.name}@{args.alias} -> {stored.manifest.version}")
    return 0


def _eval(store: ModelStore, args: argparse.Namespace) -> int:
    from .evaluate import EvalConfig, evaluate, format_table  # pulls in torch

    config = EvalConfig(
        text=args.text,
        qa=args.qa,
        stride=args.stride,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
    )
    stored, results = evaluate(store, args.ref, config)
    if args.record:
        label = args.label or "eval:" + "+".join(r["file"] for r in results.values())
        stored = store.record_metrics(stored.ref, {label: results})
    print(json.dumps({"ref": stored.ref, **results}, indent=2) if args.json else format_table(stored.ref, results))
    if args.record:
        print(f"recorded as {label!r} in {stored.ref}, manifest revision {stored.manifest.revision}", file=sys.stderr)
    return 0


def _fail(message: str, status: int = 1) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
