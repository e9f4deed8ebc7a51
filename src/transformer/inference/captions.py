"""Captions of images with a captioner (`model/captioner.py`): the package's greedy or beam search and KV cache."""

from __future__ import annotations

import torch

from transformer.inference.search import SearchConfig, translate_batch
from transformer.model.captioner import Captioner
from transformer.text.tokenizer import Tokenizer


def generate_ids(model: Captioner, images: torch.Tensor, beam: int = 1, alpha: float = 0.6,
                 batch_size: int = 256) -> list[list[int]]:
    """The caption token ids (without BOS and EOS) of images (N, C, H, W): greedy (beam 1) or beam search
    (length penalty `alpha`)."""
    search = SearchConfig(beam=beam, alpha=alpha, max_len_a=0, max_len_b=model.cfg.max_len - 1)
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for i in range(0, len(images), batch_size):
        out += translate_batch(model, images[i : i + batch_size].to(device), search)
    return out


def generate(model: Captioner, tokenizer: Tokenizer, images: torch.Tensor, beam: int = 1, alpha: float = 0.6,
             batch_size: int = 256) -> list[str]:
    """The captions of images (N, C, H, W) as text."""
    return tokenizer.decode(generate_ids(model, images, beam, alpha, batch_size))
