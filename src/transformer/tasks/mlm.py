"""BERT-style (encoder-only) masked language model: training on sentences (filling in [MASK]: `inference.masked`).

Vocabulary: sentencepiece BPE trained on the training sentences, with the user symbols
``[MASK]`` = 4, ``[CLS]`` = 5, ``[SEP]`` = 6 after pad = 0, unk = 1, BOS = 2, EOS = 3.
A sequence is ``[CLS] sentence [SEP]``, right-padded with pad.

Masking (Devlin et al., 2019): each regular token (id >= 7: never pad, unk, BOS, EOS,
[MASK], [CLS], [SEP]) is chosen with probability 0.15; a chosen token is replaced by
[MASK] with probability 0.8, by a random regular token with probability 0.1, and left
unchanged otherwise. The loss is the cross-entropy at the chosen positions only (label
-100 elsewhere). The masks of optimiser step s come from a generator seeded with
(seed, s), so resume is exact.

Validation (``--valid FILE``; without it the last 5% of the training lines are held
out): the sentences are masked once with a fixed seed; reported are the loss and the
accuracy of the argmax prediction at the chosen positions, and the accuracy of the
frequency baseline, which always predicts the most frequent regular token of the
training data, at the same positions.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from transformer.config import ModelConfig
from transformer.errors import UserError
from transformer.inference.masked import CLS, FIRST_REGULAR, MASK, SEP, SYMBOLS, symbols
from transformer.model.models import EncoderOnly
from transformer.text.data import pad, read_lines
from transformer.text.tokenizer import Tokenizer
from transformer.training import distributed
from transformer.training.lock import guard
from transformer.training.loop import LoopConfig, Objective, fit
from transformer.device import resolve_device
from transformer.training.run import begin, settle

IGNORE = -100


@dataclass(frozen=True)
class MLMConfig:
    text: Path
    loop: LoopConfig
    valid: Path | None = None
    vocab_size: int = 8000
    batch_size: int = 128  # sentences per step
    max_len: int = 128  # longest sequence, [CLS] and [SEP] included; longer sentences are cut
    mask_prob: float = 0.15

    def __post_init__(self) -> None:
        if self.max_len < 3:
            raise UserError(f"`max_len` {self.max_len}: an MLM sequence needs >= 3 positions ([CLS], a token, [SEP])")

    def to_dict(self) -> dict:
        """JSON-ready, without `loop` (the loop records itself)."""
        return {"text": str(self.text), "valid": None if self.valid is None else str(self.valid),
                "vocab_size": self.vocab_size, "batch_size": self.batch_size, "max_len": self.max_len,
                "mask_prob": self.mask_prob}


@dataclass(frozen=True)
class Specials:
    """The ids an MLM run needs: [MASK], [CLS], [SEP], pad, and the first regular (maskable) id; the ids of
    this package's vocabulary by default, an imported BERT's from its tokenizer (`specials`)."""

    mask: int = MASK
    cls: int = CLS
    sep: int = SEP
    pad: int = Tokenizer.PAD
    first_regular: int = FIRST_REGULAR


def specials(tokenizer: Tokenizer, pad_id: int) -> Specials:
    """The `Specials` of `tokenizer` (regular ids: those after every special one); `UserError` when its
    vocabulary lacks [MASK], [CLS] or [SEP]."""
    ids = symbols(tokenizer)
    return Specials(*ids, pad_id, max({*tokenizer.special_ids, *ids, pad_id}) + 1)


def mask_tokens(
    tokens: Tensor, vocab_size: int, generator: torch.Generator, mask_prob: float = 0.15, ids: Specials = Specials()
) -> tuple[Tensor, Tensor]:
    """tokens (B, T) -> (inputs, labels): BERT's 80/10/10 corruption; labels IGNORE where not chosen."""
    regular = tokens >= ids.first_regular
    chosen = (torch.rand(tokens.shape, generator=generator, device=tokens.device) < mask_prob) & regular
    how = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    random_ids = torch.randint(ids.first_regular, vocab_size, tokens.shape, generator=generator, device=tokens.device)
    inputs = torch.where(chosen & (how < 0.8), torch.full_like(tokens, ids.mask), tokens)
    inputs = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_ids, inputs)
    labels = torch.where(chosen, tokens, torch.full_like(tokens, IGNORE))
    return inputs, labels


def mlm_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Summed cross-entropy over the chosen positions (labels != IGNORE) and their number."""
    loss = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, int((labels != IGNORE).sum())


def chosen_logits(model: EncoderOnly, inputs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Logits (N, V) at the N chosen positions and their labels (N,).

    Equal to ``model(inputs)[labels != IGNORE]``, but the head and the vocabulary projection
    run only at the chosen positions (15% of them), which saves much of a training step.
    """
    chosen = labels != IGNORE
    return model.logits(model.hidden(inputs)[chosen]), labels[chosen]


