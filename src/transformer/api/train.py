"""`train`: a training run of any task from Python, as the command line runs it."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from transformer.config import ModelConfig, VisionConfig, preset, vision_preset
from transformer.errors import UserError
from transformer.tasks.caption import CaptionTrainConfig, train_captioner
from transformer.tasks.classify import ClassifyConfig, train_classifier
from transformer.tasks.lm import LMConfig, train_lm
from transformer.tasks.mlm import MLMConfig, train_mlm
from transformer.tasks.translation import TranslationConfig
from transformer.tasks.translation import train as train_translation
from transformer.tasks.vision import ViTConfig, train_vit

TaskConfig = TranslationConfig | LMConfig | MLMConfig | ViTConfig | CaptionTrainConfig | ClassifyConfig


def _vision_shape(model: str | VisionConfig | None, default: str) -> Callable[..., VisionConfig]:
    """shape(**what the data decides) -> the ViT's config: a preset name's, or `model`'s own fields."""
    if isinstance(model, VisionConfig):
        return lambda **data: model.replace(**data)
    return lambda **data: vision_preset(model or default, **data)


def train(config: TaskConfig, model: ModelConfig | VisionConfig | str | None = None,
          say: Callable[[str], None] = print) -> Path:
    """Train (or, with `config.loop.resume`, resume) a model; returns the run directory, whose top holds the
    best model (give it to `transformer.load`).

    `config`: the task's config (`TranslationConfig`, `LMConfig`, `MLMConfig`, `ViTConfig`,
    `CaptionTrainConfig`, `ClassifyConfig`), with a `LoopConfig` as its `loop` (out, steps or minutes, optimiser, ...).
    `model`: the shape, a `ModelConfig` (text tasks; default: the `small` preset, `preset("small")`) or,
    for a ViT or a captioner's image encoder, a `VisionConfig` or a vision preset's name (default
    "tiny"); what the data decides (the vocabulary, the image size, the classes) is set from the data.
    `say` gets the progress lines (the command line's). The run is locked, resumable, and written
    atomically, as from the command line; a problem is a `UserError`.
    """
    if isinstance(config, ClassifyConfig):  # its shape is the pre-trained encoder's (`config.model`)
        if model is not None:
            raise UserError("`model`: a classifier takes the shape of its pre-trained encoder (`config.model`)")
        return train_classifier(config, say=say)
    if isinstance(config, (TranslationConfig, LMConfig, MLMConfig)):
        if model is not None and not isinstance(model, ModelConfig):
            raise UserError(f"`model`: a text task's shape is a ModelConfig, not {type(model).__name__}")
        shape = model or preset("small")
        if isinstance(config, TranslationConfig):
            return train_translation(config, shape, say=say)
        if isinstance(config, LMConfig):
            return train_lm(config, shape, say=say)
        return train_mlm(config, shape.replace(max_len=config.max_len), say=say)
    if isinstance(model, ModelConfig):
        raise UserError("`model`: an image model's shape is a VisionConfig or a vision preset's name")
    if isinstance(config, ViTConfig):
        return train_vit(config, _vision_shape(model, "tiny"), say=say)
    if isinstance(config, CaptionTrainConfig):
        return train_captioner(config, None if model is None else _vision_shape(model, "tiny"), say=say)
    raise UserError(f"`config`: not a task's config ({type(config).__name__}); give a TranslationConfig, "
                    "LMConfig, MLMConfig, ViTConfig, CaptionTrainConfig or ClassifyConfig")
