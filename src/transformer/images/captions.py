"""Captioned images composed from single digits: no captioned image set ships offline, so we make one.

A canvas is `slots` digit-sized cells side by side (8 × 32 for four 8 × 8 digits). 2 to 4
digits go into cells chosen at random, in order, the other cells stay blank; the caption
says which digits, left to right:

    2 digits   "a 7 left of a 2"
    3 digits   "three digits: 4 1 9"
    4 digits   "four digits: 4 1 9 0"

Where the digits sit varies, so a model gets a caption right only by looking at the right
parts of the canvas. The digits of a composed set come from one part of a split, so
held-out canvases show only digit images never seen in training.
"""

from __future__ import annotations

import torch

from transformer.images.data import ImageSet

NUMBER_WORDS = {3: "three", 4: "four"}


def caption(digits: list[int]) -> str:
    """The caption of a canvas showing `digits` (2 to 4 of them) left to right."""
    if len(digits) == 2:
        return f"a {digits[0]} left of a {digits[1]}"
    return f"{NUMBER_WORDS[len(digits)]} digits: {' '.join(map(str, digits))}"


def compose(digits: ImageSet, n: int, seed: int, slots: int = 4) -> tuple[torch.Tensor, list[str]]:
    """`n` canvases (n, C, H, slots·W) of 2..min(4, slots) digits drawn from `digits`, and their captions."""
    generator = torch.Generator().manual_seed(seed)
    _, c, h, w = digits.images.shape
    canvases = torch.zeros(n, c, h, slots * w)
    captions = []
    for i in range(n):
        count = int(torch.randint(2, min(4, slots) + 1, (1,), generator=generator))
        cells = torch.randperm(slots, generator=generator)[:count].sort().values.tolist()
        picks = torch.randint(len(digits), (count,), generator=generator).tolist()
        for cell, pick in zip(cells, picks):
            canvases[i, :, :, cell * w : (cell + 1) * w] = digits.images[pick]
        captions.append(caption([int(digits.classes[digits.labels[p]]) for p in picks]))
    return canvases, captions
