"""BERT-style (encoder-only) masked language model: training on sentences, and filling in [MASK].

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

from .attention import padding_mask
from .config import ModelConfig
from .data import read_lines
from .errors import UserError
from .models import EncoderOnly, build_model
from .tokenizer import Tokenizer
from .train import LoopConfig, fit, open_run
from .translate import resolve_device

SYMBOLS = ("[MASK]", "[CLS]", "[SEP]")
MASK, CLS, SEP = 4, 5, 6
FIRST_REGULAR = 7  # ids below are special and never chosen for masking
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


def mask_tokens(
    tokens: Tensor, vocab_size: int, generator: torch.Generator, mask_prob: float = 0.15
) -> tuple[Tensor, Tensor]:
    """tokens (B, T) -> (inputs, labels): BERT's 80/10/10 corruption; labels IGNORE where not chosen."""
    regular = tokens >= FIRST_REGULAR
    chosen = (torch.rand(tokens.shape, generator=generator, device=tokens.device) < mask_prob) & regular
    how = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    random_ids = torch.randint(FIRST_REGULAR, vocab_size, tokens.shape, generator=generator, device=tokens.device)
    inputs = torch.where(chosen & (how < 0.8), torch.full_like(tokens, MASK), tokens)
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
    h = model.encoder(model.embed(inputs), padding_mask(inputs, model.cfg.pad_id))
    chosen = labels != IGNORE
    h = model.head(h[chosen])
    weight = model.out_proj.weight if model.out_proj is not None else model.embed.tokens.weight
    return F.linear(h, weight, model.out_bias), labels[chosen]


def train_tokenizer(lines: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer.train(lines, vocab_size, model_type="bpe", user_symbols=SYMBOLS)
    assert [tokenizer.piece_to_id(s) for s in SYMBOLS] == [MASK, CLS, SEP]
    return tokenizer


def encode_sentences(tokenizer: Tokenizer, lines: list[str], max_len: int) -> list[list[int]]:
    return [[CLS, *ids[: max_len - 2], SEP] for ids in tokenizer.encode(lines)]


def pad(seqs: list[list[int]]) -> Tensor:
    out = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s)
    return out


def _read(path: Path) -> list[str]:
    lines = [line for line in read_lines(path) if line]
    if not lines:
        raise UserError(f"{path}: empty corpus")
    return lines


def train_mlm(cfg: MLMConfig, model_cfg: ModelConfig, say: Callable[[str], None] = print) -> Path:
    """Train (or resume) a BERT-style masked LM on the sentences of cfg.text; returns the run directory."""
    loop = cfg.loop
    device = resolve_device(loop.device)
    lines = _read(cfg.text)
    if cfg.valid is not None:
        valid_lines = _read(cfg.valid)
    else:
        n_valid = max(1, len(lines) // 20)
        if len(lines) < 2:
            raise UserError(f"{cfg.text}: too few lines to hold out validation sentences; give --valid")
        lines, valid_lines = lines[:-n_valid], lines[-n_valid:]
    resumed = open_run(loop, say)
    if resumed is not None:
        model, model_cfg, tokenizer, state = resumed
    else:
        state = None
        tokenizer = train_tokenizer(lines, cfg.vocab_size)
        say(f"BPE vocabulary of {tokenizer.vocab_size} tokens on {len(lines)} sentences")
        model_cfg = model_cfg.replace(
            arch="encoder", vocab_size=tokenizer.vocab_size, pad_id=Tokenizer.PAD, max_len=cfg.max_len,
            n_decoder_layers=0,
        )
        torch.manual_seed(loop.seed)
        model = build_model(model_cfg).to(device)
    if not isinstance(model, EncoderOnly):
        raise UserError(f"mlm training needs an encoder-only model, not arch {model_cfg.arch!r}")
    vocab = model_cfg.vocab_size
    train_seqs = encode_sentences(tokenizer, lines, model_cfg.max_len)
    valid_seqs = encode_sentences(tokenizer, valid_lines, model_cfg.max_len)
    counts = Counter(i for s in train_seqs for i in s if i >= FIRST_REGULAR)
    frequent = counts.most_common(1)[0][0]
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model: {n_params:,} parameters; {len(train_seqs)} training, {len(valid_seqs)} validation sentences; "
        f"most frequent token {tokenizer.id_to_piece(frequent)!r}")

    per_epoch = max(len(train_seqs) // cfg.batch_size, 1)
    batch = min(cfg.batch_size, len(train_seqs))

    def batch_for_step(step: int):
        epoch, b = divmod(step, per_epoch)
        order = torch.randperm(len(train_seqs), generator=torch.Generator().manual_seed(loop.seed * 1_000_003 + epoch))
        tokens = pad([train_seqs[i] for i in order[b * batch : (b + 1) * batch].tolist()])
        generator = torch.Generator().manual_seed(loop.seed * 7_000_003 + step)
        inputs, labels = mask_tokens(tokens, vocab, generator, cfg.mask_prob)
        return inputs.to(device), labels.to(device)

    generator = torch.Generator().manual_seed(loop.seed + 7919)
    valid_batches = []
    for i in range(0, len(valid_seqs), 256):
        valid_batches.append(mask_tokens(pad(valid_seqs[i : i + 256]), vocab, generator, cfg.mask_prob))

    def loss_fn(model: EncoderOnly, batch) -> tuple[Tensor, int]:
        logits, labels = chosen_logits(model, *batch)
        return mlm_loss(logits, labels)

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

    meta = {"mlm": {"text": str(cfg.text), "valid": str(cfg.valid), "batch_size": cfg.batch_size,
                    "mask_prob": cfg.mask_prob, "most_frequent_token": frequent}}
    return fit(loop, model, model_cfg, tokenizer, batch_for_step, loss_fn, validate, "accuracy", True, state, meta, say)


def fill(model: EncoderOnly, tokenizer: Tokenizer, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """For each [MASK] in `text`, the `top_k` most probable fillers (as text) and their probabilities."""
    ids = tokenizer.encode([text])[0]
    # sentencepiece writes the space before "[MASK]" as a lone "▁" piece; in training a masked
    # word carries its space ("▁riding"), so the lone piece is dropped.
    space = tokenizer.piece_to_id("▁")
    ids = [t for i, t in enumerate(ids) if not (t == space and i + 1 < len(ids) and ids[i + 1] == MASK)]
    if MASK not in ids:
        raise UserError("the text has no [MASK]")
    ids = [CLS, *ids, SEP]
    if len(ids) > model.cfg.max_len:
        raise UserError(f"the text has {len(ids)} tokens, more than the model's {model.cfg.max_len}")
    device = next(model.parameters()).device
    tokens = torch.tensor([ids], device=device)
    with torch.no_grad():
        probs = model(tokens)[0].float().softmax(-1)  # (T, V)
    out = []
    for pos in (tokens[0] == MASK).nonzero().flatten().tolist():
        p, idx = probs[pos].topk(top_k)
        out.append([(tokenizer.id_to_piece(i).replace("▁", " ").strip(), q) for i, q in zip(idx.tolist(), p.tolist())])
    return out
