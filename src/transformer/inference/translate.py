"""Text in, text out: tokenize, batch by length, search, detokenize, restore the input order."""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm import tqdm

from transformer.errors import UserError
from transformer.inference.search import SearchConfig, translate_batch
from transformer.model.models import EncoderDecoder
from transformer.text.data import collate_source, pad
from transformer.text.tokenizer import Tokenizer


def translate_lines(
    model: EncoderDecoder,
    tokenizer: Tokenizer,
    lines: Sequence[str],
    search: SearchConfig,
    batch_size: int = 64,
    progress: bool = False,
    source_name: str = "input",
) -> list[str]:
    """Translate `lines` and return detokenized translations in input order.

    Sentences are sorted by length so that a batch holds similar lengths (little
    padding), decoded `batch_size` at a time, and put back in their original order.
    """
    device = next(model.parameters()).device
    ids = tokenizer.encode([line.strip() for line in lines])
    check_lengths(model, ids, source_name)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[list[int]] = [[] for _ in ids]
    with tqdm(total=len(ids), unit="sent", disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            src = collate_source([ids[i] for i in chunk], model.cfg.pad_id, model.cfg.eos_id).to(device)
            for i, hyp in zip(chunk, translate_batch(model, src, search)):
                out[i] = hyp
            bar.update(len(chunk))
    return tokenizer.decode(out)


def check_lengths(model: EncoderDecoder, ids: list[list[int]], source_name: str) -> None:
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
    src_ids, tgt_ids = tokenizer.encode([s.strip() for s in sources]), tokenizer.encode([t.strip() for t in targets])
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
