"""`transformer export`: a trained model as a CTranslate2 folder or a Hugging Face Marian folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transformer.cli import flags
from transformer.cli.common import command, needs_extra, writable_folder
from transformer.export import QUANTIZATIONS


def _export(args: argparse.Namespace) -> None:
    from transformer.export import export_model

    flags.required(args, "model")
    if args.to == "ctranslate2":
        needs_extra("--to ctranslate2", "export", "ctranslate2")
    writable_folder(Path(args.out).parent, "--out", shown=args.out)  # before any work
    export_model(Path(args.model), args.to, Path(args.out), args.quantization)
    print(f"exported {args.model} to {args.to} in {args.out}", file=sys.stderr)


def register(sub) -> None:
    p = command(sub, "export", _export,
                "Export a model as a CTranslate2 folder (Translator, or Generator for an LM) or a Hugging Face "
                "Marian folder (MarianMTModel, MarianTokenizer).")
    flags.model_dir(p)
    p.add_argument("--to", required=True, choices=["ctranslate2", "huggingface"], help="the format to write")
    p.add_argument("--out", required=True, help="the folder to write (new, or empty)")
    p.add_argument("--quantization", choices=QUANTIZATIONS,
                   help="ctranslate2 only: the type the weights are stored in (none given: float32)")
