"""Import of a Marian / OPUS-MT checkpoint (`MarianMTModel`) into our `EncoderDecoder`, exactly.

MarianMT is the paper's post-norm Transformer with options our config has: the FFN's activation
(OPUS-MT's swish), the sqrt(d_model) embedding scale, a bias on the output projection
(`final_logits_bias`), tied or untied embeddings. Two things differ in layout, as for the export
(`export/huggingface.py`, whose tensor layout this module reads backwards):

- **Positions.** Marian's sinusoids hold sin in the first d_model/2 coordinates and cos in the second
  half, ours interleave them. The export's permutation `marian_permutation` maps our coordinates onto
  Marian's; its inverse maps every weight that reads or writes the residual stream back onto ours.
- **Tokens.** OPUS-MT's ids are those of vocab.json (``</s>`` 0, ``<unk>`` 1, ..., ``<pad>`` last); its
  two SentencePiece models (source.spm, target.spm) give pieces, which vocab.json maps to ids
  (`text.pretrained.MarianTokenizer`). Decoding starts from `decoder_start_token_id`, the pad token,
  which becomes our BOS; our searches never emit the pad token (as OPUS-MT's ``bad_words_ids``).

What MarianMT checkpoints never have (pre-norm, a final or embedding LayerNorm, learned positions,
separate source and target vocabularies) is refused on one line naming the option.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from transformer.config import ModelConfig
from transformer.errors import UserError
from transformer.export.huggingface import MARIAN_ACTIVATIONS, marian_layout, marian_permutation, permuted
from transformer.model.models import EncoderDecoder
from transformer.pretrained import Converted
from transformer.pretrained.folder import HFFolder, read_json
from transformer.text.pretrained import MarianTokenizer

# Options of the BART family that MarianMT checkpoints hold at one value: (option, MarianMT's value, why not)
MARIAN_ONLY = (
    ("normalize_before", False, "pre-norm layers (mBART's): MarianMT's layers are post-norm"),
    ("add_final_layer_norm", False, "a final LayerNorm (mBART's): MarianMT has none"),
    ("normalize_embedding", False, "a LayerNorm on the embeddings: MarianMT has none"),
    ("layernorm_embedding", False, "a LayerNorm on the embeddings: MarianMT has none"),
    ("add_bias_logits", False, "a second logits bias: MarianMT has only final_logits_bias"),
    ("static_position_embeddings", True, "learned positions: MarianMT's are sinusoidal"),
)


def _int(folder: HFFolder, key: str) -> int:
    value = folder.need(key)
    if isinstance(value, bool) or not isinstance(value, int):
        folder.refuse(key, value, "not an integer")
    return value


def _same(folder: HFFolder, encoder_key: str, decoder_key: str) -> int:
    """The encoder's and decoder's value of an option that our config has once (heads, FFN width)."""
    value = _int(folder, encoder_key)
    if folder.option(decoder_key, value) != value:
        folder.refuse(decoder_key, folder.option(decoder_key), f"differs from {encoder_key} {value}: "
                      "our encoder and decoder share one value")
    return value


def _check_options(folder: HFFolder) -> tuple[int, int, str]:
    """(vocab_size, d_model, our activation) of config.json, after refusing what our config cannot express."""
    for key, wanted, why in MARIAN_ONLY:
        folder.expect(key, wanted, wanted, why)
    vocab_size, d_model = _int(folder, "vocab_size"), _int(folder, "d_model")
    if folder.option("decoder_vocab_size") not in (None, vocab_size):
        folder.refuse("decoder_vocab_size", folder.option("decoder_vocab_size"),
                      f"a target vocabulary apart from the source's ({vocab_size}): ours is one vocabulary")
    if d_model % 2:
        folder.refuse("d_model", d_model, "odd: Marian's sinusoids need an even width")
    activation = folder.option("activation_function", "gelu")  # MarianConfig's defaults where absent
    if activation not in MARIAN_ACTIVATIONS:
        folder.refuse("activation_function", activation, f"choose one of {', '.join(MARIAN_ACTIVATIONS)}")
    eos = folder.option("eos_token_id", 0)
    if not isinstance(eos, int) or isinstance(eos, bool):
        folder.refuse("eos_token_id", eos, "one end-of-sentence id is needed")
    return vocab_size, d_model, MARIAN_ACTIVATIONS[activation]


def _config(folder: HFFolder, checked: tuple[int, int, str], tied: bool, logits_bias: bool) -> ModelConfig:
    """Our config of the checkpoint's config.json, `checked` by `_check_options`; `UserError` naming what
    is wrong."""
    vocab_size, d_model, activation = checked
    pad = folder.option("pad_token_id", 58100)
    try:
        return ModelConfig(
            arch="encoder-decoder", vocab_size=vocab_size, d_model=d_model,
            n_heads=_same(folder, "encoder_attention_heads", "decoder_attention_heads"),
            d_ff=_same(folder, "encoder_ffn_dim", "decoder_ffn_dim"),
            n_encoder_layers=_int(folder, "encoder_layers"), n_decoder_layers=_int(folder, "decoder_layers"),
            dropout=float(folder.option("dropout", 0.1)), attn_dropout=float(folder.option("attention_dropout", 0.0)),
            act_dropout=float(folder.option("activation_dropout", 0.0)), norm_first=False, positions="sinusoidal",
            max_len=_int(folder, "max_position_embeddings"), tie_embeddings=tied, layer_norm_eps=1e-5,
            activation=activation, scale_embedding=bool(folder.option("scale_embedding", False)),
            logits_bias=logits_bias, pad_id=pad, bos_id=folder.option("decoder_start_token_id", pad),
            eos_id=folder.option("eos_token_id", 0),
        )
    except (UserError, TypeError, ValueError) as e:
        raise UserError(f"{folder.path / 'config.json'}: {e}") from None


def _embeddings(folder: HFFolder, v: int, d: int) -> tuple[Tensor, Tensor, Tensor]:
    """(encoder embedding, decoder embedding, output projection), each (V, d) in Marian's coordinates, as
    MarianMTModel (transformers 5) ties them: only with tie_word_embeddings, where the three are `shared`
    (share_encoder_decoder_embeddings) or the projection is the decoder's embedding; else each its own."""
    enc, dec, shared = "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "model.shared.weight"
    if not folder.option("tie_word_embeddings", True):
        head = folder.tensor("lm_head.weight", (v, d))
        return folder.tensor(enc, (v, d), shared), folder.tensor(dec, (v, d), shared), head
    if folder.option("share_encoder_decoder_embeddings", True):
        src = tgt = folder.tensor(shared, (v, d), dec, enc)
    else:
        src, tgt = folder.tensor(enc, (v, d)), folder.tensor(dec, (v, d))
    return src, tgt, tgt


