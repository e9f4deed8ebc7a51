"""Image captioning: a ViT encoder and a bridge to a frozen language model (or a plain decoder), trained
on canvases of digits composed on the fly (`images.captions`).

The image encoder is a trained ViT (`--vit`, from `vit train` on the same digits), frozen as
BLIP-2 and Flamingo freeze theirs, or a new ViT trained with the bridge. It sees the canvas one
digit cell (tile) at a time.

The language model comes from `transformer lm train` on caption text, one caption a line: it
has learned that a caption follows a newline and ends with one. So a caption here starts with
the newline (`CaptionConfig.bos_id`) and ends with it (`eos_id`); the frozen LM needs no new
token. For the Q-Former's prefix, which sits before that newline, the LM must have learned to read
the text before a line (`scripts/vision_results.py` trains it on captions each said twice). The digits are split as in `tasks.vision` (seed 0): training canvases are composed
from the training part, `valid_canvases` fixed validation canvases from the validation part,
and held-out canvases (`scripts/vision_results.py`) from the test part. Validation reports
exact-match caption accuracy (greedy, with the package's search and KV cache) and the loss
per token; the best exact match picks the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from transformer.config import Bridge, CaptionConfig, ModelConfig, VisionConfig
from transformer.errors import UserError
from transformer.images.captions import caption, compose
from transformer.images.data import ImageSet, read_folder
from transformer.inference.captions import generate
from transformer.model.captioner import Captioner, build_captioner, trained_parameters
from transformer.store.kinds import load_captioner, load_vit
from transformer.tasks.vision import splits, start
from transformer.text.tokenizer import Tokenizer
from transformer.store import modeldir
from transformer.training.lock import guard
from transformer.training.loop import LoopConfig, Objective, fit
from transformer.device import resolve_device

NEWLINE = "\n"


@dataclass(frozen=True)
class CaptionTrainConfig:
    """A captioning run: the frozen LM's run directory, the digits, the bridge, and the batches."""

    loop: LoopConfig
    lm: Path
    vit: Path | None = None  # a ViT run (vit train) on the digits: the image encoder, frozen
    images: Path | None = None  # a digit folder: subfolders 0 .. 9
    bundled: str | None = "digits"
    bridge: Bridge = "qformer"
    n_queries: int = 32
    bridge_layers: int = 2
    cross_every: int = 2
    batch_size: int = 32
    valid_canvases: int = 200

    def to_dict(self) -> dict:
        return {"lm": str(self.lm), "vit": None if self.vit is None else str(self.vit),
                "images": None if self.images is None else str(self.images),
                "bundled": self.bundled, "bridge": self.bridge, "n_queries": self.n_queries,
                "bridge_layers": self.bridge_layers, "cross_every": self.cross_every,
                "batch_size": self.batch_size, "valid_canvases": self.valid_canvases}


def _digit_classes(data: ImageSet, where) -> ImageSet:
    if not all(len(c) == 1 and c in "0123456789" for c in data.classes):
        raise UserError(f"{where}: captions need digit classes (subfolders 0 .. 9), found {', '.join(data.classes)}")
    return data


def digit_splits(images: Path | None, name: str | None) -> dict[str, ImageSet]:
    """The digit images split as for the ViT; `UserError` unless the classes are the digits 0 .. 9."""
    parts = splits(images, None if images is not None else name)
    _digit_classes(parts["train"], images)
    return parts


def held_out_digits(images: Path | None, name: str | None) -> ImageSet:
    """The digits to compose held-out canvases from: all of a folder's, or the test part of a bundled set."""
    if images is not None:
        return _digit_classes(read_folder(images), images)
    return digit_splits(None, name)["test"]


