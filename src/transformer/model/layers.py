"""Building blocks: positional encodings, the position-wise FFN, encoder and decoder layers.

Each sub-layer is wrapped in a residual connection with layer normalisation:
post-norm `LayerNorm(x + Dropout(Sublayer(x)))` as in the paper (section 3.1), or
pre-norm `x + Dropout(Sublayer(LayerNorm(x)))` as an option (`norm_first`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.config import ModelConfig
from transformer.model.attention import MultiHeadAttention
from transformer.model.cache import LayerCache
from transformer.model.dropout import Dropout


def sinusoid_table(max_len: int, d_model: int) -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(...): (max_len, d_model)."""
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    table = torch.zeros(max_len, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)
    return table.float()


class PositionalEncoding(nn.Module):
    """Adds position information to (B, T, d_model) embeddings: sinusoidal (paper) or learned."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.max_len = cfg.max_len
        if cfg.positions == "learned":
            self.learned = nn.Parameter(torch.zeros(cfg.max_len, cfg.d_model))
        else:
            self.learned = None
            self.register_buffer("table", sinusoid_table(cfg.max_len, cfg.d_model), persistent=False)

    def forward(self, x: Tensor, offset: int | Tensor = 0) -> Tensor:
        """x (B, T, d_model) holds positions offset .. offset+T-1: one offset for every row, or one per row (B,)
        (sequences decoded together at different positions, `model.paged`)."""
        table = self.learned if self.learned is not None else self.table
        if isinstance(offset, Tensor):
            positions = offset[:, None] + torch.arange(x.size(1), device=x.device)  # (B, T)
            end = int(positions.max()) + 1 if positions.numel() else 0
            if end > self.max_len:
                raise ValueError(f"sequence of {end} positions exceeds the model's max_len={self.max_len}")
            return x + table[positions].to(x.dtype)
        end = offset + x.size(1)
        if end > self.max_len:
            raise ValueError(f"sequence of {end} positions exceeds the model's max_len={self.max_len}")
        return x + table[offset:end].to(x.dtype)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,  # the paper's, equation (2)
    "gelu": F.gelu,  # Hendrycks and Gimpel (2016), with erf: BERT, ViT
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's approximation
    "swish": F.silu,  # x·sigmoid(x) (Ramachandran et al., 2017): OPUS-MT's Marian models
}


class FeedForward(nn.Module):
    """FFN(x) = max(0, x W1 + b1) W2 + b2, equation (2), or another `activation` in place of max(0, ·);
    optionally dropout on the activation in training."""

    def __init__(self, d_model: int, d_ff: int, act_dropout: float = 0.0, activation: str = "relu") -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff)
        self.w2 = nn.Linear(d_ff, d_model)
        self.dropout = Dropout(act_dropout) if act_dropout else None
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        h = self.activation(self.w1(x))  # (B, T, d_ff)
        return self.w2(self.dropout(h) if self.dropout is not None else h)


class Residual(nn.Module):
    """Residual connection around a sub-layer, with post-norm (paper) or pre-norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.dropout)  # 16-bit masks, cheaper than nn.Dropout's (dropout.py)
        self.norm_first = cfg.norm_first

    def forward(self, x: Tensor, sublayer) -> tuple[Tensor, Tensor | None]:
        """`sublayer` maps (B, T, d_model) to (output, attention weights or None)."""
        if self.norm_first:
            out, weights = sublayer(self.norm(x))
            return x + self.dropout(out), weights
        out, weights = sublayer(x)
        return self.norm(x + self.dropout(out)), weights


class EncoderLayer(nn.Module):
    """Self-attention then FFN (section 3.1, encoder)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attn_dropout)
        self.window = cfg.attn_window
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.act_dropout, cfg.activation)
        self.res_attn = Residual(cfg)
        self.res_ffn = Residual(cfg)

    def forward(self, x: Tensor, mask: Tensor | None, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """x (B, S, d_model), mask: the padding mask (B, 1, 1, S) or None (the window is added by attention).

        Returns x and weights (B, H, S, S) or None.
        """
        x, weights = self.res_attn(
            x, lambda h: self.self_attn(h, mask=mask, need_weights=need_weights, window=self.window)
        )
        x, _ = self.res_ffn(x, lambda h: (self.ffn(h), None))
        return x, weights


class DecoderLayer(nn.Module):
    """Masked self-attention, then (if `cross`) attention over the encoder output, then FFN."""

    def __init__(self, cfg: ModelConfig, cross: bool = True) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attn_dropout)
        self.window = cfg.attn_window
        self.res_self = Residual(cfg)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attn_dropout) if cross else None
        self.res_cross = Residual(cfg) if cross else None
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.act_dropout, cfg.activation)
        self.res_ffn = Residual(cfg)

    def forward(
        self,
        x: Tensor,
        self_mask: Tensor | None,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        self_cache: LayerCache | None = None,
        cross_cache: LayerCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """x (B, T, d_model), memory (B, S, d_model).

        Returns x and the self- and cross-attention weights ((B, H, T, T_k), (B, H, T, S)) or None.
        """
        x, self_w = self.res_self(
            x,
            lambda h: self.self_attn(
                h, mask=self_mask, cache=self_cache, need_weights=need_weights, window=self.window, causal=True
            ),
        )
        cross_w = None
        if self.cross_attn is not None:
            x, cross_w = self.res_cross(
                x,
                lambda h: self.cross_attn(
                    h, memory, mask=memory_mask, cache=cross_cache, need_weights=need_weights
                ),
            )
        x, _ = self.res_ffn(x, lambda h: (self.ffn(h), None))
        return x, self_w, cross_w

    def step(
        self,
        x: Tensor,
        self_cache: LayerCache,
        cross_cache: LayerCache | None = None,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
    ) -> Tensor:
        """One cached decoding step: x (B, d_model) -> (B, d_model).

        The same as `forward` on x[:, None] with these caches, through `MultiHeadAttention.step`,
        in either mode: in train mode with the same dropout (residual, attention, FFN). memory
        (B_m, S, d_model) may hold one row per K rows of x (the beams of a sentence); memory_mask
        (B_m, 1, 1, S) or None.
        """
        x = _residual_step(self.res_self, x, lambda h: self.self_attn.step(h, self_cache, window=self.window))
        if self.cross_attn is not None:
            x = _residual_step(self.res_cross, x, lambda h: self.cross_attn.step(h, cross_cache, memory, memory_mask))
        return _residual_step(self.res_ffn, x, self.ffn)


def _residual_step(residual: Residual, x: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
    """`residual` around `sublayer` (B, d_model) -> (B, d_model), as `Residual.forward`: its dropout
    applies in train mode (the module is not called in eval mode, where it is the identity)."""
    dropout = residual.dropout
    if residual.norm_first:
        out = sublayer(residual.norm(x))
        return x + (dropout(out) if dropout.training else out)
    out = sublayer(x)
    return residual.norm(x + (dropout(out) if dropout.training else out))
