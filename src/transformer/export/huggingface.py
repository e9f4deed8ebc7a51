"""Export a translation model as a Hugging Face Marian folder.

`MarianMTModel.from_pretrained(out)` and `MarianTokenizer.from_pretrained(out)` load it, without
`trust_remote_code`. Marian is the paper's post-norm Transformer with sinusoidal positions, and
has our options of the family (the FFN's activation, the sqrt(d_model) embedding scale or none,
tied or untied embeddings, a logits bias: `final_logits_bias`), so our model maps onto it exactly,
with two things to reconcile:

- **Positions.** Marian's table holds sin in the first d_model/2 coordinates and cos in the
  second half, and it is regenerated on load (not stored); ours interleaves them
  (PE[pos, 2i] = sin, PE[pos, 2i+1] = cos). One permutation of the d_model coordinates,
  `marian[c] = ours[perm[c]]` with perm = (0, 2, 4, ..., 1, 3, 5, ...), maps one onto the
  other. Applied to every weight that reads or writes the residual stream (embedding columns,
  input columns of Q/K/V and FFN-in, output rows and biases of attention-out and FFN-out,
  LayerNorm gain and bias), it gives a network that computes the same function: LayerNorm,
  residual sums and dot products are unchanged by a permutation of the coordinates.
- **Tokens.** `vocab.json` maps each sentencepiece piece to our id, and `MarianTokenizer` appends
  `</s>` to the source, as our `collate_source` does. Marian starts decoding from
  `decoder_start_token_id`, usually its pad id; here it is our BOS (`<s>`, 2, with pad `<pad>`, 0;
  an imported OPUS-MT model's pad token), and generation forbids pad (`bad_words_ids`), as our
  search does. An imported model's own tokenizer files (two SentencePiece models) are written back.

The tensor layout (`marian_layout`: Marian's name, ours, the coordinates permuted) serves both
directions: this export, and the import of `pretrained/marian.py`, which reads it backwards.

Written with the library's own writers (`save_pretrained` of the model and the tokenizer) into a
folder that is renamed into place when complete.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import Tensor

from transformer.config import ModelConfig
from transformer.errors import UserError
from transformer.files import write_folder
from transformer.model.models import EncoderDecoder
from transformer.text.pretrained import MarianTokenizer as ImportedMarian
from transformer.text.tokenizer import Tokenizer


def _refusal(cfg: ModelConfig) -> str | None:
    """Why a Marian model cannot compute what a model of config `cfg` computes, or None."""
    if cfg.arch != "encoder-decoder":
        return f"Marian is an encoder-decoder translation model; this model is arch {cfg.arch!r}"
    if cfg.norm_first:
        return "pre-norm blocks (norm_first): Marian's layers are post-norm"
    if cfg.attn_window is not None:
        return f"windowed attention (attn_window {cfg.attn_window}): Marian attends to every position"
    if cfg.positions != "sinusoidal":
        return "learned positions: Marian regenerates its sinusoidal position table on load"
    if cfg.layer_norm_eps != 1e-5:
        return f"layer_norm_eps {cfg.layer_norm_eps}: Marian's LayerNorm epsilon is fixed at 1e-5"
    if cfg.embed_norm or cfg.n_segments:
        return "a LayerNorm on the embeddings or segment embeddings (embed_norm, n_segments): Marian has neither"
    return None


def marian_permutation(d_model: int) -> Tensor:
    """(d_model,) perm with marian[..., c] = ours[..., perm[c]]: even coordinates (sin), then odd (cos)."""
    return torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])


# Where each Marian tensor of a layer comes from: (Marian's name, our name, the rows of ours it is (a third of
# a fused in_proj) or None for all, and how its d_model coordinates are permuted: "cols" for a weight that
# reads the residual stream, "rows" for a weight or a vector that writes or lies on it, None for neither).
Entry = tuple[str, str, tuple[int, int] | None, str | None]


def _attention_layout(theirs: str, ours: str, d: int) -> list[Entry]:
    """Marian's q/k/v/out_proj of our attention `ours`: its fused in_proj holds the rows q, k, v."""
    out: list[Entry] = []
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        rows = (i * d, (i + 1) * d)
        out += [(f"{theirs}.{name}.weight", f"{ours}.in_proj.weight", rows, "cols"),
                (f"{theirs}.{name}.bias", f"{ours}.in_proj.bias", rows, None)]
    return out + [(f"{theirs}.out_proj.weight", f"{ours}.out_proj.weight", None, "rows"),
                  (f"{theirs}.out_proj.bias", f"{ours}.out_proj.bias", None, "rows")]


