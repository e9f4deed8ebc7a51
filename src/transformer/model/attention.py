"""Scaled dot-product attention and multi-head attention (paper section 3.2).

Mask convention (the one used everywhere in this package): a mask is a boolean
tensor broadcastable to (B, H, T_q, T_k) in which **True means "may attend"**.
This is the convention of `torch.nn.functional.scaled_dot_product_attention`.
Padding masks are built by `padding_mask` as (B, 1, 1, T_k); causal and local
(restricted) masks by `self_attention_mask` as (T_q, T_k). A query row whose keys
are all masked gets an output of zeros and weights of zeros, never NaN.
Sequences are right-padded: real tokens first, padding after.

`MultiHeadAttention` may also be told the structure of self-attention (`window=r`,
`causal=True`) with only the key padding mask; a long windowed self-attention then
takes the blocked path of `window.py`, linear in T instead of T².
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.model.cache import LayerCache
from transformer.model.window import use_windowed, windowed_attention


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """softmax(Q Kᵀ / sqrt(d_k)) V, equation (1) of the paper.

    q: (B, H, T_q, D), k and v: (B, H, T_k, D), mask: bool, broadcastable to
    (B, H, T_q, T_k), True = may attend. Returns the output (B, H, T_q, D) and,
    when `need_weights`, the weights (B, H, T_q, T_k); otherwise None.

    Without `need_weights` this calls the fused kernel
    (`F.scaled_dot_product_attention`); with it, the written-out formula below.
    The two paths are tested against each other. Both zero a query row whose keys
    are all masked here, whatever the kernel: before torch 2.5 the fused kernel
    returns NaN there, and a softmax over all -inf is NaN.
    """
    # the mask's shape with T_k -> 1: False where a query row may attend to no key
    has_key = None if mask is None else mask.any(dim=-1, keepdim=True)
    if not need_weights:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        if has_key is not None:
            out = out.masked_fill(~has_key, 0.0)  # (B, H, T_q, D)
        return out, None
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, T_q, T_k)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if has_key is not None:
        weights = weights.masked_fill(~has_key, 0.0)
    out = F.dropout(weights, p=dropout_p) @ v  # (B, H, T_q, D)
    return out, weights


def padding_mask(tokens: Tensor, pad_id: int) -> Tensor:
    """(B, T) token ids -> (B, 1, 1, T) bool mask, True at real tokens."""
    return (tokens != pad_id)[:, None, None, :]


def self_attention_mask(
    t_q: int, t_k: int, causal: bool, window: int | None, device: torch.device | None = None
) -> Tensor | None:
    """(T_q, T_k) bool mask for self-attention, or None when nothing is masked.

    The queries are the last `t_q` of the `t_k` positions (they follow t_k - t_q cached
    ones). `causal` forbids keys after the query; `window` = r restricts keys to
    |i - j| <= r, the paper's restricted self-attention (Table 1).
    """
    if not causal and window is None:
        return None
    if causal and t_q == 1 and (window is None or t_k - 1 <= window):
        return None  # one query, the last position: it may see every key (a decoding step)
    i = torch.arange(t_k - t_q, t_k, device=device)[:, None]  # absolute query positions
    j = torch.arange(t_k, device=device)[None, :]
    mask = torch.ones(t_q, t_k, dtype=torch.bool, device=device)
    if causal:
        mask &= j <= i
    if window is not None:
        mask &= (i - j).abs() <= window
    return mask


class MultiHeadAttention(nn.Module):
    """Multi-head attention (section 3.2.2) for self-attention and cross-attention.

    The Q, K and V projections of all heads are one (3·d_model, d_model) matrix,
    which is the paper's per-head W_i^Q, W_i^K, W_i^V stacked; W^O is `out_proj`.
    """

    def __init__(self, d_model: int, n_heads: int, attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.attn_dropout = attn_dropout
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _heads(self, x: Tensor) -> Tensor:
        """(B, T, H·D) -> (B, H, T, D)"""
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, -1).transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        mask: Tensor | None = None,
        cache: LayerCache | None = None,
        need_weights: bool = False,
        window: int | None = None,
        causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from x (B, T, d_model) to itself, or to `memory` (B, S, d_model).

        Self-attention when `memory` is None: with a cache, this step's keys/values
        are appended to it; with a window and `causal` (a decoder), the cache keeps only
        the last r + 1 positions (`LayerCache.append_window`), the keys this step's
        queries may see; then `mask` must be None and the weights (B, H, T, n) cover
        those n kept keys only (in ring order for T = 1 once r + 1 are kept).
        Cross-attention otherwise: with a cache, the keys/values of `memory` are computed
        on the first call and reused after (memory may then be any tensor; it is not read
        again). Returns (B, T, d_model) and the weights
        (B, H, T, T_k) when `need_weights`.

        `mask` is the whole mask, as built by the caller, unless self-attention is given
        its structure: with `window` (radius r, |i - j| <= r) or `causal`, `mask` is only
        the key padding mask (B, 1, 1, T_k) or None, and the band/causal part is built
        here. Then, without a cache or `need_weights` and for T long enough
        (`use_windowed`), a window takes the blocked path of `window.py`, linear in T;
        otherwise the dense masked path, as before.
        """
        d = x.size(-1)
        w, b = self.in_proj.weight, self.in_proj.bias
        dropout_p = self.attn_dropout if self.training else 0.0
        if memory is None:
            q, k, v = self.in_proj(x).split(d, dim=-1)
            q, k, v = self._heads(q), self._heads(k), self._heads(v)  # (B, H, T, D)
            if cache is None and not need_weights and use_windowed(x.size(1), window):
                out = windowed_attention(q, k, v, window, causal, mask, dropout_p)  # (B, H, T, D)
                return self.out_proj(out.transpose(1, 2).reshape(x.shape)), None
            if cache is not None and window is not None and causal:  # a ring of the last r + 1 positions
                if cache.bounded and mask is not None and mask.size(-1) != 1:
                    raise ValueError("a bounded (windowed) cache takes no key padding mask")
                k, v = cache.append_window(k, v, window)  # (B, H, n, D), n <= r + T
            elif cache is not None:
                k, v = cache.append(k, v)  # (B, H, length, D)
            # the queries are the last T of the n keys; None: nothing to add (full, or one query seeing all)
            structure = self_attention_mask(x.size(1), k.size(2), causal, window, device=x.device)
            if structure is not None:
                mask = structure if mask is None else mask & structure
        else:
            q = self._heads(F.linear(x, w[:d], b[:d]))
            if cache is not None and cache.k is not None:
                k, v = cache.k, cache.v
            else:
                k, v = F.linear(memory, w[d:], b[d:]).split(d, dim=-1)
                k, v = self._heads(k), self._heads(v)  # (B, H, S, D)
                if cache is not None:
                    cache.set(k, v)
        out, weights = scaled_dot_product_attention(q, k, v, mask, dropout_p, need_weights)
        out = out.transpose(1, 2).reshape(x.shape)  # (B, T, d_model)
        return self.out_proj(out), weights
