"""Text in, text out: tokenize, skip empty lines, batch by length, search, detokenize, restore the input order."""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch
from tqdm import tqdm

from transformer.config import ModelConfig
from transformer.errors import UserError
from transformer.inference.search import SearchConfig, translate_batch
from transformer.model.models import EncoderDecoder
from transformer.text.data import collate_source, pad
from transformer.text.tokenizer import Tokenizer

# Sources (token ids without EOS) -> their translations (ids without BOS/EOS), in the same order.
DecodeIds = Callable[[list[list[int]]], list[list[int]]]


class Configured(Protocol):
    """A translation model as the length checks see it: `EncoderDecoder`, `DecodingModel`, `CTranslate2Translator`."""

    cfg: ModelConfig  # only max_len is read


def translate_texts(model: Configured, tokenizer: Tokenizer, lines: Sequence[str], decode: DecodeIds,
                    source_name: str = "input") -> list[str]:
    """Translations of `lines`, in their order, by `decode`: the one path of every engine from text to text.

    Each line is stripped and tokenized, and checked against the model's length (`check_lengths`). A line
    with no tokens (empty, whitespace-only, or all dropped by the tokenizer's normalization) is left out of
    what `decode` gets and translates to "": it is never decoded (the model would invent a sentence for the
    lone EOS), and the output has as many lines as the input.
    """
    if not lines:
        return []  # sentencepiece decodes an empty batch to one ""
    ids = tokenizer.encode([line.strip() for line in lines])
    check_lengths(model, ids, source_name)
    kept = [i for i, sentence in enumerate(ids) if sentence]
    out: list[list[int]] = [[] for _ in ids]
    if kept:
        for i, hyp in zip(kept, decode([ids[i] for i in kept])):
            out[i] = hyp
    return tokenizer.decode(out)


def translate_lines(
    model: EncoderDecoder,
    tokenizer: Tokenizer,
    lines: Sequence[str],
    search: SearchConfig,
    batch_size: int = 64,
    progress: bool = False,
    source_name: str = "input",
) -> list[str]:
    """Translate `lines` with our search and return detokenized translations in input order.

    An empty or whitespace-only line gives "" without being decoded (`translate_texts`).
    """
    return translate_texts(model, tokenizer, lines, lambda ids: _search_ids(model, ids, search, batch_size, progress),
                           source_name)


def _search_ids(model: EncoderDecoder, ids: list[list[int]], search: SearchConfig, batch_size: int = 64,
                progress: bool = False) -> list[list[int]]:
    """Translations (ids without BOS/EOS) of the sources `ids` (without EOS), in their order.

    Sentences are sorted by length so that a batch holds similar lengths (little padding), decoded
    `batch_size` at a time (src (B, S) right-padded, EOS appended), and put back in their original order.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[list[int]] = [[] for _ in ids]
    with tqdm(total=len(ids), unit="sent", disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            src = collate_source([ids[i] for i in chunk], model.cfg.pad_id, model.cfg.eos_id).to(device)  # (B, S)
            for i, hyp in zip(chunk, translate_batch(model, src, search)):
                out[i] = hyp
            bar.update(len(chunk))
    return out


def check_lengths(model: Configured, ids: list[list[int]], source_name: str) -> None:
    """`UserError` naming the line of the first source sentence too long for the model."""
    limit = model.cfg.max_len - 1  # room for EOS
    for i, sentence in enumerate(ids):
        if len(sentence) > limit:
            raise UserError(
                f"{source_name}:{i + 1}: sentence has {len(sentence)} tokens, over the model's limit of {limit}"
            )


@torch.no_grad()
def score_pairs(model: EncoderDecoder, tokenizer: Tokenizer, sources: Sequence[str], targets: Sequence[str],
                batch_size: int = 64) -> list[float]:
    """log P(target + EOS | source) of each pair, in nats: the sum of the model's log-probabilities of the
    target's tokens and its EOS, teacher-forced from BOS. `UserError` naming the pair of a source or target
    too long for the model."""
    device, cfg = next(model.parameters()).device, model.cfg
    src_ids, tgt_ids = tokenizer.encode([s.strip() for s in sources]), tokenizer.encode_target([t.strip() for t in targets])
    check_lengths(model, src_ids, "sources")
    check_lengths(model, tgt_ids, "targets")  # BOS + target, target + EOS: max_len - 1 tokens each
    out: list[float] = []
    for start in range(0, len(src_ids), batch_size):
        xs, ys = src_ids[start : start + batch_size], tgt_ids[start : start + batch_size]
        src = collate_source(xs, cfg.pad_id, cfg.eos_id).to(device)  # (B, S)
        tgt_in = pad([[cfg.bos_id, *y] for y in ys], cfg.pad_id).to(device)  # (B, T)
        gold = pad([[*y, cfg.eos_id] for y in ys], cfg.pad_id).to(device)  # (B, T)
        log_probs = model(src, tgt_in).float().log_softmax(-1).gather(-1, gold.unsqueeze(-1)).squeeze(-1)
        out += log_probs.masked_fill(gold == cfg.pad_id, 0.0).sum(-1).tolist()  # (B,)
    return out
