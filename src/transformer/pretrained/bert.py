"""BERT (`BertForMaskedLM`, `BertForPreTraining`) -> our `EncoderOnly` (`transformer import`).

BERT's encoder is the paper's post-norm encoder with its options (the bert-base preset): learned
positions, segment (token-type) embeddings, a LayerNorm on the summed embeddings, GELU and no
embedding scale. The weights map one to one:

    bert.embeddings.{word,position,token_type}_embeddings  -> embed.{tokens, positions.learned, segments}
    bert.embeddings.LayerNorm                              -> embed.norm
    bert.encoder.layer.i.attention.self.{query,key,value}  -> encoder.layers.i.self_attn.in_proj (rows q, k, v)
    bert.encoder.layer.i.attention.output.dense/LayerNorm  -> ....self_attn.out_proj / res_attn.norm
    bert.encoder.layer.i.intermediate.dense                -> ....ffn.w1
    bert.encoder.layer.i.output.dense/LayerNorm            -> ....ffn.w2 / res_ffn.norm
    cls.predictions.transform.dense/LayerNorm              -> head.0 / head.2
    cls.predictions.decoder.bias (or .bias)                -> out_bias
    cls.predictions.decoder.weight                         -> the token embeddings (tied), or out_proj
    bert.pooler.dense, cls.seq_relationship                -> pooler, nsp_head (BertForPreTraining)

Our encoder masks the keys at `pad_id` tokens, BERT those its attention_mask says: the two agree
for right-padded inputs.
"""

from __future__ import annotations


import torch
from torch import Tensor

from transformer.config import ModelConfig
from transformer.errors import UserError
from transformer.pretrained import Converted
from transformer.pretrained.common import (activation, affine, check_vocabulary, output_projection, token_name,
                                           tokenizer_options)
from transformer.pretrained.folder import HFFolder
from transformer.text.pretrained import HubTokenizer

# BERT's special tokens: tokenizer_config.json's key and the default
SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
            "mask_token": "[MASK]"}


def convert(folder: HFFolder) -> Converted:
    """A BERT folder as our `EncoderOnly` (kind "mlm"); `UserError` for an option or tensor we do not take."""
    _check_options(folder)
    prefix = "bert." if folder.has("bert.embeddings.word_embeddings.weight") else ""
    if not folder.has("cls.predictions.transform.dense.weight"):
        raise UserError(f"{folder.path}: no masked-LM head (cls.predictions.*): a BertForMaskedLM or "
                        "BertForPreTraining checkpoint is imported, not a bare BertModel or another head")
    tokenizer = _tokenizer(folder)
    cfg = _config(folder, tokenizer)
    state = _embeddings(folder, prefix, cfg)
    for i in range(cfg.n_encoder_layers):
        state |= _layer(folder, f"{prefix}encoder.layer.{i}", f"encoder.layers.{i}", cfg.d_model, cfg.d_ff)
    out = output_projection(folder, "cls.predictions.decoder.weight", state["embed.tokens.weight"])
    state |= _heads(folder, prefix, cfg) | ({} if out is None else {"out_proj.weight": out})
    cfg = cfg.replace(tie_embeddings=out is None)
    meta = {"mlm": {"family": "bert", "architectures": folder.option("architectures")}}
    return Converted(cfg, state, tokenizer.to_bytes(), meta, "mlm")


def _check_options(folder: HFFolder) -> None:
    """`UserError` for an option of BERT our encoder does not have."""
    folder.expect("position_embedding_type", "absolute", "absolute",
                  "only absolute (learned) position embeddings are imported")
    folder.expect("is_decoder", False, False, "a causal BERT (is_decoder) is not an encoder")
    folder.expect("add_cross_attention", False, False, "an encoder here has no cross-attention")
    act = activation(folder, "hidden_act", "gelu")
    if act != "gelu":  # BERT's MLM head applies hidden_act too; ours is erf-GELU
        folder.refuse("hidden_act", folder.option("hidden_act"),
                      "the masked-LM head here applies erf-GELU (\"gelu\"), so the model's must be gelu too")


