"""The Vision Transformer (Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words"), from this package's blocks.

An image (B, C, H, W) is cut into P × P patches, row by row; each flattened patch
(C·P·P values) is mapped linearly to d_model (equation 1 of the ViT paper), a learned
`[CLS]` token may be put in front, positions are added (learned, or 2-D sinusoidal),
and the package's `Encoder` (model/models.py) lets every patch attend to every other.
The classifier reads the `[CLS]` output, or the mean of the patch outputs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from transformer.config import VisionConfig
from transformer.model.layers import sinusoid_table
from transformer.model.models import AttnWeights, Encoder, init_weights


def patches(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, N, C·P·P): the P × P patches row by row, N = (H / P)·(W / P)."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)  # (B, C, rows, P, cols, P)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


class PatchEmbedding(nn.Module):
    """A linear map of the flattened patches: (B, C, H, W) -> (B, N, d_model)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.proj = nn.Linear(cfg.channels * cfg.patch_size**2, cfg.d_model)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(patches(images, self.patch_size))


def sinusoid_table_2d(rows: int, cols: int, d_model: int) -> Tensor:
    """(rows·cols, d_model): the first half of the width encodes a patch's row, the second its column,
    each with the paper's 1-D sinusoids (section 3.5); patches in row-major order."""
    row = sinusoid_table(rows, d_model // 2)  # (rows, d/2)
    col = sinusoid_table(cols, d_model // 2)  # (cols, d/2)
    return torch.cat([row[:, None].expand(rows, cols, -1), col[None].expand(rows, cols, -1)], dim=-1).reshape(
        rows * cols, d_model)


class VisionEncoder(nn.Module):
    """Patches, [CLS] (with `pool` "cls"), positions, dropout, then the encoder layers: (B, C, H, W) -> (B, T, d).

    T = N + 1 with [CLS] (at position 0), else N. The [CLS] token has no position of its own
    with 2-D sinusoidal positions (its learned embedding tells it apart).
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbedding(cfg)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.d_model)) if cfg.pool == "cls" else None
        n_tokens = cfg.n_patches + (cfg.pool == "cls")
        if cfg.positions == "learned":
            self.positions = nn.Parameter(torch.zeros(n_tokens, cfg.d_model))
        else:
            table = sinusoid_table_2d(*cfg.grid, cfg.d_model)
            if self.cls is not None:
                table = torch.cat([table.new_zeros(1, cfg.d_model), table])
            self.register_buffer("positions", table, persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder = Encoder(cfg.encoder_config())

    def forward(self, images: Tensor, attn_weights: AttnWeights | None = None) -> Tensor:
        """images (B, C, H, W) -> features (B, T, d_model)"""
        x = self.patch_embed(images)  # (B, N, d)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.size(0), -1, -1), x], dim=1)  # (B, 1 + N, d)
        x = self.dropout(x + self.positions.to(x.dtype))
        return self.encoder(x, None, attn_weights)


class ViT(nn.Module):
    """The ViT classifier: `VisionEncoder`, then [CLS] or mean pooling, then a linear head."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = VisionEncoder(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.n_classes)

    def pool(self, features: Tensor) -> Tensor:
        """(B, T, d) -> (B, d): the [CLS] output, or the mean over the patches."""
        return features[:, 0] if self.cfg.pool == "cls" else features.mean(dim=1)

    def forward(self, images: Tensor, attn_weights: AttnWeights | None = None) -> Tensor:
        """images (B, C, H, W) -> logits (B, n_classes)"""
        return self.head(self.pool(self.encoder(images, attn_weights)))


def init_vision(module: nn.Module) -> None:
    """`init_weights` (Xavier linear layers, unit LayerNorm), and for every `VisionEncoder` the [CLS]
    token and learned positions N(0, 0.02) (the ViT paper gives no scheme)."""
    init_weights(module)
    for encoder in (m for m in module.modules() if isinstance(m, VisionEncoder)):
        if encoder.cls is not None:
            nn.init.normal_(encoder.cls, std=0.02)
        if isinstance(encoder.positions, nn.Parameter):
            nn.init.normal_(encoder.positions, std=0.02)


def build_vit(cfg: VisionConfig) -> ViT:
    model = ViT(cfg)
    init_vision(model)
    return model
