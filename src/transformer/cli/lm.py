"""`transformer lm VERB`: train a GPT-style language model on a text file, sample from it."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from transformer.cli import flags
from transformer.cli.common import command, number, say
from transformer.errors import UserError

# nanoGPT's recipe: AdamW, short warm-up, cosine decay.
TRAIN_DEFAULTS = dict(preset="small", lr=1e-3, schedule="cosine", warmup=100, beta2=0.99, adam_eps=1e-8,
                      weight_decay=0.1, clip_norm=1.0, valid_every=250, keep_last=3)

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "0": "\0", "a": "\a", "b": "\b", "f": "\f", "v": "\v",
            "'": "'", '"': '"'}
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.|$)", re.DOTALL)


def unescape(text: str, flag: str = "--prompt") -> str:
    """`text` with backslash escapes (\\n, \\t, \\\\, \\xHH, \\uHHHH, \\UHHHHHHHH, ...) replaced; any
    other character, non-ASCII included, stays as it is. A bad escape is a `UserError`."""

    def replace(m: re.Match) -> str:
        code = m.group(1)
        if code[:1] in ("x", "u", "U") and len(code) > 1:
            try:
                return chr(int(code[1:], 16))
            except (ValueError, OverflowError):
                pass
        elif code in _ESCAPES:
            return _ESCAPES[code]
        shown = "\\" + code if code else "a lone \\ at the end"
        raise UserError(f"{flag}: invalid escape {shown} at character {m.start() + 1}")

    return _ESCAPE.sub(replace, text)


def _train(args: argparse.Namespace) -> None:
    from transformer.tasks.lm import LMConfig, train_lm

    flags.required(args, "text")
    if args.encoder_layers is not None:
        raise UserError("--encoder-layers: a GPT-style language model has no encoder; give --decoder-layers or --layers")
    cfg = LMConfig(
        text=Path(args.text), loop=flags.loop_config(args), vocab=args.vocab, vocab_size=args.vocab_size,
        valid_fraction=args.valid_fraction, block_size=args.block_size, batch_size=args.batch_size,
        eval_batches=args.eval_batches,
    )
    train_lm(cfg, flags.model_config(args), say=say)


def _sample(args: argparse.Namespace) -> None:
    from transformer.api.load import load_as
    from transformer.api.text import LanguageModel

    flags.required(args, "model")
    model = load_as(LanguageModel, args.model, device=args.device)
    prompt = unescape(args.prompt) if args.escapes else args.prompt
    text = model.generate(prompt, args.tokens, args.temperature, args.top_k, args.top_p, args.seed, include_prompt=True)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def register(sub) -> None:
    p = command(sub, "train", _train, "Train a decoder-only language model on a text file.")
    data = p.add_argument_group("data")
    data.add_argument("--text", help="training text (UTF-8); its last --valid-fraction is held out")
    data.add_argument("--vocab", default="char", choices=["char", "bpe"], help="one token per character, or BPE")
    flags.vocab_size(data, 1000, "BPE vocabulary size (with --vocab bpe)")
    data.add_argument("--valid-fraction", type=number(float, 0, 1, above=True, below=True), default=0.1,
                      help="the last part of the text held out")
    data.add_argument("--block-size", type=number(int, 1), default=64, help="context length in tokens")
    flags.batch_size(data, 12, "sequences (windows) per batch")
    data.add_argument("--eval-batches", type=number(int, 1), default=50,
                      help="validation batches (fixed) per evaluation")
    flags.training(p, TRAIN_DEFAULTS)

    p = command(sub, "sample", _sample, "Continue a prompt with a trained language model.")
    flags.model_dir(p)
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--escapes", action="store_true", help="interpret backslash escapes such as \\n in --prompt")
    p.add_argument("--tokens", type=number(int, 0), default=500, help="number of tokens to generate")
    p.add_argument("--temperature", type=number(float, 0), default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=number(int, 1), help="sample among the k most likely tokens (1 = greedy)")
    p.add_argument("--top-p", type=number(float, 0, 1, above=True),
                   help="nucleus sampling: the most likely tokens with mass p")
    flags.seed(p)
    flags.device(p)
