"""Text in, text out: tokenize, batch by length, search, detokenize, restore the input order."""

from __future__ import annotations

from typing import Sequence

from tqdm import tqdm

from transformer.errors import UserError
from transformer.inference.search import SearchConfig, translate_batch
from transformer.model.models import EncoderDecoder
from transformer.text.data import collate_source
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
