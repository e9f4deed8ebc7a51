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
from transformer.model.paged import PagedLayer
from transformer.model.window import use_windowed, windowed_attention


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """softmax(Q Kᵀ / sqrt(d_k)) V, equation (1) of the paper.

    q: (B, H, T_q, D), k and v: (B, H, T_k, D), mask: bool, broadcastable to
    (B, H, T_q, T_k), True = may attend. Returns the output (B, H, T_q, D) and,
    when `need_weights`, the weights (B, H, T_q, T_k); otherwise None.

    Without `need_weights` this calls the fused kernel
    (`F.scaled_dot_product_attention`); with it, the written-out formula below.
    The two paths are tested against each other. Both zero a query row whose keys
    are all masked here, whatever the kernel: before torch 2.5 the fused kernel
    returns NaN there, and a softmax over all -inf is NaN. `causal` (T_q = T_k, the
    same positions) masks the keys after each query without a mask tensor.

    Under bf16 autocast on a CPU with gradients on (training), the kernel runs in fp32:
    PyTorch's CPU flash-attention backward measured about 8x slower in bf16 than in fp32
    (BENCHMARKS.md, "LM training step against nanoGPT").
    """
    if causal and need_weights:
        mask = self_attention_mask(q.size(2), k.size(2), True, None, device=q.device)
    # the mask's shape with T_k -> 1: False where a query row may attend to no key
    has_key = None if mask is None else mask.any(dim=-1, keepdim=True)
    if not need_weights:
        if q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled():
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(
                    q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout_p, is_causal=causal
                ).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
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


class InProjection(nn.Linear):
    """The Q, K and V projections of all heads, one (3·d_model, d_model) linear layer.

    Self-attention applies it whole; cross-attention applies its query rows to the target
    (`queries`) and its key/value rows to the memory (`keys_values`).
    """

    def queries(self, x: Tensor) -> Tensor:
        """(..., d_model) -> (..., d_model)"""
        d = self.in_features
        return F.linear(x, self.weight[:d], self.bias[:d])

    def keys_values(self, memory: Tensor) -> Tensor:
        """(..., d_model) -> (..., 2·d_model): keys, then values."""
        d = self.in_features
        return F.linear(memory, self.weight[d:], self.bias[d:])


class SplitInProjection(nn.Module):
    """Cross-attention's `InProjection` cut into two layers: queries (d→d) and keys/values (d→2d).

    The same function, pre-sliced (`DecodingModel`): a decoding step slices no weight, and
    each part is an ordinary linear layer, so int8 quantization covers it.
    """

    def __init__(self, fused: InProjection) -> None:
        super().__init__()
        d = fused.in_features
        self.q_proj = nn.Linear(d, d, dtype=fused.weight.dtype, device=fused.weight.device)
        self.kv_proj = nn.Linear(d, 2 * d, dtype=fused.weight.dtype, device=fused.weight.device)
        with torch.no_grad():
            self.q_proj.weight.copy_(fused.weight[:d])
            self.q_proj.bias.copy_(fused.bias[:d])
            self.kv_proj.weight.copy_(fused.weight[d:])
            self.kv_proj.bias.copy_(fused.bias[d:])

    def queries(self, x: Tensor) -> Tensor:
        return self.q_proj(x)

    def keys_values(self, memory: Tensor) -> Tensor:
        return self.kv_proj(memory)


