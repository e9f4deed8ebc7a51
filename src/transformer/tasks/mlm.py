"""BERT-style (encoder-only) masked language model: training on sentences, or on sentence pairs with
next-sentence prediction (filling in [MASK]: `inference.masked`).

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

Whole-word masking (``whole_word``, as BERT's later released models): words, not pieces, are chosen
with probability 0.15, and a chosen word is replaced whole: all its pieces by [MASK] (80%), each piece
by a random regular token (10%), or left unchanged (10%): one draw per word, so that no piece of a
masked word stays visible. A word begins at a piece starting with "▁" (sentencepiece) or at a piece
not starting with "##" (an imported WordPiece); special tokens end a word.

Next-sentence prediction (``nsp``; Devlin et al., 2019, section 3.1, appendix A.1): the text file holds
documents, blocks of lines separated by blank lines, one sentence a line. An input is
``[CLS] A [SEP] B [SEP]`` with segment ids 0 for ``[CLS] A [SEP]`` and 1 for ``B [SEP]``. A is one or
more consecutive sentences of a document with at least two (its start and end uniform); B, half of
the time (IsNext, label 0), the sentences that follow A, otherwise (NotNext, label 1) sentences of
another document from a uniform start; B takes further sentences while the pair fits ``max_len``.
A pair still too long loses tokens from the longer of A and B, one at a time: from A's start and B's
end, so that the boundary between them is kept. The pairs and masks of batch i come from a generator
seeded with (seed, i). The loss is the mean masked-token cross-entropy plus the mean NSP
cross-entropy of the batch. Validation: `--valid`'s documents, or the last 5% of the documents
(whole documents held out); 256 pairs (or one per validation document, if more, up to 4096), built
and masked once with a fixed seed; reported besides the masked-token metrics are ``nsp_accuracy``,
``nsp_loss`` and ``mlm_loss`` (``loss`` is their sum, as in training). The best model is still the
one of the highest masked-token accuracy.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

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
    nsp: bool = False  # sentence pairs from documents, next-sentence prediction beside the masked LM
    whole_word: bool = False  # choose words, not pieces

    def __post_init__(self) -> None:
        if self.max_len < 3:
            raise UserError(f"`max_len` {self.max_len}: an MLM sequence needs >= 3 positions ([CLS], a token, [SEP])")
        if self.nsp and self.max_len < 5:
            raise UserError(f"`max_len` {self.max_len}: a pair for `nsp` needs >= 5 positions "
                            "([CLS], a token, [SEP], a token, [SEP])")

    def to_dict(self) -> dict:
        """JSON-ready, without `loop` (the loop records itself)."""
        return {"text": str(self.text), "valid": None if self.valid is None else str(self.valid),
                "vocab_size": self.vocab_size, "batch_size": self.batch_size, "max_len": self.max_len,
                "mask_prob": self.mask_prob, "nsp": self.nsp, "whole_word": self.whole_word}


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
    return _corrupt(tokens, chosen, how, vocab_size, generator, ids)


def _corrupt(tokens: Tensor, chosen: Tensor, how: Tensor, vocab_size: int, generator: torch.Generator, ids: Specials
             ) -> tuple[Tensor, Tensor]:
    """tokens, chosen, how (B, T) -> (inputs, labels): a chosen token becomes [MASK] where how < 0.8, a random
    regular token where 0.8 <= how < 0.9, and stays otherwise; labels are the chosen tokens, IGNORE elsewhere."""
    random_ids = torch.randint(ids.first_regular, vocab_size, tokens.shape, generator=generator, device=tokens.device)
    inputs = torch.where(chosen & (how < 0.8), torch.full_like(tokens, ids.mask), tokens)
    inputs = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_ids, inputs)
    labels = torch.where(chosen, tokens, torch.full_like(tokens, IGNORE))
    return inputs, labels


def word_starts(tokenizer, ids: Specials = Specials()) -> Tensor:
    """(V,) bool over the tokenizer's ids: True where a piece begins a word ("▁" first in our sentencepiece
    vocabulary; anything but a "##" continuation in an imported WordPiece) and at every special id."""
    pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    if isinstance(tokenizer, Tokenizer):
        starts = [piece.startswith("▁") for piece in pieces]
    else:
        starts = [not piece.startswith("##") for piece in pieces]
    table = torch.tensor(starts, dtype=torch.bool)
    table[: ids.first_regular] = True
    return table


def mask_words(tokens: Tensor, vocab_size: int, generator: torch.Generator, starts: Tensor, mask_prob: float = 0.15,
               ids: Specials = Specials()) -> tuple[Tensor, Tensor]:
    """tokens (B, T) -> (inputs, labels) by whole-word masking: each word (a piece that `starts` (V,) marks, and
    the pieces after it up to the next such piece or special token) is chosen with probability `mask_prob`, and
    all its regular pieces get the same 80/10/10 draw (random ids are drawn per piece)."""
    regular = tokens >= ids.first_regular
    begins = starts.to(tokens.device)[tokens] | ~regular  # (B, T)
    positions = torch.arange(tokens.shape[-1], device=tokens.device).expand_as(tokens)
    first = torch.where(begins, positions, 0).cummax(dim=-1).values  # (B, T): where each piece's word begins
    pick = torch.rand(tokens.shape, generator=generator, device=tokens.device).gather(-1, first)
    how = torch.rand(tokens.shape, generator=generator, device=tokens.device).gather(-1, first)
    return _corrupt(tokens, (pick < mask_prob) & regular, how, vocab_size, generator, ids)


Masker = Callable[[Tensor, torch.Generator], tuple[Tensor, Tensor]]


def masker(cfg: MLMConfig, tokenizer, vocab_size: int, ids: Specials) -> Masker:
    """(tokens (B, T), generator) -> (inputs, labels): `mask_tokens`, or `mask_words` with `cfg.whole_word`."""
    if not cfg.whole_word:
        return lambda tokens, generator: mask_tokens(tokens, vocab_size, generator, cfg.mask_prob, ids)
    starts = word_starts(tokenizer, ids)
    return lambda tokens, generator: mask_words(tokens, vocab_size, generator, starts, cfg.mask_prob, ids)


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


def _model_config(model_cfg: ModelConfig, vocab_size: int, max_len: int, nsp: bool = False) -> ModelConfig:
    """The encoder-only shape an MLM run trains: the flags' model with this vocabulary and length (with `nsp`,
    two segments and the next-sentence head)."""
    shaped = model_cfg.replace(arch="encoder", vocab_size=vocab_size, pad_id=Tokenizer.PAD, max_len=max_len,
                               n_decoder_layers=0)
    return shaped.replace(n_segments=max(shaped.n_segments, 2), next_sentence=True) if nsp else shaped


def _split(cfg: MLMConfig) -> tuple[list[str], list[str]]:
    """Training and validation sentences: `valid`, or the last 5% of the training lines."""
    lines = _read(cfg.text)
    if cfg.valid is not None:
        return lines, _read(cfg.valid)
    if len(lines) < 2:
        raise UserError(f"{cfg.text}: too few lines to hold out validation sentences; give `valid`")
    n_valid = max(1, len(lines) // 20)
    return lines[:-n_valid], lines[-n_valid:]


# ---------------------------------------------------------------- next-sentence prediction: documents and pairs

Document = list[list[int]]  # a document's sentences, each its token ids


def read_documents(path: Path) -> list[list[str]]:
    """The documents of a text file: blocks of non-empty lines (its sentences) separated by blank lines;
    `UserError` for an empty file or one without a blank line between sentences (a single document)."""
    docs: list[list[str]] = [[]]
    for line in read_lines(path):
        if line:
            docs[-1].append(line)
        elif docs[-1]:
            docs.append([])
    docs = [d for d in docs if d]
    if not docs:
        raise UserError(f"{path}: empty corpus")
    if len(docs) == 1:
        raise UserError(f"{path}: `nsp` needs documents separated by blank lines; the file has a single document")
    return docs


def _split_documents(cfg: MLMConfig) -> tuple[list[list[str]], list[list[str]]]:
    """Training and validation documents: `valid`'s, or the last 5% of the documents (at least two)."""
    docs = read_documents(cfg.text)
    if cfg.valid is not None:
        return docs, read_documents(cfg.valid)
    n_valid = max(2, len(docs) // 20)
    if len(docs) - n_valid < 2:
        raise UserError(f"{cfg.text}: {len(docs)} documents, too few to hold out validation documents for `nsp` "
                        "(at least 4); give `valid`")
    return docs[:-n_valid], docs[-n_valid:]


def encode_documents(tokenizer: Tokenizer, docs: list[list[str]], path: Path) -> list[Document]:
    """Each document's sentences as token ids (sentences without tokens dropped); `UserError` naming `path`
    when fewer than two documents remain or none has two sentences (an IsNext pair needs them)."""
    ids = iter(tokenizer.encode([s for d in docs for s in d]))
    encoded = [[seq for seq in (next(ids) for _ in d) if seq] for d in docs]
    encoded = [d for d in encoded if d]
    if len(encoded) < 2 or not any(len(d) >= 2 for d in encoded):
        raise UserError(f"{path}: `nsp` needs at least two documents, one of them with two sentences or more")
    return encoded


def truncate_pair(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
    """A and B cut to at most `budget` tokens together, a token at a time from the longer one (B when they are
    as long): A loses its first tokens, B its last, so that where A ends and B begins is kept."""
    la, lb = len(a), len(b)
    while la + lb > budget:
        if la > lb:
            la -= 1
        else:
            lb -= 1
    return a[len(a) - la :], b[:lb]


def _span(doc: Document, start: int, have: int, budget: int) -> list[int]:
    """The sentences of `doc` from `start`, one at least, then more while `have` + their tokens fit `budget`."""
    out = list(doc[start])
    for sentence in doc[start + 1 :]:
        if have + len(out) + len(sentence) > budget:
            break
        out += sentence
    return out


def _pair(docs: Sequence[Document], eligible: Sequence[int], u: list[float], budget: int
          ) -> tuple[list[int], list[int], int]:
    """(A, B, label: 0 IsNext, 1 NotNext) from six uniform numbers `u` in [0, 1)."""
    d = eligible[int(u[0] * len(eligible))]
    doc = docs[d]
    start = int(u[1] * (len(doc) - 1))  # A: sentences start .. end - 1, B (IsNext) from end
    end = start + 1 + int(u[2] * (len(doc) - 1 - start))
    a = [t for sentence in doc[start:end] for t in sentence]
    if u[3] < 0.5:
        b, label = _span(doc, end, len(a), budget), 0
    else:
        other = int(u[4] * (len(docs) - 1))
        other += other >= d  # any document but d
        b, label = _span(docs[other], int(u[5] * len(docs[other])), len(a), budget), 1
    return *truncate_pair(a, b, budget), label


def make_pairs(docs: Sequence[Document], n: int, generator: torch.Generator, max_len: int, ids: Specials = Specials()
               ) -> tuple[Tensor, Tensor, Tensor]:
    """`n` NSP examples -> (tokens (n, T), segments (n, T), labels (n,)): ``[CLS] A [SEP] B [SEP]``, right-padded
    (pad, segment 0), at most `max_len` long; segment 0 for [CLS] A [SEP], 1 for B [SEP]; label 0 IsNext, 1 NotNext."""
    eligible = [i for i, d in enumerate(docs) if len(d) >= 2]
    draws = torch.rand((n, 6), generator=generator, dtype=torch.float64).tolist()
    seqs, segs, labels = [], [], []
    for u in draws:
        a, b, label = _pair(docs, eligible, u, max_len - 3)
        seqs.append([ids.cls, *a, ids.sep, *b, ids.sep])
        segs.append([0] * (len(a) + 2) + [1] * (len(b) + 1))
        labels.append(label)
    return pad(seqs, ids.pad), pad(segs, 0), torch.tensor(labels)


def nsp_loss(model: EncoderOnly, inputs: Tensor, labels: Tensor, segments: Tensor, is_next: Tensor
             ) -> tuple[Tensor, int]:
    """(summed masked-token loss + N · mean NSP loss, N chosen positions): divided by N, the mean masked-token
    cross-entropy plus the mean NSP cross-entropy. inputs, labels, segments (B, T); is_next (B,)."""
    h = model.hidden(inputs, segments=segments)
    chosen = labels != IGNORE
    loss, n = mlm_loss(model.logits(h[chosen]), labels[chosen])
    return loss + max(n, 1) * F.cross_entropy(model.next_sentence(h).float(), is_next), n


# ---------------------------------------------------------------- training


def train_mlm(cfg: MLMConfig, model_cfg: ModelConfig, say: Callable[[str], None] = print) -> Path:
    """Train (or resume) a BERT-style masked LM on the sentences of cfg.text; returns the run directory."""
    with guard(cfg.loop.out, say):  # one command at a time per run directory
        return _train_mlm(cfg, model_cfg, say)


def _train_mlm(cfg: MLMConfig, model_cfg: ModelConfig, say: Callable[[str], None]) -> Path:
    distributed.bind_cuda_device()  # under torchrun: "cuda" is cuda:LOCAL_RANK
    loop, device = cfg.loop, resolve_device(cfg.loop.device)
    docs, valid_docs = _split_documents(cfg) if cfg.nsp else ([], [])
    lines, valid_lines = ([s for d in docs for s in d], []) if cfg.nsp else _split(cfg)

    def new_tokenizer() -> Tokenizer:
        tokenizer = train_tokenizer(lines, cfg.vocab_size)
        say(f"BPE vocabulary of {tokenizer.vocab_size} tokens on {len(lines)} sentences")
        return tokenizer

    def shape(vocab_size: int) -> ModelConfig:
        return _model_config(model_cfg, vocab_size, cfg.max_len, cfg.nsp)

    model, stored_cfg, tokenizer, state, recorded = begin(loop, "encoder", shape, new_tokenizer, device, say)
    meta = {"mlm": cfg.to_dict()}
    loop = settle(loop, stored_cfg, shape(stored_cfg.vocab_size), recorded, meta, say)
    if cfg.nsp and not (stored_cfg.next_sentence and stored_cfg.n_segments >= 2):
        raise UserError(f"{loop.init or loop.out}: the model has no next-sentence head (or fewer than two segments); "
                        "`nsp` needs one: a model trained with `nsp`, or an imported BERT with its head")
    ids = specials(tokenizer, stored_cfg.pad_id)
    mask = masker(cfg, tokenizer, stored_cfg.vocab_size, ids)
    if cfg.nsp:
        train_docs, valid_docs = (encode_documents(tokenizer, docs, cfg.text),
                                  encode_documents(tokenizer, valid_docs, cfg.valid or cfg.text))
        counts = Counter(i for d in train_docs for s in d for i in s if i >= ids.first_regular)
        what = f"{len(train_docs)} training, {len(valid_docs)} validation documents"
    else:
        train_seqs = encode_sentences(tokenizer, lines, stored_cfg.max_len, ids)
        valid_seqs = encode_sentences(tokenizer, valid_lines, stored_cfg.max_len, ids)
        counts = Counter(i for s in train_seqs for i in s if i >= ids.first_regular)
        what = f"{len(train_seqs)} training, {len(valid_seqs)} validation sentences"
    frequent = counts.most_common(1)[0][0]
    say(f"model: {sum(p.numel() for p in model.parameters()):,} parameters; {what}; most frequent token "
        f"{tokenizer.id_to_piece(frequent)!r}")
    meta["mlm"]["most_frequent_token"] = frequent
    objective = (_nsp_objective(cfg, train_docs, valid_docs, stored_cfg.max_len, mask, ids, frequent, device)
                 if cfg.nsp else _objective(cfg, train_seqs, valid_seqs, mask, ids, frequent, device))
    return fit(loop, model, stored_cfg, tokenizer, objective, state, meta, say)


def _objective(cfg: MLMConfig, train_seqs: list[list[int]], valid_seqs: list[list[int]], mask: Masker,
               ids: Specials, frequent: int, device: torch.device) -> Objective:
    """Batches of masked sentences, the loss at the chosen positions, and validation accuracy."""
    seed = cfg.loop.seed
    per_epoch = max(len(train_seqs) // cfg.batch_size, 1)
    size = min(cfg.batch_size, len(train_seqs))

    def batch(step: int):
        epoch, b = divmod(step, per_epoch)
        order = torch.randperm(len(train_seqs), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        tokens = pad([train_seqs[i] for i in order[b * size : (b + 1) * size].tolist()], ids.pad)
        inputs, labels = mask(tokens, torch.Generator().manual_seed(seed * 7_000_003 + step))
        return inputs.to(device), labels.to(device)

    generator = torch.Generator().manual_seed(seed + 7919)
    valid_batches = [(*mask(pad(valid_seqs[i : i + 256], ids.pad), generator), None, None)
                     for i in range(0, len(valid_seqs), 256)]

    def loss(model: EncoderOnly, batch) -> tuple[Tensor, int]:
        return mlm_loss(*chosen_logits(model, *batch))

    return Objective(batch=batch, loss=loss, validate=lambda model: _evaluate(model, valid_batches, frequent, device),
                     best_metric="accuracy", higher_is_better=True)


def _nsp_objective(cfg: MLMConfig, train_docs: list[Document], valid_docs: list[Document], max_len: int,
                   mask: Masker, ids: Specials, frequent: int, device: torch.device) -> Objective:
    """Batches of masked sentence pairs (a pure function of (seed, batch number)), the masked-token loss plus
    the NSP loss, and validation on pairs built and masked once."""
    seed = cfg.loop.seed

    def batch(step: int):
        generator = torch.Generator().manual_seed(seed * 7_000_003 + step)
        tokens, segments, is_next = make_pairs(train_docs, cfg.batch_size, generator, max_len, ids)
        inputs, labels = mask(tokens, generator)
        return inputs.to(device), labels.to(device), segments.to(device), is_next.to(device)

    generator = torch.Generator().manual_seed(seed + 7919)
    tokens, segments, is_next = make_pairs(valid_docs, min(max(256, len(valid_docs)), 4096), generator, max_len, ids)
    valid_batches = [(*mask(tokens[i : i + 256], generator), segments[i : i + 256], is_next[i : i + 256])
                     for i in range(0, len(tokens), 256)]

    def loss(model: EncoderOnly, batch) -> tuple[Tensor, int]:
        return nsp_loss(model, *batch)

    return Objective(batch=batch, loss=loss, validate=lambda model: _evaluate(model, valid_batches, frequent, device),
                     best_metric="accuracy", higher_is_better=True)


def _evaluate(model: EncoderOnly, batches: list[tuple], frequent: int, device: torch.device) -> dict[str, float]:
    """Validation metrics of (inputs, labels, segments or None, is_next or None) batches: the masked-token
    loss, accuracy and frequency baseline; with NSP labels also nsp_loss and nsp_accuracy (loss: the sum)."""
    loss = correct = baseline = n = nsp = nsp_correct = pairs = 0
    for inputs, labels, segments, is_next in batches:
        h = model.hidden(inputs.to(device), segments=None if segments is None else segments.to(device))
        labels = labels.to(device)
        logits, gold = model.logits(h[labels != IGNORE]), labels[labels != IGNORE]
        loss += F.cross_entropy(logits.float(), gold, reduction="sum").item()
        correct += int((logits.argmax(-1) == gold).sum())
        baseline += int((gold == frequent).sum())
        n += len(gold)
        if is_next is not None:
            nsp_logits, is_next = model.next_sentence(h).float(), is_next.to(device)
            nsp += F.cross_entropy(nsp_logits, is_next, reduction="sum").item()
            nsp_correct += int((nsp_logits.argmax(-1) == is_next).sum())
            pairs += len(is_next)
    n = max(n, 1)
    metrics = {"loss": loss / n, "accuracy": correct / n, "baseline_accuracy": baseline / n, "masked": n}
    if pairs:
        metrics |= {"loss": loss / n + nsp / pairs, "mlm_loss": loss / n, "nsp_loss": nsp / pairs,
                    "nsp_accuracy": nsp_correct / pairs, "pairs": pairs}
    return metrics
