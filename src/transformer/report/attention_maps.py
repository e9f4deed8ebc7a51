"""The attention weights of one sentence pair, every layer and head (the paper's Figures 3-5)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from transformer.errors import UserError
from transformer.inference.search import SearchConfig, translate_batch
from transformer.inference.translate import check_lengths
from transformer.model.models import EncoderDecoder
from transformer.text.data import collate_source
from transformer.text.tokenizer import Tokenizer


@dataclass(frozen=True)
class AttentionMaps:
    """The attention weights of one sentence pair, as in the paper's Figures 3-5.

    ``weights["encoder"|"decoder"|"cross"]`` hold one (H, queries, keys) tensor per layer.
    Encoder: `src` × `src`. Decoder self-attention: row i predicts ``tgt_out[i]`` from
    the inputs ``tgt_in[: i + 1]`` (causal). Cross-attention: `tgt_out` × `src`.
    """

    translation: str  # the detokenized target
    src: list[str]  # source pieces, then </s>
    tgt_in: list[str]  # <s>, then the target pieces
    tgt_out: list[str]  # the target pieces, then </s>
    weights: dict[str, list[torch.Tensor]]


@torch.no_grad()
def attention_maps(
    model: EncoderDecoder, tokenizer: Tokenizer, source: str, target: str | None = None,
    search: SearchConfig = SearchConfig(),
) -> AttentionMaps:
    """Attention weights of every layer and head for `source` and its translation.

    The translation is `target` when given, else the model's own (found with `search`);
    the weights come from one teacher-forced pass over it (written-out attention path).

    The decoder input is BOS followed by the translation, so a translation may have at most
    ``cfg.max_len - 1`` tokens: a longer `target` is a `UserError`; the model's own
    translation, which the search may cut at ``cfg.max_len`` tokens, is cut to that many.
    """
    device = next(model.parameters()).device
    src_ids = tokenizer.encode([source.strip()])[0]
    if not src_ids:
        raise UserError("the source sentence is empty")
    check_lengths(model, [src_ids], "`sentence`")
    limit = model.cfg.max_len - 1  # room for BOS
    tgt_ids = tokenizer.encode_target([target.strip()])[0] if target is not None else None
    if tgt_ids is not None and len(tgt_ids) > limit:
        raise UserError(
            f"`target`: the target has {len(tgt_ids)} tokens, over the model's limit of {limit} "
            f"(max_len {model.cfg.max_len}, less one for <s>)"
        )
    src = collate_source([src_ids], model.cfg.pad_id, model.cfg.eos_id).to(device)  # (1, S)
    was_training = model.training
    model.eval()
    try:
        if tgt_ids is None:
            tgt_ids = translate_batch(model, src, search)[0][:limit]  # cut at max length: drawable with <s>
        tgt_in = torch.tensor([[model.cfg.bos_id] + tgt_ids], device=device)  # (1, T)
        weights: dict[str, list[torch.Tensor]] = {}
        model(src, tgt_in, attn_weights=weights)
    finally:
        model.train(was_training)
    piece = tokenizer.id_to_piece
    return AttentionMaps(
        translation=tokenizer.decode([tgt_ids])[0],
        src=[piece(i) for i in src_ids] + ["</s>"],
        tgt_in=["<s>"] + [piece(i) for i in tgt_ids],
        tgt_out=[piece(i) for i in tgt_ids] + ["</s>"],
        weights={kind: [w[0].float().cpu() for w in layers] for kind, layers in weights.items()},  # (H, Tq, Tk)
    )
