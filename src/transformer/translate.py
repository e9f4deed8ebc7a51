"""Text in, text out: tokenize, batch by length, search, detokenize, restore the input order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm import tqdm

from .data import collate_source
from .decode import SearchConfig, translate_batch
from .errors import UserError
from .models import EncoderDecoder
from .tokenizer import Tokenizer


def translate_lines(
    model: EncoderDecoder,
    tokenizer: Tokenizer,
    lines: Sequence[str],
    search: SearchConfig,
    batch_size: int = 64,
    progress: bool = False,
    source_name: str = "input",
) -> list[str]:
    """Translate `lines` and return detokenized translations in input order.

    Sentences are sorted by length so that a batch holds similar lengths (little
    padding), decoded `batch_size` at a time, and put back in their original order.
    """
    device = next(model.parameters()).device
    ids = tokenizer.encode([line.strip() for line in lines])
    _check_lengths(model, ids, source_name)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[list[int]] = [[] for _ in ids]
    with tqdm(total=len(ids), unit="sent", disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            src = collate_source([ids[i] for i in chunk], model.cfg.pad_id, Tokenizer.EOS).to(device)
            for i, hyp in zip(chunk, translate_batch(model, src, search)):
                out[i] = hyp
            bar.update(len(chunk))
    return tokenizer.decode(out)


def _check_lengths(model: EncoderDecoder, ids: list[list[int]], source_name: str) -> None:
    """`UserError` naming the line of the first source sentence too long for the model."""
    limit = model.cfg.max_len - 1  # room for EOS
    for i, sentence in enumerate(ids):
        if len(sentence) > limit:
            raise UserError(
                f"{source_name}:{i + 1}: sentence has {len(sentence)} tokens, over the model's limit of {limit}"
            )


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; a clear error for 'cuda' without a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is available on this machine")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UserError(f"--device {name}: choose auto, cpu or cuda")
    return torch.device(name)


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
    """
    device = next(model.parameters()).device
    src_ids = tokenizer.encode([source.strip()])[0]
    if not src_ids:
        raise UserError("the source sentence is empty")
    _check_lengths(model, [src_ids], "--src")
    src = collate_source([src_ids], model.cfg.pad_id, Tokenizer.EOS).to(device)  # (1, S)
    was_training = model.training
    model.eval()
    try:
        tgt_ids = tokenizer.encode([target.strip()])[0] if target is not None else translate_batch(model, src, search)[0]
        tgt_in = torch.tensor([[Tokenizer.BOS] + tgt_ids], device=device)  # (1, T)
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
