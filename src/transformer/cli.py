"""The `transformer` command line: a thin layer over the library.

Every flag is declared here, once, with its help text. A `UserError` from the
library is printed as one line on stderr with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import PRESETS, preset
from .errors import UserError


def _params(args: argparse.Namespace) -> None:
    from .models import build_model, count_parameters

    overrides = {"vocab_size": args.vocab_size} if args.vocab_size else {}
    cfg = preset(args.preset, **overrides)
    counts = count_parameters(build_model(cfg))
    if args.json:
        print(json.dumps({"preset": args.preset, "vocab_size": cfg.vocab_size, **counts}, indent=2))
        return
    print(f"preset {args.preset}: arch {cfg.arch}, vocab {cfg.vocab_size}, d_model {cfg.d_model}, "
          f"heads {cfg.n_heads}, d_ff {cfg.d_ff}, layers {cfg.n_encoder_layers}+{cfg.n_decoder_layers}, "
          f"tied embeddings {cfg.tie_embeddings}")
    for name, n in counts.items():
        print(f"  {name:<22} {n:>14,}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transformer",
        description="The Transformer of 'Attention Is All You Need': train, translate, evaluate, inspect.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("params", help="print parameter counts of a preset",
                       description="Print parameter counts per component and in total.")
    p.add_argument("--preset", default="base", help=f"one of: {', '.join(PRESETS)} (default: base)")
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary size (default: the preset's)")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"transformer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
