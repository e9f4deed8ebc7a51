"""Fine-tuning a BERT-style encoder to label texts and text pairs (Devlin et al., 2019, section 4).

Data: a TSV file of ``text<TAB>label`` (single texts) or ``text_a<TAB>text_b<TAB>label`` (pairs), UTF-8,
one example a line; every line has the same number of fields; blank lines are skipped. A header line
is optional: the first line is one when its last field is the word ``label`` (any case). Labels are
strings; the training file's, sorted, are the classes. Without `valid`, a fixed random tenth of the
training file (seed 0) is held out for validation.

Model: `model.classifier.EncoderClassifier` on the embeddings and encoder of the masked LM in `model`
(a `transformer mlm train` run, or `transformer import` of a BERT checkpoint), a new linear head on
[CLS] (BERT's pooler when the model has one) or on the mean of the tokens (`pool`). Inputs:
`inference.classify_text` (``[CLS] a [SEP] b [SEP]``, segment ids 0/1 when the model has segment
embeddings, cut to the model's max_len).

Training: `training.loop.fit`, the cross-entropy of the labels. The batch of step s is a slice of
an epoch's permutation seeded with (seed, epoch), so a run resumes exactly. Without `max_steps` the
run lasts `epochs` epochs; without `warmup` the warm-up is the first 10% of the steps (BERT's
recipe: warm-up, then a linear decay: `OptimConfig` schedule "linear"). `freeze_encoder`: only the
head trains (a linear probe). Validation: accuracy (which picks the best model), macro-F1, loss.

The run directory is a model directory: config.json's model is the encoder's `ModelConfig`, its meta
"classify" the settings, the label names ("labels"), "pool" and whether it takes pairs ("pairs").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from transformer.config import ModelConfig
from transformer.device import resolve_device
from transformer.errors import UserError
from transformer.inference.classify_text import Example, collate, encode, probabilities
from transformer.inference.masked import symbols
from transformer.model.classifier import POOLS, EncoderClassifier, from_encoder
from transformer.store import kinds, modeldir
from transformer.text.data import read_text
from transformer.training.checkpoint import list_checkpoints
from transformer.training.lock import guard
from transformer.training.loop import LoopConfig, Objective, fit
from transformer.training.run import check_resume

WARMUP_SHARE = 0.1  # of the run's steps, when `warmup` is not given
VALID_SHARE = 0.1  # of the training file, held out when no `valid` is given


@dataclass(frozen=True)
class ClassifyConfig:
    """What a fine-tuning run reads: the pre-trained model, the TSV files, and how it batches and trains."""

    model: Path  # the masked LM to start from (a model directory)
    train: Path
    loop: LoopConfig
    valid: Path | None = None
    pool: str = "cls"  # cls | mean
    freeze_encoder: bool = False
    batch_size: int = 32
    epochs: float = 3.0  # the run's length when loop.max_steps is None
    warmup: int | None = None  # None: WARMUP_SHARE of the steps (the loop's optim.warmup is replaced)
    dropout: float | None = None  # None: the pre-trained model's

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise UserError(f"`pool` {self.pool!r}: choose cls or mean")
        if self.batch_size < 1 or self.epochs <= 0:
            raise UserError("`batch_size` must be >= 1 and `epochs` > 0")

    def to_dict(self) -> dict:
        """JSON-ready, without `loop` (the loop records itself)."""
        return {"model": str(self.model), "train": str(self.train), "valid": None if self.valid is None else
                str(self.valid), "pool": self.pool, "freeze_encoder": self.freeze_encoder,
                "batch_size": self.batch_size, "epochs": self.epochs, "dropout": self.dropout}


@dataclass(frozen=True)
class Examples:
    """The examples of a TSV file: texts (1-tuples or pairs), labels, their line numbers, whether pairs."""

    path: Path
    texts: list[Example]
    labels: list[str]
    lines: list[int]
    pairs: bool

    def subset(self, index: list[int]) -> "Examples":
        return Examples(self.path, [self.texts[i] for i in index], [self.labels[i] for i in index],
                        [self.lines[i] for i in index], self.pairs)


def read_tsv(path: Path) -> Examples:
    """The labelled examples of a TSV file (module docstring); `UserError` naming the file and line for a
    line with a wrong number of fields, an empty label, or a file without examples."""
    path = Path(path)
    rows: list[tuple[int, list[str]]] = []
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        if line.strip():
            rows.append((number, [field.strip() for field in line.rstrip("\r").split("\t")]))
    if not rows:
        raise UserError(f"{path}: no examples (an empty file)")
    first, width = rows[0][0], len(rows[0][1])
    if width not in (2, 3):
        raise UserError(f"{path}:{first}: {width} tab-separated fields; a line is text<TAB>label or "
                        "text_a<TAB>text_b<TAB>label")
    if rows[0][1][-1].lower() == "label":  # a header
        rows = rows[1:]
        if not rows:
            raise UserError(f"{path}: no examples (only a header line)")
    for number, fields in rows:
        if len(fields) != width:
            raise UserError(f"{path}:{number}: {len(fields)} tab-separated fields, expected {width} (as the "
                            f"first line: {'text_a<TAB>text_b<TAB>label' if width == 3 else 'text<TAB>label'})")
        if not fields[-1]:
            raise UserError(f"{path}:{number}: empty label")
    return Examples(path, [tuple(f[:-1]) for _, f in rows], [f[-1] for _, f in rows], [n for n, _ in rows],
                    width == 3)


def examples_of(items: list[str | tuple], pairs: bool, where: str) -> list[Example]:
    """Texts to classify as examples: a str is one text, a (a, b) tuple a pair; `UserError` ("WHERE:N: ...",
    N from 1) for a pair given to a single-text model, a single text given to a pair model, or another type."""
    out: list[Example] = []
    for n, item in enumerate(items, start=1):
        example = (item,) if isinstance(item, str) else tuple(item) if isinstance(item, (tuple, list)) else None
        if example is None or len(example) not in (1, 2) or not all(isinstance(t, str) for t in example):
            raise UserError(f"{where}:{n}: give a str, or a (str, str) tuple for a pair")
        if (len(example) == 2) != pairs:
            raise UserError(f"{where}:{n}: " + ("a single text, but the model classifies text pairs" if pairs else
                                                "a text pair, but the model classifies single texts"))
        out.append(example)
    return out


def label_ids(data: Examples, labels: list[str], pairs: bool) -> list[int]:
    """The index in `labels` of each label of `data`; `UserError` naming the file and line of a label the
    model does not know, or when `data` holds pairs and the model single texts (or the other way round)."""
    if data.pairs != pairs:
        raise UserError(f"{data.path}:{data.lines[0]}: " + ("single texts, but the model classifies text pairs"
                        if pairs else "text pairs, but the model classifies single texts"))
    index = {label: i for i, label in enumerate(labels)}
    for label, line in zip(data.labels, data.lines):
        if label not in index:
            raise UserError(f"{data.path}:{line}: label {label!r} is not one the model knows "
                            f"({', '.join(labels[:10])}{', ...' if len(labels) > 10 else ''})")
    return [index[label] for label in data.labels]


def scores(gold: list[int], predicted: list[int], labels: list[str]) -> dict:
    """Accuracy, macro-F1 (the mean F1 over the labels in `gold` or `predicted`), each label's precision,
    recall, F1 and support, and the confusion matrix (rows: the true label, columns: the predicted one)."""
    n = len(labels)
    confusion = [[0] * n for _ in range(n)]
    for g, p in zip(gold, predicted):
        confusion[g][p] += 1
    per_label, f1s = {}, []
    for i, label in enumerate(labels):
        right, said, true = confusion[i][i], sum(row[i] for row in confusion), sum(confusion[i])
        precision, recall = right / said if said else 0.0, right / true if true else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[label] = {"precision": precision, "recall": recall, "f1": f1, "support": true}
        if said or true:
            f1s.append(f1)
    return {"accuracy": sum(g == p for g, p in zip(gold, predicted)) / max(len(gold), 1),
            "macro_f1": sum(f1s) / max(len(f1s), 1), "examples": len(gold), "labels": list(labels),
            "per_label": per_label, "confusion": confusion}


def evaluate(model: EncoderClassifier, tokenizer, meta: dict, path: Path, batch_size: int = 64) -> dict:
    """`scores` of the classifier on the labelled TSV file `path`, with its "file"."""
    task = meta["classify"]
    data = read_tsv(path)
    gold = label_ids(data, task["labels"], task["pairs"])
    probs = probabilities(model, encode(tokenizer, data.texts, model.cfg.max_len), batch_size)
    return {"file": str(path), **scores(gold, probs.argmax(-1).tolist(), task["labels"])}


def _pretrained(path: Path, device: torch.device):
    """(the masked LM in `path`, its config, tokenizer); `UserError` when `path` holds no such model."""
    kind = kinds.model_kind(path)
    if kind != "mlm":
        raise UserError(f"{path}: not a BERT-style masked LM to fine-tune (it holds a {kind} model); give a "
                        "`transformer mlm train` run or `transformer import` of a BERT checkpoint")
    encoder, cfg, tokenizer, _ = modeldir.load_model_dir(path, device)
    try:
        symbols(tokenizer)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    return encoder, cfg, tokenizer


def _start(cfg: ClassifyConfig, loop: LoopConfig, labels: list[str], device: torch.device, say: Callable):
    """(classifier, encoder config, tokenizer, train state or None, recorded meta or None): the newest
    checkpoint's when resuming, else a new head on the pre-trained encoder of `cfg.model`, seeded."""
    checkpoints = list_checkpoints(loop.out)
    if checkpoints and not loop.resume:
        raise UserError(f"{loop.out} already holds a training run; pass `resume` to continue it, or choose "
                        "another `out`")
    if loop.resume and checkpoints:
        model, model_cfg, tokenizer, meta = kinds.load_text_classifier(checkpoints[-1], device)
        state = modeldir.load_train_state(checkpoints[-1])
        if state is None:
            raise UserError(f"{checkpoints[-1]}: checkpoint has no training state to resume from")
        say(f"resuming from {checkpoints[-1]} (step {state['step']})")
        result = model, model_cfg, tokenizer, state, meta
    else:
        if loop.resume:
            say(f"{loop.out}: no checkpoint to resume from; starting a new run")
        encoder, _, tokenizer = _pretrained(cfg.model, device)
        torch.manual_seed(loop.seed)
        model = from_encoder(encoder, len(labels), cfg.pool, cfg.dropout)
        say(f"starting from the encoder of {cfg.model}; a new head for {len(labels)} labels on "
            + ("[CLS] (BERT's pooler)" if model.pooler is not None else "[CLS]" if cfg.pool == "cls" else
               "the mean of the tokens"))
        result = model, model.cfg, tokenizer, None, None
    if cfg.freeze_encoder:
        result[0].freeze_encoder()
    return result


