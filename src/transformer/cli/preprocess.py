"""`transformer translation preprocess` (short: `transformer preprocess`): parallel text into a data folder
of token-id shards that `transformer train --data-bin DIR` reads."""

from __future__ import annotations

import argparse
from pathlib import Path

from transformer.cli import flags
from transformer.cli.common import command, number, say, writable_folder

SPLITS = ("train", "valid", "test")


def _preprocess(args: argparse.Namespace) -> None:
    from transformer.tasks.preprocess import PreprocessConfig, preprocess

    files = flags.data_files(args, ("train",), ("valid", "test"))
    flags.required(args, "out")
    writable_folder(args.out, "--out")
    cfg = PreprocessConfig(
        out=Path(args.out), train=files["train"], valid=files["valid"], test=files["test"],
        tokenizer_model=args.tokenizer_model and Path(args.tokenizer_model), vocab_size=args.vocab_size,
        tokenizer_type=args.tokenizer, byte_fallback=args.byte_fallback, separate_vocab=args.separate_vocab,
        sample_size=args.sample_size, workers=args.workers, max_len=args.max_len, max_ratio=args.max_ratio,
        dedup=args.dedup, shard_size=args.shard_size,
    )
    preprocess(cfg, say=say)


def register(sub) -> None:
    """The verb, under `sub` (the subparsers of `transformer translation`)."""
    p = command(sub, "preprocess", _preprocess,
                "Tokenize parallel text once into a data folder of token-id shards, for train --data-bin.")
    data = p.add_argument_group("input (train, and valid and test when given)")
    flags.parallel_data(data, SPLITS)
    p.add_argument("--out", help="the data folder to write (new, empty, or an earlier preprocess's)")
    vocab = p.add_argument_group("vocabulary")
    flags.vocabulary(vocab)
    vocab.add_argument("--tokenizer-model", help="reuse this sentencepiece model file instead of training one")
    vocab.add_argument("--separate-vocab", action="store_true",
                       help="a vocabulary per side (train --data-bin needs a joint one)")
    vocab.add_argument("--sample-size", type=number(int, 1), default=2_000_000,
                       help="train the vocabulary on at most this many sentences, a shuffled sample")
    work = p.add_argument_group("filters and work")
    flags.max_len(work, "drop pairs a model with this --max-len cannot take: a side over MAX_LEN - 2 tokens "
                        "(BOS and EOS take 2 positions; default: no limit)")
    work.add_argument("--max-ratio", type=number(float, 1),
                      help="drop pairs whose longer side has more than this times the tokens of the shorter")
    work.add_argument("--dedup", action="store_true", help="drop exact duplicates of an earlier pair")
    work.add_argument("--workers", type=number(int, 1), default=1, help="encoding processes")
    work.add_argument("--shard-size", type=number(int, 1), default=1_000_000,
                      help="input lines per shard (rounded up to whole 10,000-line work items)")
