"""Where a vision model looks: attention over the image patches, drawn over the image (PNG).

- ViT: per layer, the attention of the [CLS] token to the patches (with mean pooling: the
  mean over the patches' queries), averaged over the heads.
- Captioner: per generated token, its attention to the patches of every tile (the weight on a
  tile's [CLS], its summary, spread over the tile), averaged over the heads and the
  cross-attention layers. For the Q-Former, whose
  caption attends to N queries and not to the image, it is the caption's attention to the
  queries times the queries' attention to the patches (each averaged over heads and layers), a
  first-order attention rollout.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor

from transformer.inference.captions import generate_ids
from transformer.model.captioner import Captioner, QFormerCaptioner
from transformer.model.vision import ViT
from transformer.report.plots import _save
from transformer.text.tokenizer import Tokenizer


def _grid(weights: Tensor, model_grid: tuple[int, int], has_cls: bool, spread_cls: bool = False) -> Tensor:
    """(K, T_k) attention to the encoder's tokens -> (K, rows, cols) over the patches; with `spread_cls`,
    the weight on [CLS] (a summary of the whole image) spread evenly over the patches."""
    if not has_cls:
        return weights.reshape(-1, *model_grid)
    patches = weights[:, 1:] + (weights[:, :1] / (weights.size(1) - 1) if spread_cls else 0)
    return patches.reshape(-1, *model_grid)


@torch.no_grad()
def vit_attention(model: ViT, image: Tensor) -> tuple[Tensor, list[str], int]:
    """image (C, H, W) -> per layer the attention to the patches (L, rows, cols), panel labels, the class."""
    model.eval()
    weights: dict[str, list[Tensor]] = {}
    logits = model(image[None].to(next(model.parameters()).device), attn_weights=weights)
    cfg = model.cfg
    rows = [w[0].float().mean(0) for w in weights["encoder"]]  # (T, T) each, heads averaged
    query = [w[0] if cfg.pool == "cls" else w.mean(0) for w in rows]  # (T,) each
    maps = _grid(torch.stack(query).cpu(), cfg.grid, cfg.pool == "cls")
    return maps, [f"layer {i + 1}" for i in range(len(maps))], int(logits.argmax())


@torch.no_grad()
def caption_attention(model: Captioner, tokenizer: Tokenizer, image: Tensor) -> tuple[Tensor, list[str], str]:
    """image (C, H, W) -> per generated token (EOS included) its attention to the patches (T, rows, cols),
    the tokens, and the caption."""
    model.eval()
    ids = generate_ids(model, image[None])[0]
    cfg = model.cfg
    device = next(model.parameters()).device
    tgt = torch.tensor([[cfg.bos_id, *ids]], device=device)  # (1, T)
    weights: dict[str, list[Tensor]] = {}
    model(image[None].to(device), tgt, attn_weights=weights)
    to_memory = torch.stack([w[0].float() for w in weights["cross"]]).mean(dim=(0, 1))  # (T, S)
    if isinstance(model, QFormerCaptioner):  # to the queries, then from the queries to the patches
        to_memory = to_memory @ torch.stack([w[0].float() for w in weights["queries"]]).mean(dim=(0, 1))
    rows, cols = cfg.vision.grid  # of a tile; the tiles side by side
    tiles = to_memory.cpu().view(-1, cfg.tiles, to_memory.size(-1) // cfg.tiles)  # (T, K, T_tile)
    has_cls = cfg.vision.pool == "cls"
    maps = torch.cat([_grid(tiles[:, k], (rows, cols), has_cls, spread_cls=True) for k in range(cfg.tiles)], dim=-1)
    pieces = [tokenizer.id_to_piece(i) for i in ids] + ["<end>"]
    return maps, [repr(p)[1:-1] or " " for p in pieces], tokenizer.decode([ids])[0]


def image_attention_figure(image: Tensor, maps: Tensor, labels: list[str], title: str) -> Figure:
    """The image, then one panel per map (K, rows, cols) drawn over it, up to 8 panels a row (about 13 inches)."""
    if maps.size(0) != len(labels):
        raise ValueError(f"{maps.size(0)} maps but {len(labels)} labels")
    picture = image.float().mean(0).cpu().numpy()  # (H, W) grey
    height, width = picture.shape
    panels = 1 + maps.size(0)
    panel_h = 1.6 if width <= 2 * height else 0.8  # inches
    panel_w = panel_h * width / height
    cols = max(1, min(panels, 8, int(13 // panel_w)))  # at most about 13 inches wide
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(cols * panel_w + 0.2, rows * (panel_h + 0.3) + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for k, ax in enumerate(axes):
        ax.set_axis_off()
        if k >= panels:
            continue
        ax.imshow(picture, cmap="gray", vmin=0, vmax=1, extent=(0, width, height, 0))
        if k == 0:
            ax.set_title("image", fontsize=9)
            continue
        ax.imshow(maps[k - 1].numpy(), cmap="inferno", alpha=0.6, extent=(0, width, height, 0),
                  interpolation="nearest")
        ax.set_title(labels[k - 1], fontsize=9)
    fig.suptitle(title, fontsize=10)
    return fig


def plot_image_attention(image: Tensor, maps: Tensor, labels: list[str], title: str, out: Path) -> Path:
    """Draw `image_attention_figure` and write it as a PNG to `out`; returns `out`."""
    return _save(image_attention_figure(image, maps, labels, title), Path(out))