def caption_ids(tokenizer: Tokenizer, captions: list[str], cfg: CaptionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder inputs (B, T) = BOS caption and targets (B, T) = caption EOS, right-padded."""
    ids = tokenizer.encode(captions)
    longest = max(len(x) for x in ids) + 1
    if longest > cfg.max_len - 1:
        raise UserError(f"a caption of {longest - 1} tokens is longer than the model's {cfg.max_len - 2}")
    tgt_in = torch.full((len(ids), longest), cfg.pad_id)
    tgt_out = torch.full((len(ids), longest), cfg.pad_id)
    for row, x in enumerate(ids):
        tgt_in[row, : len(x) + 1] = torch.tensor([cfg.bos_id, *x])
        tgt_out[row, : len(x) + 1] = torch.tensor([*x, cfg.eos_id])
    return tgt_in, tgt_out


def caption_loss(model: Captioner, batch) -> tuple[torch.Tensor, int]:
    images, tgt_in, tgt_out = batch
    logits = model(images, tgt_in)  # (B, T, V)
    pad = model.cfg.pad_id
    loss = F.cross_entropy(logits.float().flatten(0, 1), tgt_out.flatten(), ignore_index=pad, reduction="sum")
    return loss, int((tgt_out != pad).sum())


def exact_match(model: Captioner, tokenizer: Tokenizer, images: torch.Tensor, captions: list[str]) -> float:
    """The share of images whose greedy caption is exactly the reference."""
    return sum(a == b for a, b in zip(generate(model, tokenizer, images), captions)) / max(len(captions), 1)


def caption_config(cfg: CaptionTrainConfig, vision: VisionConfig, lm: ModelConfig, tokenizer: Tokenizer,
                   tiles: int) -> CaptionConfig:
    """The captioner's shape: the ViT `vision` on each of the canvas's `tiles` digit cells, the LM's shape
    and its newline."""
    newline = tokenizer.piece_to_id(NEWLINE)
    if newline == Tokenizer.UNK:
        raise UserError(f"{cfg.lm}: the language model's vocabulary has no newline; train it with lm train")
    longest = max(len(ids) for ids in tokenizer.encode([caption([0] * k) for k in (2, 3, 4)]))
    return CaptionConfig(vision=vision, lm=lm, bridge=cfg.bridge, n_queries=cfg.n_queries,
                         bridge_layers=cfg.bridge_layers, cross_every=cfg.cross_every, max_len=longest + 4,
                         bos_id=newline, eos_id=newline, tiles=tiles, freeze_vision=cfg.vit is not None)


def _vision(cfg: CaptionTrainConfig, shape: Callable[..., VisionConfig] | None, digits: ImageSet):
    """(the image encoder's config, the trained ViT's encoder or None): `vit`'s, or shape's for a digit."""
    _, c, h, w = digits.images.shape
    if cfg.vit is None:
        if shape is None:
            raise ValueError("train_captioner needs the shape of a new ViT, or a trained one (cfg.vit)")
        return shape(image_height=h, image_width=w, channels=c), None
    vit, vit_cfg, _ = load_vit(cfg.vit)
    if (vit_cfg.image_height, vit_cfg.image_width, vit_cfg.channels) != (h, w, c):
        raise UserError(f"{cfg.vit}: a ViT of {vit_cfg.image_width}x{vit_cfg.image_height} images with "
                        f"{vit_cfg.channels} channel(s); the digits are {w}x{h} with {c}")
    return vit_cfg, vit.encoder


def train_captioner(cfg: CaptionTrainConfig, shape: Callable[..., VisionConfig] | None = None,
                    say: Callable[[str], None] = print) -> Path:
    """Train (or resume) a captioner; returns the run directory, whose top holds the best model.

    Its image encoder is the ViT of `cfg.vit`, frozen, or else a new ViT of shape(image_height=,
    image_width=, channels=) (a digit's size), trained with the bridge.
    """
    with guard(cfg.loop.out, say):
        lm, lm_cfg, tokenizer, _ = modeldir.load_model_dir(cfg.lm)
        if lm_cfg.arch != "decoder":
            raise UserError(f"{cfg.lm}: not a decoder-only language model (arch {lm_cfg.arch!r}); "
                            "train one with lm train")
        parts = digit_splits(cfg.images, cfg.bundled)
        valid_images, valid_captions = compose(parts["valid"], cfg.valid_canvases, seed=1)
        vision, encoder = _vision(cfg, shape, parts["train"])
        tiles = valid_images.size(-1) // vision.image_width
        wanted = caption_config(cfg, vision, lm_cfg, tokenizer, tiles)
        device = resolve_device(cfg.loop.device)
        meta = {"caption": cfg.to_dict()}
        model, stored, state, loop = start(cfg.loop, wanted, meta, lambda c: build_captioner(c, lm, encoder),
                                           load_captioner, wanted.vision.d_model, device, say)
        say(f"{stored.bridge} captioner: {trained_parameters(model):,} trained parameters "
            f"({sum(p.numel() for p in model.parameters()):,} in all)")

        def batch(step: int):
            images, captions = compose(parts["train"], cfg.batch_size, seed=loop.seed * 1_000_003 + step)
            tgt_in, tgt_out = caption_ids(tokenizer, captions, stored)
            return images.to(device), tgt_in.to(device), tgt_out.to(device)

        valid_batch = caption_ids(tokenizer, valid_captions, stored)

        def validate(model: Captioner) -> dict[str, float]:
            loss, n = caption_loss(model, (valid_images.to(device), *(t.to(device) for t in valid_batch)))
            return {"exact": exact_match(model, tokenizer, valid_images, valid_captions), "loss": loss.item() / n}

        objective = Objective(batch=batch, loss=caption_loss, validate=validate, best_metric="exact",
                              higher_is_better=True)
        return fit(loop, model, stored, tokenizer, objective, state, meta, say)
