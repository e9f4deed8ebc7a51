"""The three assemblies: EncoderDecoder (translation), EncoderOnly (BERT-style), DecoderOnly (GPT-style).

`forward` returns logits. Loss, search, optimiser, precision and parallelism live in
other modules. Inputs are right-padded (B, T) token ids; padding masks are derived
from `cfg.pad_id`. Attention weights are returned through an optional dict the caller
passes in (`attn_weights`); nothing is stored on the modules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.config import ModelConfig
from transformer.model.attention import padding_mask
from transformer.model.cache import KVCache
from transformer.model.dropout import Dropout
from transformer.model.layers import DecoderLayer, EncoderLayer, PositionalEncoding
from transformer.model.paged import PagedBatch

AttnWeights = dict[str, list[Tensor]]


def project(h: Tensor, tokens: nn.Embedding, out_proj: nn.Linear | None, bias: Tensor | None = None) -> Tensor:
    """(..., d_model) -> logits (..., vocab): with the token embedding matrix when tied (section 3.4),
    else with the untied projection `out_proj`."""
    return F.linear(h, out_proj.weight if out_proj is not None else tokens.weight, bias)


class Embedding(nn.Module):
    """Token embedding × sqrt(d_model), plus positional encoding, then dropout (sections 3.4, 3.5, 5.4).

    Options of the family (`ModelConfig`): no scale (`scale_embedding` off), segment embeddings added
    (`n_segments`, BERT's token types), a LayerNorm before the dropout (`embed_norm`, BERT).
    """

    def __init__(self, cfg: ModelConfig, tokens: nn.Embedding | None = None) -> None:
        super().__init__()
        self.tokens = tokens if tokens is not None else nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.positions = PositionalEncoding(cfg)
        self.segments = nn.Embedding(cfg.n_segments, cfg.d_model) if cfg.n_segments else None
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.embed_norm else None
        self.dropout = Dropout(cfg.dropout)  # 16-bit masks (dropout.py)
        self.scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0

    def forward(self, ids: Tensor, offset: int | Tensor = 0, segments: Tensor | None = None) -> Tensor:
        """ids (B, T) at positions offset.. (one offset, or one per row (B,)), segments (B, T) or None
        (all segment 0) -> (B, T, d_model)"""
        x = self.tokens(ids)
        if self.scale != 1.0:
            x = x * self.scale
        x = self.positions(x, offset)
        if self.segments is not None:
            x = x + (self.segments(segments) if segments is not None else self.segments.weight[0])
        return self.dropout(self.norm(x) if self.norm is not None else x)


class Encoder(nn.Module):
    """N encoder layers; a final LayerNorm only with pre-norm (post-norm output is normalised already)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.norm_first else None

    def forward(self, x: Tensor, pad_mask: Tensor, attn_weights: AttnWeights | None = None) -> Tensor:
        """x (B, S, d_model), pad_mask (B, 1, 1, S) -> (B, S, d_model)"""
        for layer in self.layers:  # the layers add the window (attn_window) to the padding mask
            x, w = layer(x, pad_mask, need_weights=attn_weights is not None)
            if attn_weights is not None:
                attn_weights.setdefault("encoder", []).append(w)
        return self.norm(x) if self.norm is not None else x


class Decoder(nn.Module):
    """N decoder layers with causal self-attention and (when `cross`) encoder-decoder attention."""

    def __init__(self, cfg: ModelConfig, cross: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg, cross) for _ in range(cfg.n_decoder_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.norm_first else None

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        cache: KVCache | None = None,
        attn_weights: AttnWeights | None = None,
    ) -> Tensor:
        """x (B, T, d_model) follows `cache.length` cached positions; memory (B, S, d_model).

        A cached step of one position without attention weights takes the lean path
        (`DecoderLayer.step`), in train mode too (with the same dropout), where memory may also
        be (B / K, S, d_model), one row per K beams.
        """
        if cache is not None and x.size(1) == 1 and attn_weights is None:
            return self._step(x, memory, memory_mask, cache)
        for i, layer in enumerate(self.layers):  # the layers' self-attention is causal (and windowed)
            x, self_w, cross_w = layer(
                x,
                None,
                memory,
                memory_mask,
                self_cache=cache.self_attn[i] if cache is not None else None,
                cross_cache=cache.cross_attn[i] if cache is not None else None,
                need_weights=attn_weights is not None,
            )
            if attn_weights is not None:
                attn_weights.setdefault("decoder", []).append(self_w)
                if cross_w is not None:
                    attn_weights.setdefault("cross", []).append(cross_w)
        return self.norm(x) if self.norm is not None else x

    def _step(self, x: Tensor, memory: Tensor | None, memory_mask: Tensor | None, cache: KVCache) -> Tensor:
        """One cached position: x (B, 1, d_model) -> (B, 1, d_model); dropout as `forward` in train mode."""
        h = x[:, 0]  # (B, d_model)
        for layer, self_cache, cross_cache in zip(self.layers, cache.self_attn, cache.cross_attn):
            h = layer.step(h, self_cache, cross_cache, memory, memory_mask)
        if self.norm is not None:
            h = self.norm(h)
        return h[:, None]


class EncoderDecoder(nn.Module):
    """The paper's model (Figure 1) for translation."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tgt_embed = Embedding(cfg)
        # Tied: one matrix for source embedding, target embedding and output projection (section 3.4).
        self.src_embed = Embedding(cfg, self.tgt_embed.tokens if cfg.tie_embeddings else None)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg, cross=True)
        self.out_proj = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.out_bias = nn.Parameter(torch.zeros(cfg.vocab_size)) if cfg.logits_bias else None

    def encode(self, src: Tensor, attn_weights: AttnWeights | None = None) -> tuple[Tensor, Tensor]:
        """src (B, S) -> memory (B, S, d_model) and its padding mask (B, 1, 1, S)."""
        mask = padding_mask(src, self.cfg.pad_id)
        return self.encoder(self.src_embed(src), mask, attn_weights), mask

    def decode(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_mask: Tensor,
        cache: KVCache | None = None,
        attn_weights: AttnWeights | None = None,
    ) -> Tensor:
        """tgt (B, T) continuing `cache` -> decoder output (B, T, d_model), before the projection."""
        offset = cache.length if cache is not None else 0
        return self.decoder(self.tgt_embed(tgt, offset), memory, memory_mask, cache, attn_weights)

    def project(self, h: Tensor) -> Tensor:
        """(B, T, d_model) -> logits (B, T, vocab)"""
        return project(h, self.tgt_embed.tokens, self.out_proj, self.out_bias)

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_decoder_layers)

    # A cached step (`decode` of one position with a cache, no attention weights) takes memory
    # (B, S, d_model) with tgt (B·K, 1), the K beams of a sentence attending to its one row, in
    # either mode (`Decoder`'s lean step path); the searches' `Seq2Seq` protocol.
    beams_share_memory = True

    def forward(self, src: Tensor, tgt: Tensor, attn_weights: AttnWeights | None = None) -> Tensor:
        """src (B, S), tgt (B, T) (shifted right, starting with BOS) -> logits (B, T, vocab)"""
        memory, memory_mask = self.encode(src, attn_weights)
        return self.project(self.decode(tgt, memory, memory_mask, attn_weights=attn_weights))


class DecoderOnly(nn.Module):
    """GPT-style causal language model: the decoder stack without cross-attention."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.decoder = Decoder(cfg, cross=False)
        self.out_proj = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.out_bias = nn.Parameter(torch.zeros(cfg.vocab_size)) if cfg.logits_bias else None

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_decoder_layers)

    def forward(
        self, tokens: Tensor, cache: KVCache | PagedBatch | None = None, attn_weights: AttnWeights | None = None
    ) -> Tensor:
        """tokens (B, T) continuing `cache` -> logits (B, T, vocab).

        The cache is a `KVCache` (every row at the same position: `sample`) or a `PagedBatch` (each row a
        sequence of the block pool at its own position: the continuous batching of `inference.scheduler`).
        """
        offset = cache.length if cache is not None else 0
        h = self.decoder(self.embed(tokens, offset), cache=cache, attn_weights=attn_weights)
        return project(h, self.embed.tokens, self.out_proj, self.out_bias)