def _norm_layout(theirs: str, ours: str) -> list[Entry]:
    return [(f"{theirs}.weight", f"{ours}.weight", None, "rows"), (f"{theirs}.bias", f"{ours}.bias", None, "rows")]


def _layer_layout(stack: str, i: int, d: int) -> list[Entry]:
    """One encoder or decoder layer: Marian's names and ours (`EncoderLayer`, `DecoderLayer`)."""
    theirs, ours = f"model.{stack}.layers.{i}", f"{stack}.layers.{i}"
    out = _attention_layout(f"{theirs}.self_attn", f"{ours}.self_attn", d)
    if stack == "encoder":
        out += _norm_layout(f"{theirs}.self_attn_layer_norm", f"{ours}.res_attn.norm")
    else:
        out += _norm_layout(f"{theirs}.self_attn_layer_norm", f"{ours}.res_self.norm")
        out += _attention_layout(f"{theirs}.encoder_attn", f"{ours}.cross_attn", d)
        out += _norm_layout(f"{theirs}.encoder_attn_layer_norm", f"{ours}.res_cross.norm")
    out += [(f"{theirs}.fc1.weight", f"{ours}.ffn.w1.weight", None, "cols"),
            (f"{theirs}.fc1.bias", f"{ours}.ffn.w1.bias", None, None),
            (f"{theirs}.fc2.weight", f"{ours}.ffn.w2.weight", None, "rows"),
            (f"{theirs}.fc2.bias", f"{ours}.ffn.w2.bias", None, "rows")]
    return out + _norm_layout(f"{theirs}.final_layer_norm", f"{ours}.res_ffn.norm")


def marian_layout(cfg: ModelConfig) -> list[Entry]:
    """Every tensor of the encoder and decoder layers of a model of config `cfg`, Marian's name and ours.
    The embeddings, the output projection and its bias are the callers' (tying differs)."""
    return [entry for stack, n in (("encoder", cfg.n_encoder_layers), ("decoder", cfg.n_decoder_layers))
            for i in range(n) for entry in _layer_layout(stack, i, cfg.d_model)]


def permuted(t: Tensor, axis: str | None, perm: Tensor) -> Tensor:
    """`t` with its d_model coordinates reordered by `perm`: its columns ("cols"), its first axis ("rows")
    or none (None). Ours to Marian's with `marian_permutation`, back with its inverse (argsort)."""
    if axis == "cols":
        return t[:, perm]
    return t[perm] if axis == "rows" else t


def marian_state_dict(model: EncoderDecoder) -> dict[str, Tensor]:
    """Our weights under MarianMTModel's names, the d_model coordinates permuted (module docstring).
    The position tables are left out (Marian regenerates them)."""
    cfg, perm = model.cfg, marian_permutation(model.cfg.d_model)
    ours = model.state_dict()
    out = {}
    for theirs, name, rows, axis in marian_layout(cfg):
        t = ours[name] if rows is None else ours[name][rows[0] : rows[1]]
        out[theirs] = permuted(t, axis, perm)
    src = permuted(ours["src_embed.tokens.weight"], "cols", perm)
    tgt = permuted(ours["tgt_embed.tokens.weight"], "cols", perm)
    out |= {
        "model.encoder.embed_tokens.weight": src,
        "model.decoder.embed_tokens.weight": tgt,
        "lm_head.weight": permuted(ours["out_proj.weight"], "cols", perm) if model.out_proj is not None else tgt,
        "final_logits_bias": (ours["out_bias"] if cfg.logits_bias else torch.zeros(cfg.vocab_size))[None],
    }
    if cfg.tie_embeddings:
        out["model.shared.weight"] = src
    return {name: t.detach().float().contiguous() for name, t in out.items()}


# Our FFN activations by Marian's `activation_function` names (gelu_new is the tanh approximation, silu swish)
MARIAN_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "swish": "swish", "silu": "swish"}


