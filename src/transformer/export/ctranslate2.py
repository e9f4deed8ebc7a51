"""Export to CTranslate2, with its own specification classes and converter machinery.

`TransformerConverter` is a `ctranslate2.converters.Converter`: its `_load` fills CTranslate2's
`TransformerSpec` (translation) or `TransformerDecoderModelSpec` (decoder-only LM) from our
model, and the base class validates, quantizes and writes it (model.bin, config.json, the
vocabulary). What the spec is told, so that CTranslate2 computes what our model computes:

- post-norm or pre-norm as trained (`pre_norm`); pre-norm's final LayerNorm of each stack;
- the position table given explicitly (`position_encodings.encodings`): our interleaved
  sinusoids (PE[pos, 2i] = sin, PE[pos, 2i+1] = cos), or the learned table, row p for
  position p. CTranslate2's built-in sinusoids are another table (checked against its scores:
  tensor2tensor's, sin and cos in halves, frequencies 10000^(-i/(d/2-1)), from position 1);
- the embedding scale sqrt(d_model) (`scale_embeddings`), or none (`scale_embedding` off);
- the FFN's activation (ReLU, GELU, its tanh form, swish) and the output projection's bias
  (`logits_bias`, an imported Marian model's final_logits_bias);
- tied embeddings: the one matrix as source and target embedding and output projection
  (CTranslate2 stores it once, as aliases); untied models get their three matrices;
- attention as one fused Q,K,V projection (self-attention) or Q and a fused K,V projection
  (cross-attention), exactly our `in_proj` rows;
- the shared vocabulary: the sentencepiece pieces in id order, so token i is our id i;
- the decoder starts from our BOS (`<s>`; an imported Marian model's pad token) and the source
  gets our EOS (`</s>`) appended,
  as `text.data.collate_source` does; LayerNorm epsilon from the config.

int8 weights lie on the grid [-64, 64] of each row (scale 64 / max|row|), not CTranslate2's
[-127, 127]: the int8 products of oneDNN's kernel for CPUs without VNNI (AMD's AVX2 CPUs, where
CTranslate2 uses it) saturate in 16 bits beyond that, and every other backend computes the same
exact products (`inference/ctranslate2.py`).

The folder also holds `tokenizer.model` (our sentencepiece model) and `transformer.json`
(our model config), so it can be used with ctranslate2 + sentencepiece alone, and
`inference.ctranslate2` recognises it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from ctranslate2.converters import Converter
from ctranslate2.specs import common_spec, transformer_spec
from ctranslate2.specs.model_spec import NumpyVariable, Variable, visit_spec
from torch import nn

from transformer.config import ModelConfig
from transformer.errors import UserError
from transformer.export import QUANTIZATIONS
from transformer.files import write_folder
from transformer.inference.ctranslate2 import INT8_MAX
from transformer.store.kinds import CT2_CONFIG, CT2_TOKENIZER
from transformer.model.layers import DecoderLayer, EncoderLayer, PositionalEncoding
from transformer.model.models import Decoder, DecoderOnly, Embedding, Encoder, EncoderDecoder
from transformer.text.pretrained import MarianTokenizer
from transformer.text.tokenizer import Tokenizer



# CTranslate2's FFN activations for ours (its GELU is erf's, GELUTanh the tanh approximation)
ACTIVATIONS = {"relu": common_spec.Activation.RELU, "gelu": common_spec.Activation.GELU,
               "gelu_tanh": common_spec.Activation.GELUTanh, "swish": common_spec.Activation.SWISH}


def _refusal(cfg: ModelConfig) -> str | None:
    """Why CTranslate2 cannot run a model of config `cfg` exactly, or None."""
    if cfg.arch == "encoder":
        return "an encoder-only (BERT-style) model with an MLM head: CTranslate2 has no such model type"
    if cfg.n_segments:
        return f"segment embeddings (n_segments {cfg.n_segments}): CTranslate2's Transformer has none"
    if cfg.embed_norm:
        return "a LayerNorm on the embeddings (embed_norm): not exported to CTranslate2"
    if cfg.attn_window is not None:
        return (f"windowed attention (attn_window {cfg.attn_window}): CTranslate2's sliding_window only "
                "bounds a decoder's cache, it cannot express a symmetric window in the encoder")
    return None


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy().copy()


def _linear(spec, linear: nn.Linear) -> None:
    spec.weight = _array(linear.weight)
    if linear.bias is not None:
        spec.bias = _array(linear.bias)


def _layer_norm(spec, norm: nn.LayerNorm) -> None:
    spec.gamma, spec.beta = _array(norm.weight), _array(norm.bias)


def _self_attention(spec, layer: EncoderLayer | DecoderLayer) -> None:
    """Our fused (3·d_model, d_model) in_proj is CTranslate2's fused Q,K,V linear[0], in the same order."""
    attn = layer.self_attn
    spec.linear[0].weight, spec.linear[0].bias = _array(attn.in_proj.weight), _array(attn.in_proj.bias)
    _linear(spec.linear[1], attn.out_proj)
    _layer_norm(spec.layer_norm, layer.res_attn.norm if isinstance(layer, EncoderLayer) else layer.res_self.norm)


