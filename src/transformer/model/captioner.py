"""Image to text: a ViT encoder, a bridge, and a text decoder (CaptionConfig.bridge).

- `QFormerCaptioner` (BLIP-2, Li et al., 2023): a `QFormer` of N learned queries reads the
  image features; its N outputs, projected to the LM's d_model, are a prefix to a frozen
  decoder-only LM (`DecoderOnly`, as `lm train` makes it). The prefix takes the place of token
  embeddings (after the LM's sqrt(d_model) scale, at a norm like theirs: about 8 against about
  10 at the start) at positions 0..N-1, before the caption's BOS. It steers the LM only if the LM
  reads what comes before a line: an LM trained on independent captions does not (README, Vision).
- `FlamingoCaptioner` (Alayrac et al., 2022): `GatedCrossAttention` blocks, tanh gates at
  0, before every k-th layer of the same frozen LM; at the start the LM is unchanged.
- `EncoderDecoderCaptioner`: the paper's decoder (with cross-attention) over every patch,
  trained from scratch: the plain baseline.

All three see the image tile by tile (`CaptionConfig.tiles` cells of the ViT's size side by
side, each through the ViT, its features marked with a learned embedding of the cell), and all
three have the interface of the searches (`inference.search.Seq2Seq`): `encode(images)`
gives a memory and its mask, `decode` continues a `KVCache`, `project` gives logits, so
captions are decoded with the package's greedy or beam search and its cache. The frozen LM's
parameters have `requires_grad` False and it stays in eval mode (no dropout) when the
captioner trains. Attention weights come back through `attn_weights`: "cross" holds each
layer's attention from the caption's tokens to the memory (B, H, T, S) (for the Q-Former:
to the N queries), "queries" the Q-Former's attention from its queries to the image.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from transformer.config import CaptionConfig, ModelConfig
from transformer.model.attention import MultiHeadAttention
from transformer.model.cache import KVCache, LayerCache
from transformer.model.layers import FeedForward, Residual
from transformer.model.models import AttnWeights, Decoder, DecoderOnly, Embedding, project
from transformer.model.vision import VisionEncoder, init_vision


class QFormerLayer(nn.Module):
    """Self-attention among the queries, then (if `cross`) cross-attention to the image, then the FFN."""

    def __init__(self, cfg: ModelConfig, cross: bool) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attn_dropout)
        self.res_self = Residual(cfg)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attn_dropout) if cross else None
        self.res_cross = Residual(cfg) if cross else None
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.act_dropout, cfg.activation)
        self.res_ffn = Residual(cfg)

    def forward(self, q: Tensor, image: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """q (B, N, d), image (B, S, d) -> q (B, N, d) and the cross-attention weights (B, H, N, S) or None."""
        q, _ = self.res_self(q, lambda h: self.self_attn(h))
        weights = None
        if self.cross_attn is not None:
            q, weights = self.res_cross(q, lambda h: self.cross_attn(h, image, need_weights=need_weights))
        q, _ = self.res_ffn(q, lambda h: (self.ffn(h), None))
        return q, weights


class QFormer(nn.Module):
    """N learned queries through `n_layers` layers; cross-attention to the image in layers 0, k, 2k, ...

    Returns (B, N, d) whatever the number S of image features.
    """

    def __init__(self, cfg: ModelConfig, n_queries: int, n_layers: int, cross_every: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.zeros(n_queries, cfg.d_model))
        self.layers = nn.ModuleList(QFormerLayer(cfg, cross=i % cross_every == 0) for i in range(n_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.norm_first else None

    def forward(self, image: Tensor, attn_weights: AttnWeights | None = None) -> Tensor:
        """image (B, S, d) -> (B, N, d)"""
        q = self.queries.expand(image.size(0), -1, -1)  # (B, N, d)
        for layer in self.layers:
            q, w = layer(q, image, need_weights=attn_weights is not None)
            if attn_weights is not None and w is not None:
                attn_weights.setdefault("queries", []).append(w)
        return self.norm(q) if self.norm is not None else q


class GatedCrossAttention(nn.Module):
    """Flamingo's GATED XATTN-DENSE block (Alayrac et al., 2022, section 2.2, Figure 4):

        y = y + tanh(α_attn) · CrossAttention(LN(y), image)
        y = y + tanh(α_ffn) · FFN(LN(y))

    with α_attn = α_ffn = 0 at the start, so that the block is the identity, exactly.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attn_dropout)
        self.gate_attn = nn.Parameter(torch.zeros(()))
        self.norm_ffn = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.act_dropout, cfg.activation)
        self.gate_ffn = nn.Parameter(torch.zeros(()))

    def forward(self, y: Tensor, image: Tensor, cache: LayerCache | None = None,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """y (B, T, d) text, image (B, S, d) -> y (B, T, d) and the attention weights (B, H, T, S) or None.

        With a cache, the image's keys/values are computed once (the first step) and reused.
        """
        out, weights = self.attn(self.norm_attn(y), image, cache=cache, need_weights=need_weights)
        y = y + torch.tanh(self.gate_attn) * out
        return y + torch.tanh(self.gate_ffn) * self.ffn(self.norm_ffn(y)), weights


class Captioner(nn.Module):
    """What the three captioners share: the ViT encoder over the image's tiles, the projection of its
    features to the text side's d_model, the search interface, and frozen parts kept frozen."""

    def __init__(self, cfg: CaptionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision)
        self.tile_embed = nn.Parameter(torch.zeros(cfg.tiles, cfg.vision.d_model))  # which tile a feature is of
        self.to_text = nn.Linear(cfg.vision.d_model, cfg.lm.d_model)
        if cfg.freeze_vision:
            self.vision.requires_grad_(False)

    def train(self, mode: bool = True) -> "Captioner":
        super().train(mode)
        if self.cfg.freeze_vision:
            self.vision.eval()  # frozen: no dropout either
        return self

    def image_features(self, images: Tensor, attn_weights: AttnWeights | None = None) -> Tensor:
        """images (B, C, H, K·W), K tiles of the ViT's size W side by side -> features (B, K·T, d_vision):
        tile by tile, T per tile, each plus its tile's embedding."""
        b, c, h, w = images.shape
        k = self.cfg.tiles
        tiles = images.reshape(b, c, h, k, w // k).permute(0, 3, 1, 2, 4).reshape(b * k, c, h, w // k)
        features = self.vision(tiles, attn_weights)  # (B·K, T, d)
        features = features.view(b, k, features.size(1), -1) + self.tile_embed[:, None]  # (B, K, T, d)
        return features.flatten(1, 2)

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.lm.n_decoder_layers)

    def forward(self, images: Tensor, tgt: Tensor, attn_weights: AttnWeights | None = None) -> Tensor:
        """images (B, C, H, W), tgt (B, T) (starting with BOS) -> logits (B, T, vocab)"""
        memory, mask = self.encode(images, attn_weights)
        return self.project(self.decode(tgt, memory, mask, attn_weights=attn_weights))

    def encode(self, images: Tensor, attn_weights: AttnWeights | None = None) -> tuple[Tensor, Tensor]:
        """images (B, C, H, W) -> memory (B, S, d_lm) and its mask (B, 1, 1, S), all True."""
        memory = self.to_text(self.image_features(images, attn_weights))
        return memory, memory.new_ones(memory.size(0), 1, 1, memory.size(1), dtype=torch.bool)


class FrozenLMCaptioner(Captioner):
    """A captioner whose text decoder is a frozen `DecoderOnly` LM, logits through its own projection."""

    def __init__(self, cfg: CaptionConfig) -> None:
        super().__init__(cfg)
        self.lm = DecoderOnly(cfg.lm)
        self.lm.requires_grad_(False)
        self.lm.eval()

    def train(self, mode: bool = True) -> "FrozenLMCaptioner":
        super().train(mode)
        self.lm.eval()  # frozen: no dropout either
        return self

    def project(self, h: Tensor) -> Tensor:
        return project(h, self.lm.embed.tokens, self.lm.out_proj)


class QFormerCaptioner(FrozenLMCaptioner):
    """ViT -> Q-Former -> projection -> prefix of N positions before the caption in a frozen LM."""

    def __init__(self, cfg: CaptionConfig) -> None:
        super().__init__(cfg)
        self.qformer = QFormer(cfg.vision.encoder_config(), cfg.n_queries, cfg.bridge_layers, cfg.cross_every)

    def encode(self, images: Tensor, attn_weights: AttnWeights | None = None) -> tuple[Tensor, Tensor]:
        """images (B, C, H, W) -> the LM prefix (B, N, d_lm) and its mask (B, 1, 1, N)."""
        prefix = self.to_text(self.qformer(self.image_features(images, attn_weights), attn_weights))
        return prefix, prefix.new_ones(prefix.size(0), 1, 1, prefix.size(1), dtype=torch.bool)

    def decode(self, tgt: Tensor, memory: Tensor, memory_mask: Tensor, cache: KVCache | None = None,
               attn_weights: AttnWeights | None = None) -> Tensor:
        """tgt (B, T) continuing `cache` -> (B, T, d_lm). An empty (or no) cache: the prefix goes first."""
        n, offset = memory.size(1), cache.length if cache is not None else 0
        embed = self.lm.embed
        if offset == 0:  # the prefix takes the LM's positions 0..N-1, as token embeddings would
            x = torch.cat([embed.dropout(embed.positions(memory)), embed(tgt, n)], dim=1)  # (B, N + T, d)
        else:
            x = embed(tgt, offset)
        weights: AttnWeights | None = {} if attn_weights is not None else None
        h = self.lm.decoder(x, cache=cache, attn_weights=weights)
        if attn_weights is not None:  # the caption's attention to the prefix, as "cross" (B, H, T, N)
            attn_weights["decoder"] = weights["decoder"]
            attn_weights["cross"] = [w[:, :, -tgt.size(1):, :n] for w in weights["decoder"]]
        return h[:, -tgt.size(1):]


class FlamingoCaptioner(FrozenLMCaptioner):
    """ViT -> projection -> a `GatedCrossAttention` block before LM layers 0, k, 2k, ... of a frozen LM."""

    def __init__(self, cfg: CaptionConfig) -> None:
        super().__init__(cfg)
        self.gated = nn.ModuleList(GatedCrossAttention(cfg.lm) for _ in range(0, cfg.lm.n_decoder_layers,
                                                                             cfg.cross_every))

    def decode(self, tgt: Tensor, memory: Tensor, memory_mask: Tensor, cache: KVCache | None = None,
               attn_weights: AttnWeights | None = None) -> Tensor:
        """tgt (B, T) continuing `cache` -> (B, T, d_lm); the LM's layers with the gated blocks between.

        Each gated block keeps the image's keys/values in the cross-attention entry of the LM layer it precedes.
        """
        x = self.lm.embed(tgt, cache.length if cache is not None else 0)
        need = attn_weights is not None
        for i, layer in enumerate(self.lm.decoder.layers):
            if i % self.cfg.cross_every == 0:
                x, w = self.gated[i // self.cfg.cross_every](
                    x, memory, cache.cross_attn[i] if cache is not None else None, need)
                if need:
                    attn_weights.setdefault("cross", []).append(w)
            x, self_w, _ = layer(x, None, self_cache=cache.self_attn[i] if cache is not None else None,
                                 need_weights=need)
            if need:
                attn_weights.setdefault("decoder", []).append(self_w)
        norm = self.lm.decoder.norm
        return norm(x) if norm is not None else x


class EncoderDecoderCaptioner(Captioner):
    """ViT -> projection -> the paper's decoder over every patch (no LM; everything trained)."""

    beams_share_memory = True  # a cached step takes one memory row per K beams (`Decoder`'s step path)

    def __init__(self, cfg: CaptionConfig) -> None:
        super().__init__(cfg)
        self.embed = Embedding(cfg.lm)
        self.decoder = Decoder(cfg.lm, cross=True)
        self.out_proj = None if cfg.lm.tie_embeddings else nn.Linear(cfg.lm.d_model, cfg.lm.vocab_size, bias=False)

    def decode(self, tgt: Tensor, memory: Tensor, memory_mask: Tensor, cache: KVCache | None = None,
               attn_weights: AttnWeights | None = None) -> Tensor:
        """tgt (B, T) continuing `cache` -> (B, T, d)"""
        offset = cache.length if cache is not None else 0
        return self.decoder(self.embed(tgt, offset), memory, memory_mask, cache, attn_weights)

    def project(self, h: Tensor) -> Tensor:
        return project(h, self.embed.tokens, self.out_proj)


def build_captioner(cfg: CaptionConfig, lm: DecoderOnly | None = None, vision: VisionEncoder | None = None
                    ) -> Captioner:
    """The captioner of `cfg.bridge`, initialised; the frozen LM's weights from `lm` (not used by the
    encoder-decoder), the image encoder's from `vision` (a trained ViT's encoder) when given."""
    kind = {"qformer": QFormerCaptioner, "flamingo": FlamingoCaptioner,
            "encoder-decoder": EncoderDecoderCaptioner}[cfg.bridge]
    model = kind(cfg)
    init_vision(model)  # resets the LM too: its weights are loaded after
    nn.init.normal_(model.tile_embed, std=0.02)
    for module in model.modules():
        if isinstance(module, QFormer):
            nn.init.normal_(module.queries, std=0.02)
        elif isinstance(module, GatedCrossAttention):
            nn.init.zeros_(module.gate_attn)
            nn.init.zeros_(module.gate_ffn)
    if lm is not None and cfg.bridge != "encoder-decoder":
        model.lm.load_state_dict(lm.state_dict())
    if vision is not None:
        model.vision.load_state_dict(vision.state_dict())
    return model


def trained_parameters(model: nn.Module) -> int:
    """The number of parameters a training step changes (the frozen LM's excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
