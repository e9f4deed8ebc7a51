"""GPT-2 (`GPT2LMHeadModel`) -> our `DecoderOnly` (`transformer import`).

GPT-2 is the paper's decoder without cross-attention, pre-norm with a final LayerNorm (our
`norm_first`), learned positions, GELU in its tanh form and unscaled embeddings (the gpt2 preset).
Its linear layers are Conv1D, whose weight is stored (in, out): transposed here. The weights map:

    transformer.wte, wpe                 -> embed.tokens, embed.positions.learned
    transformer.h.i.ln_1, ln_2           -> decoder.layers.i.res_self.norm, res_ffn.norm
    transformer.h.i.attn.c_attn          -> ....self_attn.in_proj (its columns q, k, v: our rows)
    transformer.h.i.attn.c_proj          -> ....self_attn.out_proj
    transformer.h.i.mlp.c_fc, c_proj     -> ....ffn.w1, w2
    transformer.ln_f                     -> decoder.norm
    lm_head                              -> the token embeddings (tied), or out_proj

GPT-2 has no padding token: pad, BOS and EOS are all its end of text (eos_token_id, 50256 in the
released models). A decoder-only model here masks no padding (right padding never reaches a real
token through the causal mask).
"""

from __future__ import annotations

from torch import Tensor

from transformer.config import ModelConfig
from transformer.errors import UserError
from transformer.pretrained import Converted
from transformer.pretrained.common import (activation, affine, check_vocabulary, output_projection, token_name,
                                           tokenizer_options)
from transformer.pretrained.folder import HFFolder
from transformer.text.pretrained import HubTokenizer

END_OF_TEXT = "<|endoftext|>"


def convert(folder: HFFolder) -> Converted:
    """A GPT-2 folder as our `DecoderOnly` (kind "lm"); `UserError` for an option or tensor we do not take."""
    _check_options(folder)
    prefix = "transformer." if folder.has("transformer.wte.weight") else ""
    tokenizer = _tokenizer(folder)
    cfg = _config(folder, tokenizer)
    d = cfg.d_model
    state = {
        "embed.tokens.weight": folder.tensor(f"{prefix}wte.weight", (cfg.vocab_size, d)),
        "embed.positions.learned": folder.tensor(f"{prefix}wpe.weight", (cfg.max_len, d)),
        **affine(folder, f"{prefix}ln_f", "decoder.norm", (d,)),
    }
    for i in range(cfg.n_decoder_layers):
        state |= _layer(folder, f"{prefix}h.{i}", f"decoder.layers.{i}", d, cfg.d_ff)
    out = output_projection(folder, "lm_head.weight", state["embed.tokens.weight"])
    if out is not None:
        state["out_proj.weight"] = out
    meta = {"lm": {"family": "gpt2", "architectures": folder.option("architectures")}}
    return Converted(cfg.replace(tie_embeddings=out is None), state, tokenizer.to_bytes(), meta, "lm")


def _check_options(folder: HFFolder) -> None:
    """`UserError` for an option of GPT-2 our decoder does not have."""
    folder.expect("scale_attn_weights", True, True, "attention here always divides by sqrt(d_k)")
    folder.expect("scale_attn_by_inverse_layer_idx", False, False, "attention here is not scaled by the layer")
    folder.expect("reorder_and_upcast_attn", False, False, "attention here is not reordered or upcast")
    folder.expect("add_cross_attention", False, False, "a decoder-only model here has no cross-attention")


def _config(folder: HFFolder, tokenizer: HubTokenizer) -> ModelConfig:
    """Our config of the folder's config.json: the shape, GPT-2's options, its end of text as every special id."""
    vocab, d = int(folder.need("vocab_size")), int(folder.need("n_embd"))
    check_vocabulary(folder, tokenizer, vocab)
    inner = folder.option("n_inner")
    eos = int(folder.option("eos_token_id", 50256))
    return ModelConfig(
        arch="decoder", vocab_size=vocab, d_model=d, n_heads=int(folder.need("n_head")),
        d_ff=int(inner) if inner is not None else 4 * d, n_encoder_layers=0,
        n_decoder_layers=int(folder.need("n_layer")), dropout=float(folder.option("resid_pdrop", 0.1)),
        attn_dropout=float(folder.option("attn_pdrop", 0.1)), norm_first=True, positions="learned",
        max_len=int(folder.need("n_positions")), layer_norm_eps=float(folder.option("layer_norm_epsilon", 1e-5)),
        activation=activation(folder, "activation_function", "gelu_new"), scale_embedding=False,
        pad_id=eos, bos_id=eos, eos_id=eos,
    )


def _layer(folder: HFFolder, theirs: str, ours: str, d: int, d_ff: int) -> dict[str, Tensor]:
    """One pre-norm decoder layer: `theirs` (transformer.h.i) -> `ours` (decoder.layers.i)."""
    return {
        **affine(folder, f"{theirs}.ln_1", f"{ours}.res_self.norm", (d,)),
        **affine(folder, f"{theirs}.attn.c_attn", f"{ours}.self_attn.in_proj", (3 * d, d), conv1d=True),
        **affine(folder, f"{theirs}.attn.c_proj", f"{ours}.self_attn.out_proj", (d, d), conv1d=True),
        **affine(folder, f"{theirs}.ln_2", f"{ours}.res_ffn.norm", (d,)),
        **affine(folder, f"{theirs}.mlp.c_fc", f"{ours}.ffn.w1", (d_ff, d), conv1d=True),
        **affine(folder, f"{theirs}.mlp.c_proj", f"{ours}.ffn.w2", (d, d_ff), conv1d=True),
    }


def _tokenizer(folder: HFFolder) -> HubTokenizer:
    """The folder's tokenizer.json, or else its vocab.json and merges.txt as GPT-2's byte-level BPE
    (tokenizer_config.json's add_prefix_space and special tokens)."""
    file = folder.file("tokenizer.json")
    if file is not None:
        return HubTokenizer.from_file(file)
    vocab, merges = folder.file("vocab.json"), folder.file("merges.txt")
    if vocab is None or merges is None:
        raise UserError(f"{folder.path}: no tokenizer (tokenizer.json, or GPT-2's vocab.json and merges.txt)")
    options = tokenizer_options(folder)
    specials = [token_name(options, key, END_OF_TEXT) for key in ("bos_token", "eos_token", "unk_token")]
    return HubTokenizer.byte_level_bpe(vocab, merges, specials, bool(options.get("add_prefix_space", False)))