def marian_config(cfg: ModelConfig):
    """The `MarianConfig` of our model config `cfg` (its pad, its BOS starts decoding, its EOS)."""
    from transformers import MarianConfig

    activation = next(name for name, ours in MARIAN_ACTIVATIONS.items() if ours == cfg.activation)
    return MarianConfig(
        vocab_size=cfg.vocab_size, decoder_vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_len,
        d_model=cfg.d_model, encoder_layers=cfg.n_encoder_layers, decoder_layers=cfg.n_decoder_layers,
        encoder_attention_heads=cfg.n_heads, decoder_attention_heads=cfg.n_heads,
        encoder_ffn_dim=cfg.d_ff, decoder_ffn_dim=cfg.d_ff, activation_function=activation,
        dropout=cfg.dropout, attention_dropout=cfg.attn_dropout, activation_dropout=cfg.act_dropout,
        scale_embedding=cfg.scale_embedding,
        pad_token_id=cfg.pad_id, bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id, decoder_start_token_id=cfg.bos_id,
        forced_eos_token_id=None, share_encoder_decoder_embeddings=cfg.tie_embeddings,
        tie_word_embeddings=cfg.tie_embeddings,
    )


def _tokenizer_files(tokenizer: Tokenizer | ImportedMarian) -> tuple[dict[str, int], bytes, bytes, int]:
    """(vocab.json's piece -> id, source.spm, target.spm, the unknown id) of our tokenizer: one SentencePiece
    model for both sides, its pieces our ids; or an imported Marian tokenizer's own files."""
    if isinstance(tokenizer, ImportedMarian):
        return dict(tokenizer.vocab), tokenizer.source_bytes, tokenizer.target_bytes, tokenizer.unk
    vocab = {tokenizer.id_to_piece(i): i for i in range(tokenizer.vocab_size)}
    return vocab, tokenizer.to_bytes(), tokenizer.to_bytes(), Tokenizer.UNK


def export_marian(model: EncoderDecoder, tokenizer: Tokenizer | ImportedMarian, out: Path) -> None:
    """Write the Marian folder `out` (new or empty): config.json, generation_config.json,
    model.safetensors, vocab.json, source.spm, target.spm, tokenizer_config.json."""
    why = _refusal(model.cfg)
    if why is not None:
        raise UserError(f"cannot export to Hugging Face Marian: {why}")
    try:
        from transformers import GenerationConfig, MarianMTModel, MarianTokenizer
        from transformers.utils.logging import disable_progress_bar
    except ImportError:
        raise UserError("`to` huggingface needs the transformers package: pip install transformers") from None
    disable_progress_bar()  # a command prints what it did, not the library's bars
    marian = MarianMTModel(marian_config(model.cfg))
    missing, unexpected = marian.load_state_dict(marian_state_dict(model), strict=False)
    if unexpected or any("embed_positions" not in name for name in missing):
        raise RuntimeError(f"Marian weights do not match: missing {missing}, unexpected {unexpected}")
    cfg = model.cfg
    marian.generation_config = GenerationConfig(  # the paper's beam 4 (its length penalty rule differs: README)
        num_beams=4, max_length=cfg.max_len, pad_token_id=cfg.pad_id, bos_token_id=cfg.bos_id,
        eos_token_id=cfg.eos_id, decoder_start_token_id=cfg.bos_id, bad_words_ids=[[cfg.pad_id]])  # as our search
    vocab, source, target, unk = _tokenizer_files(tokenizer)
    pieces = {i: p for p, i in vocab.items()}
    special = {"unk_token": pieces[unk], "pad_token": pieces[cfg.pad_id], "eos_token": pieces[cfg.eos_id]}

    def fill(tmp: Path) -> None:
        marian.save_pretrained(tmp)
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8")
        (tmp / "source.spm").write_bytes(source)
        (tmp / "target.spm").write_bytes(target)
        with warnings.catch_warnings():  # "Recommended: pip install sacremoses": our text needs no Moses
            warnings.simplefilter("ignore")
            hf_tokenizer = MarianTokenizer(str(tmp / "source.spm"), str(tmp / "target.spm"), str(tmp / "vocab.json"),
                                           model_max_length=cfg.max_len - 1, **special)
        hf_tokenizer.save_pretrained(tmp)

    write_folder(out, fill)