def _schedule(cfg: ClassifyConfig, n_train: int, d_model: int) -> LoopConfig:
    """The loop with the run's length (`epochs` without max_steps), warm-up and optimiser resolved."""
    loop = cfg.loop
    steps = loop.max_steps or max(1, math.ceil(cfg.epochs * n_train / cfg.batch_size))
    warmup = cfg.warmup if cfg.warmup is not None else int(WARMUP_SHARE * steps)
    optim = dataclasses.replace(loop.optim, warmup=warmup).resolve(d_model, steps)
    return dataclasses.replace(loop, max_steps=steps, optim=optim)


def _split(cfg: ClassifyConfig) -> tuple[Examples, Examples]:
    """The training and validation examples: `valid`, or a fixed random tenth of `train` (seed 0)."""
    train = read_tsv(cfg.train)
    if cfg.valid is not None:
        return train, read_tsv(cfg.valid)
    if len(train.labels) < 2:
        raise UserError(f"{cfg.train}: too few examples to hold out validation ones; give `valid`")
    order = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(0)).tolist()
    n_valid = max(1, int(VALID_SHARE * len(order)))
    return train.subset(sorted(order[n_valid:])), train.subset(sorted(order[:n_valid]))


def train_classifier(cfg: ClassifyConfig, say: Callable[[str], None] = print) -> Path:
    """Fine-tune (or resume fine-tuning) a text classifier; returns the run directory, whose top holds the
    best model by validation accuracy."""
    train, valid = _split(cfg)  # before the run directory is made: bad data leaves nothing behind
    labels = sorted(set(train.labels))
    label_ids(valid, labels, train.pairs)  # the same kind of examples, no label the training file lacks
    with guard(cfg.loop.out, say):
        device = resolve_device(cfg.loop.device)
        model, model_cfg, tokenizer, state, recorded = _start(cfg, cfg.loop, labels, device, say)
        loop = _schedule(cfg, len(train.labels), model_cfg.d_model)
        meta = {"classify": cfg.to_dict() | {"labels": labels, "pairs": train.pairs}}
        if recorded is not None:
            check_resume(loop.out, {"model": model_cfg.to_dict(), **recorded},
                         {"model": model_cfg.to_dict(), "loop": loop.to_dict(), **meta}, say)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        say(f"classifier: {sum(p.numel() for p in model.parameters()):,} parameters ({trained:,} trained); "
            f"{len(train.labels)} training, {len(valid.labels)} validation "
            f"{'pairs' if train.pairs else 'texts'}; labels {', '.join(labels[:10])}; {loop.max_steps} steps")
        objective = _objective(cfg, model_cfg, tokenizer, train, valid, labels, device)
        return fit(loop, model, model_cfg, tokenizer, objective, state, meta, say)


