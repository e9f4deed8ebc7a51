"""A BERT-style encoder as text in, text out: the likely fillers of each [MASK], sentence vectors, and
P(IsNext) of a pair of texts (a model with the next-sentence head).

A sequence is ``[CLS] sentence [SEP]``; the ids of the three symbols are the tokenizer's. Our own
vocabulary (`tasks.mlm` trains it) has the user symbols ``[MASK]`` = 4, ``[CLS]`` = 5, ``[SEP]`` = 6
after pad = 0, unk = 1, BOS = 2, EOS = 3 (the constants below); an imported BERT's WordPiece has its own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from transformer.errors import UserError
from transformer.model.models import EncoderOnly
from transformer.text.data import pad
from transformer.text.tokenizer import Tokenizer

SYMBOLS = ("[MASK]", "[CLS]", "[SEP]")
MASK, CLS, SEP = 4, 5, 6  # in our own vocabulary
FIRST_REGULAR = 7  # ids below are special


def symbols(tokenizer: Tokenizer) -> tuple[int, int, int]:
    """The ids of [MASK], [CLS] and [SEP] in `tokenizer` ((4, 5, 6) in ours); `UserError` when one is missing."""
    ids = tuple(tokenizer.piece_to_id(s) for s in SYMBOLS)
    for symbol, i in zip(SYMBOLS, ids):
        if i < 0 or tokenizer.id_to_piece(i) != symbol:
            raise UserError(f"the model's tokenizer has no {symbol} token")
    return ids


def _sequence(model: EncoderOnly, ids: list[int], cls: int, sep: int) -> list[int]:
    """[CLS] ids [SEP], or `UserError` when that is longer than the model takes."""
    ids = [cls, *ids, sep]
    if len(ids) > model.cfg.max_len:
        raise UserError(f"the text has {len(ids)} tokens, more than the model's {model.cfg.max_len}")
    return ids


def _text_ids(tokenizer: Tokenizer, text: str, mask: int) -> list[int]:
    """The ids of `text`. Our sentencepiece writes the space before "[MASK]" as a lone "▁" piece; in
    training a masked word carries its space ("▁riding"), so the lone piece is dropped."""
    ids = tokenizer.encode([text])[0]
    if not isinstance(tokenizer, Tokenizer):
        return ids
    space = tokenizer.piece_to_id("▁")
    return [t for i, t in enumerate(ids) if not (t == space and i + 1 < len(ids) and ids[i + 1] == mask)]


def filler(tokenizer: Tokenizer, i: int) -> str:
    """Token `i` as fill's text: a sentencepiece piece without its "▁", a special token as its piece,
    another token detokenized alone (a WordPiece continuation keeps its "##", as "##ing")."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.id_to_piece(i).replace("▁", " ").strip()
    if i in tokenizer.special_ids:
        return tokenizer.id_to_piece(i)
    return tokenizer.decode([[i]])[0].strip()


@torch.no_grad()
def fill(model: EncoderOnly, tokenizer: Tokenizer, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """For each [MASK] in `text`, the `top_k` most probable fillers (as text) and their probabilities."""
    mask, cls, sep = symbols(tokenizer)
    ids = _text_ids(tokenizer, text, mask)
    if mask not in ids:
        raise UserError("the text has no [MASK]")
    tokens = torch.tensor([_sequence(model, ids, cls, sep)], device=next(model.parameters()).device)
    probs = model(tokens)[0].float().softmax(-1)  # (T, V)
    out = []
    for pos in (tokens[0] == mask).nonzero().flatten().tolist():
        p, idx = probs[pos].topk(top_k)
        out.append([(filler(tokenizer, i), q) for i, q in zip(idx.tolist(), p.tolist())])
    return out


@torch.no_grad()
def embed(model: EncoderOnly, tokenizer: Tokenizer, texts: list[str], batch_size: int = 64) -> Tensor:
    """Sentence vectors (N, d_model): the mean of the encoder's last hidden states over each sentence's
    tokens, [CLS] and [SEP] included, padding excluded (float32, on the CPU)."""
    _, cls, sep = symbols(tokenizer)
    seqs = [_sequence(model, ids, cls, sep) for ids in tokenizer.encode(texts)]
    device, out = next(model.parameters()).device, []
    for i in range(0, len(seqs), batch_size):
        tokens = pad(seqs[i : i + batch_size], model.cfg.pad_id).to(device)  # (B, T)
        keep = (tokens != model.cfg.pad_id).unsqueeze(-1).float()  # (B, T, 1)
        h = model.hidden(tokens).float()  # (B, T, d_model)
        out.append(((h * keep).sum(1) / keep.sum(1)).cpu())
    return torch.cat(out) if out else torch.zeros(0, model.cfg.d_model)


@torch.no_grad()
def next_sentence(model: EncoderOnly, tokenizer: Tokenizer, a: str, b: str) -> float:
    """P(IsNext): the probability, by the model's next-sentence head, that `b` follows `a`; the input is
    ``[CLS] a [SEP] b [SEP]`` with segment 0 for ``[CLS] a [SEP]`` and 1 for ``b [SEP]``. `UserError` for a
    model without the head or a pair longer than the model takes."""
    if not model.cfg.next_sentence:
        raise UserError("the model has no next-sentence head; train one with `transformer mlm train --nsp`")
    _, cls, sep = symbols(tokenizer)
    ids_a, ids_b = tokenizer.encode([a, b])
    ids = _sequence(model, [*ids_a, sep, *ids_b], cls, sep)
    device = next(model.parameters()).device
    tokens = torch.tensor([ids], device=device)  # (1, T)
    segments = torch.tensor([[0] * (len(ids_a) + 2) + [1] * (len(ids_b) + 1)], device=device)  # (1, T)
    return model.next_sentence(model.hidden(tokens, segments=segments))[0].float().softmax(-1)[0].item()