def train_tokenizer(lines: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer.train(lines, vocab_size, model_type="bpe", user_symbols=SYMBOLS)
    assert [tokenizer.piece_to_id(s) for s in SYMBOLS] == [MASK, CLS, SEP]
    return tokenizer


def encode_sentences(tokenizer: Tokenizer, lines: list[str], max_len: int, ids: Specials = Specials()
                     ) -> list[list[int]]:
    return [[ids.cls, *seq[: max_len - 2], ids.sep] for seq in tokenizer.encode(lines)]


def _read(path: Path) -> list[str]:
    lines = [line for line in read_lines(path) if line]
    if not lines:
        raise UserError(f"{path}: empty corpus")
    return lines


def _model_config(model_cfg: ModelConfig, vocab_size: int, max_len: int) -> ModelConfig:
    """The encoder-only shape an MLM run trains: the flags' model with this vocabulary and length."""
    return model_cfg.replace(arch="encoder", vocab_size=vocab_size, pad_id=Tokenizer.PAD, max_len=max_len,
                             n_decoder_layers=0)


def _split(cfg: MLMConfig) -> tuple[list[str], list[str]]:
    """Training and validation sentences: `valid`, or the last 5% of the training lines."""
    lines = _read(cfg.text)
    if cfg.valid is not None:
        return lines, _read(cfg.valid)
    if len(lines) < 2:
        raise UserError(f"{cfg.text}: too few lines to hold out validation sentences; give `valid`")
    n_valid = max(1, len(lines) // 20)
    return lines[:-n_valid], lines[-n_valid:]


def train_mlm(cfg: MLMConfig, model_cfg: ModelConfig, say: Callable[[str], None] = print) -> Path:
    """Train (or resume) a BERT-style masked LM on the sentences of cfg.text; returns the run directory."""
    with guard(cfg.loop.out, say):  # one command at a time per run directory
        return _train_mlm(cfg, model_cfg, say)


def _train_mlm(cfg: MLMConfig, model_cfg: ModelConfig, say: Callable[[str], None]) -> Path:
    distributed.bind_cuda_device()  # under torchrun: "cuda" is cuda:LOCAL_RANK
    loop, device = cfg.loop, resolve_device(cfg.loop.device)
    lines, valid_lines = _split(cfg)

    def new_tokenizer() -> Tokenizer:
        tokenizer = train_tokenizer(lines, cfg.vocab_size)
        say(f"BPE vocabulary of {tokenizer.vocab_size} tokens on {len(lines)} sentences")
        return tokenizer

    def shape(vocab_size: int) -> ModelConfig:
        return _model_config(model_cfg, vocab_size, cfg.max_len)

    model, stored_cfg, tokenizer, state, recorded = begin(loop, "encoder", shape, new_tokenizer, device, say)
    meta = {"mlm": cfg.to_dict()}
    loop = settle(loop, stored_cfg, shape(stored_cfg.vocab_size), recorded, meta, say)
    ids = specials(tokenizer, stored_cfg.pad_id)
    train_seqs = encode_sentences(tokenizer, lines, stored_cfg.max_len, ids)
    valid_seqs = encode_sentences(tokenizer, valid_lines, stored_cfg.max_len, ids)
    frequent = Counter(i for s in train_seqs for i in s if i >= ids.first_regular).most_common(1)[0][0]
    say(f"model: {sum(p.numel() for p in model.parameters()):,} parameters; {len(train_seqs)} training, "
        f"{len(valid_seqs)} validation sentences; most frequent token {tokenizer.id_to_piece(frequent)!r}")
    meta["mlm"]["most_frequent_token"] = frequent
    objective = _objective(cfg, train_seqs, valid_seqs, stored_cfg.vocab_size, ids, frequent, device)
    return fit(loop, model, stored_cfg, tokenizer, objective, state, meta, say)


def _objective(cfg: MLMConfig, train_seqs: list[list[int]], valid_seqs: list[list[int]], vocab: int, ids: Specials,
               frequent: int, device: torch.device) -> Objective:
    """Batches of masked sentences, the loss at the chosen positions, and validation accuracy."""
    seed = cfg.loop.seed
    per_epoch = max(len(train_seqs) // cfg.batch_size, 1)
    size = min(cfg.batch_size, len(train_seqs))

    def batch(step: int):
        epoch, b = divmod(step, per_epoch)
        order = torch.randperm(len(train_seqs), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        tokens = pad([train_seqs[i] for i in order[b * size : (b + 1) * size].tolist()], ids.pad)
        inputs, labels = mask_tokens(tokens, vocab, torch.Generator().manual_seed(seed * 7_000_003 + step),
                                     cfg.mask_prob, ids)
        return inputs.to(device), labels.to(device)

    generator = torch.Generator().manual_seed(seed + 7919)
    valid_batches = [mask_tokens(pad(valid_seqs[i : i + 256], ids.pad), vocab, generator, cfg.mask_prob, ids)
                     for i in range(0, len(valid_seqs), 256)]

    def loss(model: EncoderOnly, batch) -> tuple[Tensor, int]:
        return mlm_loss(*chosen_logits(model, *batch))

    def validate(model: EncoderOnly) -> dict[str, float]:
        loss = correct = baseline = n = 0
        for inputs, labels in valid_batches:
            logits, gold = chosen_logits(model, inputs.to(device), labels.to(device))
            loss += F.cross_entropy(logits.float(), gold, reduction="sum").item()
            correct += int((logits.argmax(-1) == gold).sum())
            baseline += int((gold == frequent).sum())
            n += len(gold)
        n = max(n, 1)
        return {"loss": loss / n, "accuracy": correct / n, "baseline_accuracy": baseline / n, "masked": n}

    return Objective(batch=batch, loss=loss, validate=validate, best_metric="accuracy", higher_is_better=True)
