"""Restricted (windowed) self-attention in time and memory linear in the length.

The paper's restricted self-attention (Table 1) lets query i see the keys j with
|i - j| <= r (and j <= i when causal). As a dense (T, T) mask over full attention it
still costs T² scores; here the work is blocked instead.

Block layout. The T positions are cut into nb = ceil(T / b) blocks of b queries
(the last one padded internally, the padding cut from the output). With
w = ceil(r / b) neighbouring blocks on each side within reach, the queries of block c
attend to the keys of blocks c-w .. c+w (two-sided) or c-w .. c (causal):
L = (2w+1)·b or (w+1)·b keys, the keys before position 0 and after T-1 being zeros
that the mask hides. Every block is one row of the batch of a single fused
`F.scaled_dot_product_attention` call on (B·nb, H, b, D) queries and (B·nb, H, L, D)
keys/values, with a boolean (B·nb, 1, b, L) mask: the band |i - j| <= r (the same for
every block), causality when asked, and the keys that exist (0 <= j < T, and real
tokens when a key padding mask is given). So the scores number B·H·nb·b·L, about
B·H·T·(2w+1)·b: linear in T for a fixed r.

Same convention as `attention.py`: True = may attend, and a query row whose keys are
all masked gets zeros, never NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Default block size: a power of two >= r, but at least this many queries, so that r = 1
# does not become T blocks of one query each.
MIN_BLOCK = 16
# Dispatch: the blocked path is used from T >= max(MIN_WINDOWED_T, WINDOWED_BLOCKS · b). Measured
# with benchmarks/attention_cost.py (BENCHMARKS.md, "Attention cost against sequence length"; 2-core
# Intel Xeon, fp32, forward + backward, causal): the blocked path overtook the fused masked kernel at
# T = 384 for r = 16 and 64 (b = 16, 64) and at T = 768 for r = 256 (b = 256), and not before.
MIN_WINDOWED_T = 384
WINDOWED_BLOCKS = 3


def default_block(window: int) -> int:
    """The block size used for radius `window`: a power of two >= window, at least MIN_BLOCK."""
    b = 1
    while b < window:
        b *= 2
    return max(b, MIN_BLOCK)


def use_windowed(t: int, window: int | None, block: int | None = None) -> bool:
    """Whether self-attention over t positions with radius `window` should take the blocked path."""
    if window is None:
        return False
    return t >= max(MIN_WINDOWED_T, WINDOWED_BLOCKS * (block or default_block(window)))


def _block_keys(x: Tensor, nb: int, b: int, left: int, span: int) -> Tensor:
    """(B, H, T, D) -> (B·nb, H, span, D): for each block c, positions c·b - left .. c·b - left + span - 1.

    Positions outside 0 .. T-1 are zeros (the mask hides them).
    """
    bsz, h, t, d = x.shape
    right = nb * b - t + span - b - left  # so that the last window ends inside the padded tensor
    xp = F.pad(x, (0, 0, left, right))  # (B, H, left + nb·b + ..., D)
    win = xp.unfold(2, span, b)  # (B, H, nb, D, span), a view
    return win.permute(0, 2, 1, 4, 3).reshape(bsz * nb, h, span, d)


def windowed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    block: int | None = None,
) -> Tensor:
    """Restricted self-attention: query i attends to keys j with |i - j| <= window (and j <= i if causal).

    q, k, v: (B, H, T, D), the same T (self-attention, no cache). key_padding_mask: bool
    (B, 1, 1, T) or (B, T), True at real tokens, or None. `block`: queries per block
    (default `default_block(window)`); any block >= 1 is correct, the window reaching
    ceil(window / block) blocks on each side. Returns (B, H, T, D), equal to
    `scaled_dot_product_attention(q, k, v, self_attention_mask(T, T, causal, window) & key_padding_mask)`.
    Time and memory are O(T · block · (2·ceil(window/block) + 1)).
    """
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    bsz, h, t, d = q.shape
    if k.shape != (bsz, h, t, d) or v.shape[:3] != (bsz, h, t):
        raise ValueError(f"windowed self-attention needs q, k, v of the same length: {q.shape}, {k.shape}, {v.shape}")
    b = block or default_block(window)
    w = -(-window // b)  # blocks within reach on each side
    nb = -(-t // b)
    left = w * b
    span = (2 * w + 1) * b if not causal else (w + 1) * b
    device = q.device

    qb = F.pad(q, (0, 0, 0, nb * b - t))  # (B, H, nb·b, D)
    qb = qb.view(bsz, h, nb, b, d).transpose(1, 2).reshape(bsz * nb, h, b, d)
    kb = _block_keys(k, nb, b, left, span)  # (B·nb, H, span, D)
    vb = _block_keys(v, nb, b, left, span)

    # the band, the same in every block: query a (position c·b + a), key m (position c·b - left + m)
    a = torch.arange(b, device=device)[:, None]
    m = torch.arange(span, device=device)[None, :]
    diff = a + left - m  # i - j
    band = diff.abs() <= window
    if causal:
        band &= diff >= 0  # (b, span)
    # which keys exist: 0 <= j < T and, with padding, real tokens; per block
    if key_padding_mask is None:
        real = torch.ones(1, t, dtype=torch.bool, device=device)
    else:
        real = key_padding_mask.reshape(key_padding_mask.size(0), -1)  # (B or 1, T)
        if real.size(-1) != t:
            raise ValueError(f"key padding mask of {real.size(-1)} keys for {t} positions")
    right = nb * b - t + span - b - left
    keys = F.pad(real, (left, right), value=False).unfold(1, span, b)  # (B or 1, nb, span)
    mask = band[None, None] & keys[:, :, None, :]  # (B or 1, nb, b, span)
    mask = mask.expand(bsz, nb, b, span).reshape(bsz * nb, 1, b, span)

    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=dropout_p)
    out = out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)  # rows with no key: zeros
    out = out.view(bsz, nb, h, b, d).transpose(1, 2).reshape(bsz, h, nb * b, d)
    return out[:, :, :t]
