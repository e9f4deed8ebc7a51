"""Export a translation model as a Hugging Face Marian folder.

`MarianMTModel.from_pretrained(out)` and `MarianTokenizer.from_pretrained(out)` load it, without
`trust_remote_code`. Marian is the paper's post-norm Transformer with ReLU, sinusoidal
positions and sqrt(d_model)-scaled, shared embeddings, so our model maps onto it exactly, with
two things to reconcile:

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
  `decoder_start_token_id`, usually its pad id; here it is our BOS `<s>` (2), and pad is `<pad>` (0).

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
from transformer.model.layers import DecoderLayer, EncoderLayer
from transformer.model.models import EncoderDecoder
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
    return None


def marian_permutation(d_model: int) -> Tensor:
    """(d_model,) perm with marian[..., c] = ours[..., perm[c]]: even coordinates (sin), then odd (cos)."""
    return torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])


def _attention(prefix: str, attn, perm: Tensor) -> dict[str, Tensor]:
    """q/k/v/out_proj of Marian from our fused in_proj (rows q, k, v) and out_proj, permuted."""
    d = attn.out_proj.in_features
    w, b = attn.in_proj.weight[:, perm], attn.in_proj.bias  # inputs come from the residual stream
    out = {}
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        out[f"{prefix}.{name}.weight"], out[f"{prefix}.{name}.bias"] = w[i * d : (i + 1) * d], b[i * d : (i + 1) * d]
    out[f"{prefix}.out_proj.weight"] = attn.out_proj.weight[perm]  # outputs go to the residual stream
    out[f"{prefix}.out_proj.bias"] = attn.out_proj.bias[perm]
    return out


def _norm(prefix: str, norm, perm: Tensor) -> dict[str, Tensor]:
    return {f"{prefix}.weight": norm.weight[perm], f"{prefix}.bias": norm.bias[perm]}


def _layer(prefix: str, layer: EncoderLayer | DecoderLayer, perm: Tensor) -> dict[str, Tensor]:
    """One encoder or decoder layer in Marian's names."""
    out = _attention(f"{prefix}.self_attn", layer.self_attn, perm)
    if isinstance(layer, EncoderLayer):
        out |= _norm(f"{prefix}.self_attn_layer_norm", layer.res_attn.norm, perm)
    else:
        out |= _norm(f"{prefix}.self_attn_layer_norm", layer.res_self.norm, perm)
        out |= _attention(f"{prefix}.encoder_attn", layer.cross_attn, perm)
        out |= _norm(f"{prefix}.encoder_attn_layer_norm", layer.res_cross.norm, perm)
    out[f"{prefix}.fc1.weight"], out[f"{prefix}.fc1.bias"] = layer.ffn.w1.weight[:, perm], layer.ffn.w1.bias
    out[f"{prefix}.fc2.weight"], out[f"{prefix}.fc2.bias"] = layer.ffn.w2.weight[perm], layer.ffn.w2.bias[perm]
    return out | _norm(f"{prefix}.final_layer_norm", layer.res_ffn.norm, perm)


def marian_state_dict(model: EncoderDecoder) -> dict[str, Tensor]:
    """Our weights under MarianMTModel's names, the d_model coordinates permuted (module docstring).
    The position tables are left out (Marian regenerates them)."""
    perm = marian_permutation(model.cfg.d_model)
    src, tgt = model.src_embed.tokens.weight[:, perm], model.tgt_embed.tokens.weight[:, perm]
    out = {
        "model.encoder.embed_tokens.weight": src,
        "model.decoder.embed_tokens.weight": tgt,
        "lm_head.weight": model.out_proj.weight[:, perm] if model.out_proj is not None else tgt,
        "final_logits_bias": torch.zeros(1, model.cfg.vocab_size),
    }
    if model.cfg.tie_embeddings:
        out["model.shared.weight"] = src
    for stack in ("encoder", "decoder"):
        for i, layer in enumerate(getattr(model, stack).layers):
            out |= _layer(f"model.{stack}.layers.{i}", layer, perm)
    return {name: t.detach().float().contiguous() for name, t in out.items()}


def marian_config(cfg: ModelConfig):
    """The `MarianConfig` of our model config `cfg` (tokens: pad 0, BOS 2 starts decoding, EOS 3)."""
    from transformers import MarianConfig

    return MarianConfig(
        vocab_size=cfg.vocab_size, decoder_vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_len,
        d_model=cfg.d_model, encoder_layers=cfg.n_encoder_layers, decoder_layers=cfg.n_decoder_layers,
        encoder_attention_heads=cfg.n_heads, decoder_attention_heads=cfg.n_heads,
        encoder_ffn_dim=cfg.d_ff, decoder_ffn_dim=cfg.d_ff, activation_function="relu",
        dropout=cfg.dropout, attention_dropout=cfg.attn_dropout, activation_dropout=cfg.act_dropout,
        scale_embedding=True,
        pad_token_id=cfg.pad_id, bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id, decoder_start_token_id=cfg.bos_id,
        forced_eos_token_id=None, share_encoder_decoder_embeddings=cfg.tie_embeddings,
        tie_word_embeddings=cfg.tie_embeddings,
    )


def export_marian(model: EncoderDecoder, tokenizer: Tokenizer, out: Path) -> None:
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
        eos_token_id=cfg.eos_id, decoder_start_token_id=cfg.bos_id)

    def fill(tmp: Path) -> None:
        marian.save_pretrained(tmp)
        vocab = {tokenizer.id_to_piece(i): i for i in range(tokenizer.vocab_size)}
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8")
        for name in ("source.spm", "target.spm"):
            (tmp / name).write_bytes(tokenizer.to_bytes())
        with warnings.catch_warnings():  # "Recommended: pip install sacremoses": our text needs no Moses
            warnings.simplefilter("ignore")
            hf_tokenizer = MarianTokenizer(str(tmp / "source.spm"), str(tmp / "target.spm"), str(tmp / "vocab.json"),
                                           model_max_length=cfg.max_len - 1)
        hf_tokenizer.save_pretrained(tmp)

    write_folder(out, fill)
