"""`transformer mlm VERB`: train a BERT-style masked language model on sentences, fill in [MASK]."""

from __future__ import annotations

import argparse
from pathlib import Path

from transformer.cli import flags
from transformer.cli.common import command, number, say
from transformer.errors import UserError

MIN_LEN = 3  # [CLS] token [SEP]
MIN_PAIR_LEN = 5  # [CLS] token [SEP] token [SEP]

# BERT's optimiser (AdamW, weight decay 0.01 in BERT; 0.1 here as for the LM) with a cosine decay.
TRAIN_DEFAULTS = dict(preset="small", lr=5e-4, schedule="cosine", warmup=200, beta2=0.98, adam_eps=1e-8,
                      weight_decay=0.1, clip_norm=1.0, valid_every=250, keep_last=3)


def _train(args: argparse.Namespace) -> None:
    from transformer.tasks.mlm import MLMConfig, train_mlm

    if args.max_len is not None and args.max_len < MIN_LEN:
        raise UserError(f"--max-len {args.max_len}: must be >= {MIN_LEN} for a masked language model "
                        "([CLS], at least one token, [SEP])")
    if args.nsp and args.max_len is not None and args.max_len < MIN_PAIR_LEN:
        raise UserError(f"--max-len {args.max_len}: must be >= {MIN_PAIR_LEN} with --nsp "
                        "([CLS], a token of each sentence, two [SEP])")
    flags.required(args, "text")
    if args.decoder_layers is not None:
        raise UserError("--decoder-layers: a BERT-style masked language model has no decoder; give --encoder-layers or "
                        "--layers")
    cfg = MLMConfig(
        text=Path(args.text), loop=flags.loop_config(args), valid=Path(args.valid) if args.valid else None,
        vocab_size=args.vocab_size, batch_size=args.batch_size, max_len=args.max_len or 128, mask_prob=args.mask_prob,
        nsp=args.nsp, whole_word=args.whole_word,
    )
    train_mlm(cfg, flags.model_config(args).replace(max_len=cfg.max_len), say=say)


def _fill(args: argparse.Namespace) -> None:
    from transformer.api.load import load_as
    from transformer.api.text import MaskedLM

    flags.required(args, "model")
    model = load_as(MaskedLM, args.model, device=args.device)
    for n, fillers in enumerate(model.fill(args.sentence, args.n_best), 1):
        print(f"[MASK] {n}: " + "  ".join(f"{word or '∅'} {p:.3f}" for word, p in fillers))


def register(sub) -> None:
    p = command(sub, "train", _train, "Train a masked language model on a text file, one sentence per line "
                "(with --nsp: documents separated by blank lines).")
    data = p.add_argument_group("data")
    data.add_argument("--text", help="training sentences (UTF-8), one per line; with --nsp, documents separated by "
                      "blank lines")
    data.add_argument("--valid", help="validation sentences (default: the last 5%% of --text; with --nsp, of its "
                      "documents)")
    flags.vocab_size(data, 8000, "BPE vocabulary size")
    flags.batch_size(data, 128, "sequences (sentences; sentence pairs with --nsp) per batch")
    data.add_argument("--mask-prob", type=number(float, 0, 1, above=True, below=True), default=0.15,
                      help="share of the tokens chosen for prediction")
    data.add_argument("--nsp", action="store_true",
                      help="BERT's next-sentence prediction: train on pairs [CLS] A [SEP] B [SEP] of sentences from "
                           "the documents, B the next sentences (half of the time) or from another document")
    data.add_argument("--whole-word", action="store_true",
                      help="whole-word masking: choose words, not pieces, and mask all pieces of a chosen word")
    flags.training(p, TRAIN_DEFAULTS)

    p = command(sub, "fill", _fill, "Print the most likely fillers of each [MASK] in a sentence.")
    flags.model_dir(p)
    p.add_argument("sentence", help='a sentence with [MASK], e.g. "a man [MASK] a horse ."')
    p.add_argument("--n-best", type=number(int, 1), default=5, help="fillers printed per [MASK]")
    flags.device(p)
