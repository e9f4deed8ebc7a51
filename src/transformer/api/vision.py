"""The image models from Python: `ImageClassifier` (a ViT) and `Captioner` (made by `transformer.load`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from transformer.config import CaptionConfig, VisionConfig
from transformer.errors import UserError
from transformer.images.data import read_images
from transformer.inference.captions import generate
from transformer.inference.classify import predict
from transformer.text.tokenizer import Tokenizer


def _images(images: Any, channels: int, size: tuple[int, int]) -> tuple[torch.Tensor, bool]:
    """((N, C, H, W) of paths or PIL images, or of one), whether one was given."""
    one = isinstance(images, (str, Path)) or hasattr(images, "convert")
    items = [images] if one else images
    if not isinstance(items, (list, tuple)) or not items:
        raise UserError("`images`: give a path or PIL image, or a non-empty list of them")
    return read_images(list(items), channels, size), one


class ImageClassifier:
    """A ViT image classifier. Made by `transformer.load`; `config` (a `VisionConfig`), `classes` (the class
    names, index = class id), `model`; no tokenizer (None)."""

    def __init__(self, config: VisionConfig, model: nn.Module, classes: list[str]) -> None:
        self.config, self.model, self.classes, self.tokenizer = config, model, classes, None

    def predict(self, images: Any, batch_size: int = 256) -> tuple[str, float] | list[tuple[str, float]]:
        """(class name, its probability) of an image, or of each of a list of images: paths or PIL images
        of the model's size (`config.image_height` × `config.image_width`)."""
        batch, one = _images(images, self.config.channels, (self.config.image_height, self.config.image_width))
        labels, probs = predict(self.model, batch, batch_size)
        out = [(self.classes[label], prob) for label, prob in zip(labels.tolist(), probs.tolist())]
        return out[0] if one else out


class Captioner:
    """An image-to-text model: a ViT, a bridge (Q-Former or gated cross-attention) and a language model.
    Made by `transformer.load`; `config` (a `CaptionConfig`), `tokenizer`, `model`."""

    def __init__(self, config: CaptionConfig, tokenizer: Tokenizer, model: nn.Module) -> None:
        self.config, self.tokenizer, self.model = config, tokenizer, model

    def caption(self, images: Any, beam: int = 1, alpha: float = 0.6, batch_size: int = 256) -> str | list[str]:
        """The caption of an image, or of each of a list (paths or PIL images of the model's size);
        greedy (beam 1) or beam search with length penalty `alpha`."""
        batch, one = _images(images, self.config.vision.channels, self.config.image_size)
        with torch.no_grad():
            out = generate(self.model, self.tokenizer, batch, beam, alpha, batch_size)
        return out[0] if one else out
