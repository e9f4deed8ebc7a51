"""`transformer classify VERB`: fine-tune a BERT-style encoder to label texts or text pairs, predict, evaluate."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transformer.cli import flags
from transformer.cli.common import command, number, say, writable_file

# BERT's fine-tuning recipe (Devlin et al., 2019, section 4 and A.3): AdamW (beta2 0.999, eps 1e-6, weight
# decay 0.01), warm-up over the first 10% of the steps, linear decay to 0, batches of 32, 3 epochs. The
# peak lr is 1e-4, the high end for small models, whose range lies above bert-base's 2e-5..5e-5 (see
# `_lr`); a linear probe (--freeze-encoder) trains its head at 1e-3.
TRAIN_DEFAULTS = dict(schedule="linear", beta2=0.999, adam_eps=1e-6, weight_decay=0.01, clip_norm=1.0,
                      valid_every=100, keep_last=2, log_every=10)
LR, PROBE_LR = 1e-4, 1e-3


def _train(args: argparse.Namespace) -> None:
    from transformer.tasks.classify import ClassifyConfig, train_classifier

    flags.required(args, "model", "train")
    warmup = args.warmup
    args.warmup = 0 if warmup is None else warmup  # None: 10% of the steps, which the data decides
    if args.lr is None:
        args.lr = PROBE_LR if args.freeze_encoder else LR
    cfg = ClassifyConfig(
        model=Path(args.model), train=Path(args.train), loop=flags.loop_config(args),
        valid=Path(args.valid) if args.valid else None, pool=args.pool, freeze_encoder=args.freeze_encoder,
        batch_size=args.batch_size, epochs=args.epochs, warmup=warmup, dropout=args.dropout,
    )
    train_classifier(cfg, say=say)


def _load(args: argparse.Namespace):
    from transformer.api.load import load_as
    from transformer.api.text import TextClassifier

    flags.required(args, "model")
    return load_as(TextClassifier, args.model, device=args.device)


def _predict(args: argparse.Namespace) -> None:
    classifier = _load(args)
    lines = [line.rstrip("\r\n") for line in sys.stdin]
    items = [tuple(line.split("\t", 1)) if "\t" in line else line for line in lines]
    if not items:
        return
    from transformer.tasks.classify import examples_of

    examples_of(items, classifier.pairs, "<stdin>")  # a pair to a single-text model: "<stdin>:3: ..."
    for row in classifier.probabilities(items, batch_size=args.batch_size):
        label = max(row, key=row.get)
        print(label + ("\t" + "\t".join(f"{k} {p:.4f}" for k, p in row.items()) if args.probs else ""))


def _evaluate(args: argparse.Namespace) -> None:
    flags.required(args, "input")
    if args.confusion:
        writable_file(args.confusion, "--confusion", create_folders=True)
    classifier = _load(args)
    result = classifier.evaluate(Path(args.input), batch_size=args.batch_size)
    if args.confusion:
        from transformer.report.plots import plot_confusion

        plot_confusion(result["confusion"], result["labels"], f"{args.input}: accuracy {result['accuracy']:.4f}",
                       Path(args.confusion))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    n, right = result["examples"], round(result["accuracy"] * result["examples"])
    print(f"accuracy {result['accuracy']:.4f} ({right}/{n}) on {args.input}")
    print(f"macro-F1 {result['macro_f1']:.4f}")
    print("confusion matrix (rows: true label, columns: predicted label):")
    labels = result["labels"]
    width = max(len(label) for label in labels) + 2
    cells = [max(len(label), len(str(n))) + 2 for label in labels]
    print(" " * width + "".join(label.rjust(c) for label, c in zip(labels, cells)))
    for label, row in zip(labels, result["confusion"]):
        print(label.ljust(width) + "".join(str(v).rjust(c) for v, c in zip(row, cells)))


def register(sub) -> None:
    p = command(sub, "train", _train, "Fine-tune a masked language model to label texts or text pairs (TSV).")
    data = p.add_argument_group("data and model")
    data.add_argument("--model", help="the pre-trained model: a `transformer mlm train` run, or `transformer "
                                      "import` of a BERT checkpoint")
    data.add_argument("--train", help="training examples: a TSV of text<TAB>label or text_a<TAB>text_b<TAB>label "
                                      "(a header line whose last field is 'label' is skipped)")
    data.add_argument("--valid", help="validation examples, the same columns (default: a fixed tenth of --train)")
    data.add_argument("--pool", choices=["cls", "mean"], default="cls",
                      help="the head reads [CLS] (BERT's pooler when the model has one) or the mean of the tokens")
    data.add_argument("--freeze-encoder", action="store_true",
                      help="train the head only (a linear probe); default lr 1e-3 instead of 1e-4")
    data.add_argument("--dropout", type=number(float, 0, 1, below=True),
                      help="override the model's dropout (also the one before the head)")
    flags.batch_size(data, 32, "examples per batch")
    data.add_argument("--epochs", type=number(float, 0, above=True), default=3.0,
                      help="the run's length when --max-steps is not given")
    flags.loop(p)
    p.set_defaults(**TRAIN_DEFAULTS)

    p = command(sub, "predict", _predict, "Label each line of stdin (a pair as text_a<TAB>text_b).")
    flags.model_dir(p)
    p.add_argument("--probs", action="store_true", help="after the label, each label's probability")
    flags.batch_size(p, 64, "texts per batch")
    flags.device(p)

    p = command(sub, "evaluate", _evaluate, "Accuracy, macro-F1 and the confusion matrix on a labelled TSV.")
    flags.model_dir(p)
    p.add_argument("--input", help="labelled examples, the columns of the training file")
    p.add_argument("--json", action="store_true", help="print the scores as JSON (accuracy is a fraction)")
    p.add_argument("--confusion", metavar="PNG", help="also draw the confusion matrix to this PNG file")
    flags.batch_size(p, 64, "texts per batch")
    flags.device(p)