def _objective(cfg: ClassifyConfig, model_cfg: ModelConfig, tokenizer, train: Examples, valid: Examples,
               labels: list[str], device: torch.device) -> Objective:
    """Batches of (tokens, segments, label ids), the summed cross-entropy, and validation accuracy."""
    seqs = encode(tokenizer, train.texts, model_cfg.max_len)
    gold = torch.tensor(label_ids(train, labels, train.pairs))
    valid_seqs, valid_gold = encode(tokenizer, valid.texts, model_cfg.max_len), label_ids(valid, labels, valid.pairs)
    seed, size = cfg.loop.seed, min(cfg.batch_size, len(seqs))
    per_epoch, segments = max(len(seqs) // size, 1), model_cfg.n_segments >= 2

    def batch(step: int):
        epoch, b = divmod(step, per_epoch)
        order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        index = order[b * size : (b + 1) * size]
        tokens, segment_ids = collate([seqs[i] for i in index.tolist()], model_cfg.pad_id, segments)
        return tokens.to(device), None if segment_ids is None else segment_ids.to(device), gold[index].to(device)

    def loss(model: EncoderClassifier, batch) -> tuple[torch.Tensor, int]:
        tokens, segment_ids, target = batch
        return F.cross_entropy(model(tokens, segment_ids).float(), target, reduction="sum"), target.numel()

    def validate(model: EncoderClassifier) -> dict[str, float]:
        probs = probabilities(model, valid_seqs)
        target = torch.tensor(valid_gold)
        result = scores(valid_gold, probs.argmax(-1).tolist(), labels)
        nll = F.nll_loss(probs.clamp(min=1e-12).log(), target, reduction="mean").item()
        return {"loss": nll, "accuracy": result["accuracy"], "macro_f1": result["macro_f1"]}

    return Objective(batch=batch, loss=loss, validate=validate, best_metric="accuracy", higher_is_better=True)