def _layers(folder: HFFolder, cfg: ModelConfig, inverse: Tensor) -> dict[str, Tensor]:
    """Our encoder and decoder layers' tensors from Marian's (`marian_layout` read backwards): the three
    (d, d) q/k/v projections stacked into our fused in_proj, the d_model coordinates put back in our order."""
    with torch.device("meta"):  # our shapes, without allocating a model
        shapes = {name: tuple(t.shape) for name, t in EncoderDecoder(cfg).state_dict().items()}
    parts: dict[str, list[tuple[int, Tensor]]] = {}
    for theirs, ours, rows, axis in marian_layout(cfg):
        shape = shapes[ours] if rows is None else (rows[1] - rows[0], *shapes[ours][1:])
        parts.setdefault(ours, []).append((rows[0] if rows else 0, permuted(folder.tensor(theirs, shape), axis,
                                                                             inverse)))
    return {ours: torch.cat([t for _, t in sorted(chunks, key=lambda c: c[0])]) for ours, chunks in parts.items()}


def _token_string(config: dict[str, Any], key: str, default: str) -> str:
    """A special token of tokenizer_config.json: a string, or an AddedToken's object with its "content"."""
    value = config.get(key, default)
    return str(value.get("content", default)) if isinstance(value, dict) else str(value)


def _tokenizer(folder: HFFolder, cfg: ModelConfig) -> tuple[MarianTokenizer, dict[str, Any]]:
    """Our `MarianTokenizer` of source.spm, target.spm and vocab.json, and tokenizer_config.json's languages."""
    config_file = folder.file("tokenizer_config.json")
    config = read_json(config_file) if config_file is not None else {}
    if not isinstance(config, dict):
        raise UserError(f"{config_file}: not a JSON object")
    if config.get("separate_vocabs"):
        raise UserError(f"{config_file}: separate_vocabs true: a target vocabulary apart from the source's "
                        "cannot be imported (ours is one vocabulary)")
    files = {}
    for name in ("source.spm", "target.spm", "vocab.json"):
        files[name] = folder.file(name)
        if files[name] is None:
            raise UserError(f"{folder.path / name}: no such file (a Marian folder has its tokenizer files)")
    vocab = read_json(files["vocab.json"])
    if not isinstance(vocab, dict) or not all(isinstance(i, int) and 0 <= i < cfg.vocab_size for i in vocab.values()):
        raise UserError(f"{files['vocab.json']}: not an object of pieces to ids below vocab_size {cfg.vocab_size}")
    ids = {}
    for key, default, wanted in (("unk_token", "<unk>", None), ("pad_token", "<pad>", cfg.pad_id),
                                 ("eos_token", "</s>", cfg.eos_id)):
        piece = _token_string(config, key, default)
        if piece not in vocab or wanted not in (None, vocab[piece]):
            raise UserError(f"{files['vocab.json']}: {key} {piece!r} is {vocab.get(piece, 'absent')}"
                            f"{'' if wanted is None else f', config.json says id {wanted}'}")
        ids[key] = vocab[piece]
    try:
        tokenizer = MarianTokenizer(files["source.spm"].read_bytes(), files["target.spm"].read_bytes(), vocab,
                                    ids["unk_token"], sorted(set(ids.values())))  # decode drops them, as HF's
    except (OSError, ValueError) as e:
        raise UserError(f"{folder.path}: cannot read the SentencePiece models: {e}") from None
    languages = {key: config[key] for key in ("source_lang", "target_lang") if isinstance(config.get(key), str)}
    return tokenizer, languages


def convert(folder: HFFolder) -> Converted:
    """The `MarianMTModel` checkpoint of `folder` as our translation model (module docstring)."""
    checked = _check_options(folder)
    v, d, _ = checked
    src, tgt, head = _embeddings(folder, v, d)
    bias = folder.tensor("final_logits_bias", (1, v))[0] if folder.has("final_logits_bias") else torch.zeros(v)
    tied = torch.equal(src, tgt) and torch.equal(tgt, head)
    cfg = _config(folder, checked, tied, logits_bias=bool(bias.any()))
    inverse = torch.argsort(marian_permutation(d))
    state = _layers(folder, cfg, inverse)
    state["src_embed.tokens.weight"] = permuted(src, "cols", inverse)
    state["tgt_embed.tokens.weight"] = permuted(tgt, "cols", inverse)
    if not tied:
        state["out_proj.weight"] = permuted(head, "cols", inverse)
    if cfg.logits_bias:
        state["out_bias"] = bias
    tokenizer, languages = _tokenizer(folder, cfg)
    meta = {"translation": None, "marian": languages}
    return Converted(cfg, {k: t.contiguous() for k, t in state.items()}, tokenizer.to_bytes(), meta, "translation")