def _config(folder: HFFolder, tokenizer: HubTokenizer) -> ModelConfig:
    """Our config of the folder's config.json: the shape, BERT's options, the special ids."""
    vocab = int(folder.need("vocab_size"))
    check_vocabulary(folder, tokenizer, vocab)
    options = tokenizer_options(folder)
    cls_id, sep_id = (tokenizer.piece_to_id(token_name(options, k, SPECIALS[k])) for k in ("cls_token", "sep_token"))
    pad = folder.option("pad_token_id")
    return ModelConfig(
        arch="encoder", vocab_size=vocab, d_model=int(folder.need("hidden_size")),
        n_heads=int(folder.need("num_attention_heads")), d_ff=int(folder.need("intermediate_size")),
        n_encoder_layers=int(folder.need("num_hidden_layers")), n_decoder_layers=0,
        dropout=float(folder.option("hidden_dropout_prob", 0.1)),
        attn_dropout=float(folder.option("attention_probs_dropout_prob", 0.1)),
        positions="learned", max_len=int(folder.need("max_position_embeddings")),
        layer_norm_eps=float(folder.option("layer_norm_eps", 1e-12)), activation="gelu", scale_embedding=False,
        n_segments=int(folder.option("type_vocab_size", 2)), embed_norm=True,
        next_sentence=folder.has("cls.seq_relationship.weight"),
        pad_id=int(pad) if pad is not None else max(tokenizer.piece_to_id(SPECIALS["pad_token"]), 0),
        bos_id=max(cls_id, 0), eos_id=max(sep_id, 0),
    )


def _embeddings(folder: HFFolder, prefix: str, cfg: ModelConfig) -> dict[str, Tensor]:
    """Word, position and token-type embeddings and their LayerNorm."""
    p, d = f"{prefix}embeddings", cfg.d_model
    return {
        "embed.tokens.weight": folder.tensor(f"{p}.word_embeddings.weight", (cfg.vocab_size, d)),
        "embed.positions.learned": folder.tensor(f"{p}.position_embeddings.weight", (cfg.max_len, d)),
        "embed.segments.weight": folder.tensor(f"{p}.token_type_embeddings.weight", (cfg.n_segments, d)),
        **affine(folder, f"{p}.LayerNorm", "embed.norm", (d,)),
    }


def _layer(folder: HFFolder, theirs: str, ours: str, d: int, d_ff: int) -> dict[str, Tensor]:
    """One post-norm encoder layer: `theirs` (bert.encoder.layer.i) -> `ours` (encoder.layers.i)."""
    q, k, v = (affine(folder, f"{theirs}.attention.self.{name}", "x", (d, d)) for name in ("query", "key", "value"))
    return {
        f"{ours}.self_attn.in_proj.weight": torch.cat([q["x.weight"], k["x.weight"], v["x.weight"]]),
        f"{ours}.self_attn.in_proj.bias": torch.cat([q["x.bias"], k["x.bias"], v["x.bias"]]),
        **affine(folder, f"{theirs}.attention.output.dense", f"{ours}.self_attn.out_proj", (d, d)),
        **affine(folder, f"{theirs}.attention.output.LayerNorm", f"{ours}.res_attn.norm", (d,)),
        **affine(folder, f"{theirs}.intermediate.dense", f"{ours}.ffn.w1", (d_ff, d)),
        **affine(folder, f"{theirs}.output.dense", f"{ours}.ffn.w2", (d, d_ff)),
        **affine(folder, f"{theirs}.output.LayerNorm", f"{ours}.res_ffn.norm", (d,)),
    }


def _heads(folder: HFFolder, prefix: str, cfg: ModelConfig) -> dict[str, Tensor]:
    """The MLM head's transform and bias; the pooler and next-sentence classifier when there are."""
    d, p = cfg.d_model, "cls.predictions"
    state = {
        **affine(folder, f"{p}.transform.dense", "head.0", (d, d)),
        **affine(folder, f"{p}.transform.LayerNorm", "head.2", (d,)),
        # the decoder's bias is the one applied; it is cls.predictions.bias when tied (and then often not stored)
        "out_bias": folder.tensor(f"{p}.decoder.bias", (cfg.vocab_size,), f"{p}.bias"),
    }
    if cfg.next_sentence:
        state |= affine(folder, f"{prefix}pooler.dense", "pooler", (d, d))
        state |= affine(folder, "cls.seq_relationship", "nsp_head", (2, d))
    return state


def _tokenizer(folder: HFFolder) -> HubTokenizer:
    """The folder's tokenizer.json, or else its vocab.txt as BERT's WordPiece (tokenizer_config.json's
    do_lower_case, strip_accents, tokenize_chinese_chars and special tokens)."""
    options = tokenizer_options(folder)
    unk = token_name(options, "unk_token", SPECIALS["unk_token"])
    file = folder.file("tokenizer.json")
    if file is not None:
        return HubTokenizer.from_file(file, unk)
    vocab = folder.file("vocab.txt")
    if vocab is None:
        raise UserError(f"{folder.path}: no tokenizer (tokenizer.json, or BERT's vocab.txt)")
    specials = [token_name(options, key, default) for key, default in SPECIALS.items()]
    return HubTokenizer.wordpiece(vocab, specials, unk, lowercase=bool(options.get("do_lower_case", True)),
                                  strip_accents=options.get("strip_accents"),
                                  chinese_chars=bool(options.get("tokenize_chinese_chars", True)))
