"""Commands for any model or run: params, average, import, plot."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transformer.cli import flags
from transformer.cli.common import command, writable_file, writable_folder
from transformer.config import PRESETS, preset


def _params(args: argparse.Namespace) -> None:
    from transformer.model.models import build_model, count_parameters

    cfg = preset(args.preset, **({"vocab_size": args.vocab_size} if args.vocab_size else {}))
    counts = count_parameters(build_model(cfg))
    if args.json:
        print(json.dumps({"preset": args.preset, "vocab_size": cfg.vocab_size, **counts}, indent=2))
        return
    print(f"preset {args.preset}: arch {cfg.arch}, vocab {cfg.vocab_size}, d_model {cfg.d_model}, "
          f"heads {cfg.n_heads}, d_ff {cfg.d_ff}, layers {cfg.n_encoder_layers}+{cfg.n_decoder_layers}, "
          f"tied embeddings {cfg.tie_embeddings}")
    for name, n in counts.items():
        print(f"  {name:<22} {n:>14,}")


def _average(args: argparse.Namespace) -> None:
    from transformer.training.checkpoint import write_average

    writable_folder(args.out, "--out")  # before reading any checkpoint
    write_average([Path(p) for p in args.models], Path(args.out))
    print(f"averaged {len(args.models)} checkpoints into {args.out}", file=sys.stderr)


def _plot(args: argparse.Namespace) -> None:
    from transformer.report.plots import plot_training

    if args.out:
        writable_file(args.out, "--out", create_folders=True)
    elif Path(args.run).is_dir():
        writable_file(Path(args.run) / "curves.png", "--out", create_folders=True)
    for path in plot_training(Path(args.run), Path(args.out) if args.out else None):
        print(path)


def _import(args: argparse.Namespace) -> None:
    from transformer.errors import UserError
    from transformer.pretrained import import_huggingface

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: already exists and is not an empty folder; choose another")
    writable_folder(out, "--out")
    kind, model = import_huggingface(Path(args.folder), out)
    n = sum(p.numel() for p in model.parameters())
    print(f"imported {args.folder} as a {kind} model ({n:,} parameters) into {out}", file=sys.stderr)


def register(sub) -> None:
    p = command(sub, "params", _params, "Print parameter counts per component and in total.")
    p.add_argument("--preset", default="base", help=f"one of: {', '.join(PRESETS)}")
    flags.vocab_size(p, None, "vocabulary size (default: the preset's)")
    p.add_argument("--json", action="store_true", help="print a JSON object")

    p = command(sub, "average", _average, "Average the weights of checkpoints (the paper averages the last 5).")
    p.add_argument("models", nargs="+", help="model or checkpoint directories")
    p.add_argument("--out", required=True, help="model directory to write")

    p = command(sub, "import", _import, "Import a pretrained Hugging Face checkpoint (a local folder: Marian/OPUS-MT, "
                                        "BERT, GPT-2, ViT) as a model directory of this package.")
    p.add_argument("folder", help="the Hugging Face model folder (config.json, weights, tokenizer files)")
    p.add_argument("--from", dest="source", choices=["huggingface"], default="huggingface",
                   help="the checkpoint's format")
    p.add_argument("--out", required=True, help="model directory to write (new, or an empty folder)")

    p = command(sub, "plot", _plot, "Write PNG training curves (loss, validation metrics, learning rate).")
    p.add_argument("run", help="run directory holding log.jsonl")
    p.add_argument("--out", help="PNG file to write (default: RUN/curves.png)")
