"""Text in, text out: tokenize, batch by length, search, detokenize, restore the input order."""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm import tqdm

from .data import collate_source
from .decode import SearchConfig, translate_batch
from .errors import UserError
from .models import EncoderDecoder
from .tokenizer import Tokenizer


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
    limit = model.cfg.max_len - 1  # room for EOS
    for i, sentence in enumerate(ids):
        if len(sentence) > limit:
            raise UserError(
                f"{source_name}:{i + 1}: sentence has {len(sentence)} tokens, over the model's limit of {limit}"
            )
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[list[int]] = [[] for _ in ids]
    with tqdm(total=len(ids), unit="sent", disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            src = collate_source([ids[i] for i in chunk], model.cfg.pad_id, Tokenizer.EOS).to(device)
            for i, hyp in zip(chunk, translate_batch(model, src, search)):
                out[i] = hyp
            bar.update(len(chunk))
    return tokenizer.decode(out)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; a clear error for 'cuda' without a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is available on this machine")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UserError(f"--device {name}: choose auto, cpu or cuda")
    return torch.device(name)