def _cross_attention(spec, layer: DecoderLayer) -> None:
    """Queries from in_proj's first d_model rows (linear[0]), keys and values from the rest (linear[1])."""
    w, b, d = layer.cross_attn.in_proj.weight, layer.cross_attn.in_proj.bias, layer.cross_attn.out_proj.in_features
    spec.linear[0].weight, spec.linear[0].bias = _array(w[:d]), _array(b[:d])
    spec.linear[1].weight, spec.linear[1].bias = _array(w[d:]), _array(b[d:])
    _linear(spec.linear[2], layer.cross_attn.out_proj)
    _layer_norm(spec.layer_norm, layer.res_cross.norm)


def _ffn(spec, layer: EncoderLayer | DecoderLayer) -> None:
    _linear(spec.linear_0, layer.ffn.w1)
    _linear(spec.linear_1, layer.ffn.w2)
    _layer_norm(spec.layer_norm, layer.res_ffn.norm)


def _inputs(spec, tokens: nn.Embedding, positions: PositionalEncoding, cfg: ModelConfig) -> None:
    """Token embedding, its sqrt(d_model) scale (or none: `scale_embedding`) and the explicit position table
    (row p: position p)."""
    embeddings = spec.embeddings[0] if isinstance(spec.embeddings, list) else spec.embeddings
    embeddings.weight = _array(tokens.weight)
    spec.scale_embeddings = math.sqrt(cfg.d_model) if cfg.scale_embedding else False
    spec.position_encodings.encodings = _array(positions.learned if positions.learned is not None else positions.table)


def _stack(spec, stack: Encoder | Decoder, embedding: Embedding, cfg: ModelConfig) -> None:
    """An encoder or decoder stack of ours into its CTranslate2 layer spec."""
    _inputs(spec, embedding.tokens, embedding.positions, cfg)
    for layer_spec, layer in zip(spec.layer, stack.layers):
        _self_attention(layer_spec.self_attention, layer)
        if isinstance(layer, DecoderLayer) and layer.cross_attn is not None:
            _cross_attention(layer_spec.attention, layer)
        _ffn(layer_spec.ffn, layer)
    if stack.norm is not None:  # pre-norm's final LayerNorm
        _layer_norm(spec.layer_norm, stack.norm)


def _projection(spec, model: EncoderDecoder | DecoderOnly, tokens: nn.Embedding) -> None:
    spec.projection.weight = _array(model.out_proj.weight if model.out_proj is not None else tokens.weight)
    if model.out_bias is not None:  # `logits_bias` (Marian's final_logits_bias)
        spec.projection.bias = _array(model.out_bias)


class _Int8Grid:
    """CTranslate2's model spec, whose int8 weights are rounded to [-INT8_MAX, INT8_MAX] per row."""

    def optimize(self, quantization: str | None = None) -> None:
        floats = {}  # (layer spec, name) -> the float weight of each matrix CTranslate2 can quantize

        def keep(spec, scope: str, value) -> None:
            name = scope.split("/")[-1]
            if isinstance(value, Variable) and not value.is_scalar() and hasattr(spec, f"{name}_scale"):
                floats[id(spec), name] = (spec, name, value.to("float32").numpy().copy())

        visit_spec(self, keep)
        super().optimize(quantization)  # aliases tied matrices, quantizes to [-127, 127]
        for spec, name, weight in floats.values():
            if isinstance(getattr(spec, name), Variable) and getattr(spec, name).dtype == "int8":
                scale = (INT8_MAX / np.maximum(np.abs(weight).max(axis=1), 1e-30)).astype(np.float32)
                setattr(spec, name, NumpyVariable(np.rint(weight * scale[:, None]).astype(np.int8)))
                setattr(spec, f"{name}_scale", NumpyVariable(scale))