class MultiHeadAttention(nn.Module):
    """Multi-head attention (section 3.2.2) for self-attention and cross-attention.

    The Q, K and V projections of all heads are one (3·d_model, d_model) matrix
    (`InProjection`), which is the paper's per-head W_i^Q, W_i^K, W_i^V stacked; W^O is
    `out_proj`. `forward` serves every case; `step` is the lean path of one cached
    decoding step (in train mode too, with the same attention dropout).
    """

    def __init__(self, d_model: int, n_heads: int, attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.attn_dropout = attn_dropout
        self.in_proj: InProjection | SplitInProjection = InProjection(d_model, 3 * d_model)
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
        cache: LayerCache | PagedLayer | None = None,
        need_weights: bool = False,
        window: int | None = None,
        causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from x (B, T, d_model) to itself, or to `memory` (B, S, d_model).

        Self-attention when `memory` is None: with a cache, this step's keys/values
        are appended to it; with a window and `causal` (a decoder), the cache keeps only
        the last r + 1 positions (`LayerCache.append_window`), the keys this step's
        queries may see; then `mask` must be None and the weights (B, H, T, n) cover
        those n kept keys only (in ring order for T = 1 once r + 1 are kept). With a paged
        cache (`model.paged.PagedLayer`: each row a sequence at its own position), the cache
        stores the keys/values and attends (causal, windowed), and no weights are returned.
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
        dropout_p = self.attn_dropout if self.training else 0.0
        if memory is None:
            q, k, v = self.in_proj(x).split(d, dim=-1)
            q, k, v = self._heads(q), self._heads(k), self._heads(v)  # (B, H, T, D)
            if isinstance(cache, PagedLayer):  # rows at their own positions: the paged cache attends (no weights)
                return self.out_proj(cache.attend(q, k, v).transpose(1, 2).reshape(x.shape)), None
            if cache is None and not need_weights and use_windowed(x.size(1), window):
                out = windowed_attention(q, k, v, window, causal, mask, dropout_p)  # (B, H, T, D)
                return self.out_proj(out.transpose(1, 2).reshape(x.shape)), None
            if cache is not None and window is not None and causal:  # a ring of the last r + 1 positions
                if cache.bounded and mask is not None and mask.size(-1) != 1:
                    raise ValueError("a bounded (windowed) cache takes no key padding mask")
                k, v = cache.append_window(k, v, window)  # (B, H, n, D), n <= r + T
            elif cache is not None:
                k, v = cache.append(k, v)  # (B, H, length, D)
            # only causal, no padding, T_q = T_k: the kernel's own causal masking, no mask tensor
            is_causal = causal and window is None and mask is None and cache is None
            # the queries are the last T of the n keys; None: nothing to add (full, or one query seeing all)
            structure = None if is_causal else self_attention_mask(x.size(1), k.size(2), causal, window, x.device)
            if structure is not None:
                mask = structure if mask is None else mask & structure
        else:
            is_causal = False
            q = self._heads(self.in_proj.queries(x))
            if cache is not None and cache.k is not None:
                k, v = cache.k, cache.v
            else:
                k, v = self._memory_keys_values(memory, cache)  # (B, H, S, D)
        out, weights = scaled_dot_product_attention(q, k, v, mask, dropout_p, need_weights, is_causal)
        out = out.transpose(1, 2).reshape(x.shape)  # (B, T, d_model)
        return self.out_proj(out), weights

    def _memory_keys_values(self, memory: Tensor, cache: LayerCache | None) -> tuple[Tensor, Tensor]:
        """Cross-attention's keys and values of memory (B, S, d_model), (B, H, S, D) each; stored in `cache`."""
        k, v = self.in_proj.keys_values(memory).split(memory.size(-1), dim=-1)
        k, v = self._heads(k), self._heads(v)  # (B, H, S, D)
        if cache is not None:
            cache.set(k, v)
        return k, v

    def step(
        self,
        x: Tensor,
        cache: LayerCache,
        memory: Tensor | None = None,
        mask: Tensor | None = None,
        window: int | None = None,
    ) -> Tensor:
        """One cached decoding step: x (B, d_model), one query per row -> (B, d_model).

        The same as `forward(x[:, None], memory, mask, cache, window=window, causal=True)`,
        with fewer calls, in either mode: in train mode the attention weights get the same
        dropout (`attn_dropout`). Self-attention (causal) when `memory` is None: this position's
        keys/values are appended to `cache`. Cross-attention otherwise: the keys/values of
        `memory` (B_m, S, d_model) are computed on the first step and kept in `cache`; `mask`
        is its padding mask (B_m, 1, 1, S) or None. The memory may have fewer rows than x:
        B = B_m·K, and the K consecutive rows of x (the beams of a sentence) attend to one
        memory row, whose keys/values are kept once, not once per beam.
        """
        b, d = x.shape
        heads = self.n_heads
        dropout_p = self.attn_dropout if self.training else 0.0
        if memory is None:
            q, k, v = self.in_proj(x).view(b, 3, heads, 1, d // heads).unbind(1)  # (B, H, 1, D) each
            if isinstance(cache, PagedLayer):  # each row at its own position (model.paged)
                return self.out_proj(cache.attend(q, k, v).transpose(1, 2).reshape(b, d))
            if window is not None:
                k, v = cache.append_window(k, v, window)  # (B, H, n, D)
            else:
                k, v = cache.append(k, v)  # (B, H, length, D)
            # None unless the keys outgrew the window (an unbounded cache): one query sees every key
            mask = self_attention_mask(1, k.size(2), True, window, device=x.device)
        else:
            k, v = (cache.k, cache.v) if cache.k is not None else self._memory_keys_values(memory, cache)
            q = self.in_proj.queries(x).view(k.size(0), -1, heads, d // heads).transpose(1, 2)  # (B_m, H, K, D)
        out, _ = scaled_dot_product_attention(q, k, v, mask, dropout_p)  # (B_m, H, K, D); self-attention: (B, H, 1, D)
        return self.out_proj(out.transpose(1, 2).reshape(b, d))