class EncoderOnly(nn.Module):
    """BERT-style bidirectional encoder with a masked-LM head.

    The head follows BERT (Devlin et al., 2019): dense, GELU, LayerNorm, then the
    (tied) vocabulary projection with a bias. The blocks are the paper's (ReLU FFN) unless the
    config asks for BERT's options (`activation` gelu, `n_segments`, `embed_norm`: the bert-base preset).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.encoder = Encoder(cfg)
        self.head = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.d_model), nn.GELU(), nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        )
        self.out_proj = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.out_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        # BERT's next-sentence prediction: a pooler (dense, tanh) on [CLS], then IsNext / NotNext logits
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model) if cfg.next_sentence else None
        self.nsp_head = nn.Linear(cfg.d_model, 2) if cfg.next_sentence else None

    def hidden(self, tokens: Tensor, attn_weights: AttnWeights | None = None, segments: Tensor | None = None
               ) -> Tensor:
        """tokens (B, T), segments (B, T) or None (all 0) -> the encoder's output (B, T, d_model)"""
        x = self.embed(tokens, segments=segments)
        return self.encoder(x, padding_mask(tokens, self.cfg.pad_id), attn_weights)

    def logits(self, h: Tensor) -> Tensor:
        """The MLM head and vocabulary projection of hidden states (..., d_model) -> (..., vocab)"""
        return project(self.head(h), self.embed.tokens, self.out_proj, self.out_bias)

    def next_sentence(self, h: Tensor) -> Tensor:
        """Hidden states (B, T, d_model) -> next-sentence logits (B, 2) from [CLS] (position 0): IsNext, NotNext."""
        if self.pooler is None:
            raise ValueError("this model has no next-sentence head (next_sentence is off)")
        return self.nsp_head(torch.tanh(self.pooler(h[:, 0])))

    def forward(self, tokens: Tensor, attn_weights: AttnWeights | None = None) -> Tensor:
        """tokens (B, T) -> logits (B, T, vocab)"""
        return self.logits(self.hidden(tokens, attn_weights))