class _TransformerSpec(_Int8Grid, transformer_spec.TransformerSpec):
    pass


class _DecoderModelSpec(_Int8Grid, transformer_spec.TransformerDecoderModelSpec):
    pass


class TransformerConverter(Converter):
    """Our `EncoderDecoder` or `DecoderOnly` as a CTranslate2 model (see the module docstring).

    `convert(output_dir, quantization=...)` (from `Converter`) validates, quantizes and writes it.
    Raises `UserError` naming the feature when CTranslate2 cannot express the model.
    """

    def __init__(self, model: EncoderDecoder | DecoderOnly, vocabulary: Sequence[str], unk: int = Tokenizer.UNK
                 ) -> None:
        """`vocabulary[i]`: the token string of id i (a tokenizer's pieces, in id order); `unk`: the unknown
        token's id."""
        why = _refusal(model.cfg)
        if why is not None:
            raise UserError(f"cannot export to CTranslate2: {why}")
        self.model, self.cfg, self.vocabulary, self.unk = model, model.cfg, list(vocabulary), unk
        if len(self.vocabulary) != self.cfg.vocab_size:
            raise UserError(f"the tokenizer has {len(self.vocabulary)} pieces, the model {self.cfg.vocab_size} ids")

    def _load(self):
        cfg, model, vocabulary = self.cfg, self.model, self.vocabulary
        activation = ACTIVATIONS[cfg.activation]
        if cfg.arch == "decoder":
            decoder = transformer_spec.TransformerDecoderSpec(
                cfg.n_decoder_layers, cfg.n_heads, pre_norm=cfg.norm_first, with_encoder_attention=False,
                activation=activation)
            spec = _DecoderModelSpec(decoder)
            _stack(spec.decoder, model.decoder, model.embed, cfg)
            _projection(spec.decoder, model, model.embed.tokens)
            spec.register_vocabulary(vocabulary)
        else:
            spec = _TransformerSpec(
                transformer_spec.TransformerEncoderSpec(cfg.n_encoder_layers, cfg.n_heads, pre_norm=cfg.norm_first,
                                                        activation=activation),
                transformer_spec.TransformerDecoderSpec(cfg.n_decoder_layers, cfg.n_heads, pre_norm=cfg.norm_first,
                                                        activation=activation),
            )
            _stack(spec.encoder, model.encoder, model.src_embed, cfg)
            _stack(spec.decoder, model.decoder, model.tgt_embed, cfg)
            _projection(spec.decoder, model, model.tgt_embed.tokens)
            spec.register_source_vocabulary(vocabulary)
            spec.register_target_vocabulary(vocabulary)
            spec.config.decoder_start_token = vocabulary[cfg.bos_id]  # our BOS starts the target
            spec.config.add_source_eos = True  # our sources end with EOS (text.data.collate_source)
        spec.config.bos_token, spec.config.eos_token = vocabulary[cfg.bos_id], vocabulary[cfg.eos_id]
        spec.config.unk_token = vocabulary[self.unk]
        spec.config.layer_norm_epsilon = cfg.layer_norm_eps
        return spec


def export_ctranslate2(
    model: EncoderDecoder | DecoderOnly, tokenizer: Tokenizer, out: Path, quantization: str | None = None
) -> None:
    """Write the CTranslate2 folder `out` (new or empty) for `model`, weights stored as `quantization`
    (one of `QUANTIZATIONS`; None = float32), with the tokenizer and our config beside them."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise UserError(f"`quantization` {quantization}: choose one of {', '.join(QUANTIZATIONS)}")
    unk = tokenizer.unk if isinstance(tokenizer, MarianTokenizer) else Tokenizer.UNK  # an imported one's own
    conv = TransformerConverter(model, [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)], unk)

    def fill(tmp: Path) -> None:
        conv.convert(str(tmp), quantization=quantization, force=True)
        (tmp / CT2_TOKENIZER).write_bytes(tokenizer.to_bytes())
        meta = {"model": model.cfg.to_dict(), "quantization": quantization or "float32"}
        if meta["quantization"].startswith("int8"):
            meta["int8_max"] = INT8_MAX  # read by inference.ctranslate2
        (tmp / CT2_CONFIG).write_text(json.dumps(meta, indent=2), encoding="utf-8")  # beside CTranslate2's config.json

    write_folder(out, fill)
