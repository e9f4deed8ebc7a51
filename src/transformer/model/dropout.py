"""Dropout whose mask costs one 64-bit random draw per four elements.

`nn.Dropout` on a CPU draws a Bernoulli sample per element (`bernoulli_`), then divides
the mask and multiplies. Here each element gets 16 random bits instead: the generator
fills a quarter as many int64 words, viewed as int16 lanes, and an element is kept where
its lane is at least a threshold. That quantises the drop probability to a multiple of
2^-16, `effective_p(p)` (0.1 -> 0.100006), and the kept elements are scaled by
1 / (1 - effective_p), so that the expectation of the output is exactly the input.

The draws come from torch's default generator, so `torch.manual_seed` makes the masks
reproducible and a checkpoint's RNG state resumes them exactly, as with `nn.Dropout`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

LANES = 4  # 16-bit lanes in one int64 word
LEVELS = 2**16


def _dropped_levels(p: float) -> int:
    """How many of the 2^16 lane values drop an element: p · 2^16 rounded, at most 2^16 - 1."""
    return min(round(p * LEVELS), LEVELS - 1)


def effective_p(p: float) -> float:
    """The drop probability that the 16-bit masks realise: p rounded to a multiple of 2^-16 (below 1)."""
    return _dropped_levels(p) / LEVELS


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> Tensor:
    """A bool mask of `shape`, each element True (kept) with probability 1 - effective_p(p), independently."""
    n = math.prod(shape)
    words = torch.empty(-(-n // LANES), dtype=torch.int64, device=device).random_(-(2**63), None)  # all 64 bits
    lanes = words.view(torch.int16)[:n].view(shape)  # uniform on [-2^15, 2^15)
    return lanes >= _dropped_levels(p) - 2**15


class _Dropout(torch.autograd.Function):
    """x -> x · keep / (1 - p_eff), with the bool mask as the only saved tensor."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        keep = keep_mask(x.shape, p, x.device)
        scale = 1.0 / (1.0 - effective_p(p))
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x * scale, 0.0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad * ctx.scale, 0.0), None


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout of x (any shape) with the cheap masks; x itself when not training or p is 0."""
    if not training or p == 0.0:
        return x
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability {p}: must be >= 0 and < 1")
    return _Dropout.apply(x, p)


class Dropout(nn.Module):
    """`nn.Dropout(p)` with the masks of `keep_mask`: the same expectation, p rounded to a multiple of 2^-16."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