def init_weights(model: nn.Module) -> None:
    """Initialise in place. The paper gives no scheme; we follow common practice:

    Xavier-uniform linear weights and zero biases (as `nn.Transformer`), embeddings
    N(0, d_model^-0.5) so that after the sqrt(d_model) scale they have unit variance,
    learned positions N(0, 0.02), LayerNorm at (1, 0).
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=module.embedding_dim**-0.5)
        elif isinstance(module, PositionalEncoding) and module.learned is not None:
            nn.init.normal_(module.learned, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def build_model(cfg: ModelConfig) -> nn.Module:
    """The assembly named by `cfg.arch`, initialised."""
    model_class = {"encoder-decoder": EncoderDecoder, "encoder": EncoderOnly, "decoder": DecoderOnly}[cfg.arch]
    model = model_class(cfg)
    init_weights(model)
    return model


def _numel(module: nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts per component; shared (tied) tensors are counted once in `total`."""
    counts: dict[str, int] = {}
    seen: set[int] = set()
    for name, child in model.named_children():
        n = sum(p.numel() for p in child.parameters() if id(p) not in seen)
        seen.update(id(p) for p in child.parameters())
        if n:
            key = "embeddings" if isinstance(child, Embedding) else name
            counts[key] = counts.get(key, 0) + n
    for name, p in model.named_parameters(recurse=False):
        counts[name] = p.numel()
    counts["total"] = sum(p.numel() for p in model.parameters())  # parameters() deduplicates
    layer = next((m for m in model.modules() if isinstance(m, (EncoderLayer, DecoderLayer))), None)
    if layer is not None:
        counts["per_attention_block"] = _numel(layer.self_attn)
        counts["per_ffn_block"] = _numel(layer.ffn)
    for stack in ("encoder", "decoder"):
        sub = getattr(model, stack, None)
        if sub is not None and len(sub.layers):
            counts[f"per_{stack}_layer"] = _numel(sub.layers[0])
    return counts
