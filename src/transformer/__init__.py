"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017), written from the paper.

From Python::

    import transformer

    model = transformer.load("runs/ende")           # a Translator, LanguageModel, MaskedLM, ImageClassifier
    model.translate("A man is riding a horse.")     # or Captioner, after what the folder holds

    run = transformer.train(transformer.TranslationConfig(...))   # the command line's training, from Python

Everything listed in `__all__` is the public surface; the rest of the package is internal. The
names are imported when first used, so that ``import transformer`` (and the command line) stays quick.
"""

from __future__ import annotations

import os
from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# oneDNN, which computes PyTorch's bf16 matrix products on CPUs with AVX-512-BF16 or AMX, keeps
# every primitive it compiles, one for each shape, up to 1,024 of them by default: with the many
# batch shapes of real data that cache grows by gigabytes (PyTorch issues 27971 and 98688). One
# training step of `small` multiplies matrices of 20 distinct shapes (benchmarks/memory.py), so 256
# keeps a step's own and some steps' more. oneDNN reads it when it makes its first primitive, so
# this holds unless the program ran oneDNN before importing transformer; a value set by the user wins.
ONEDNN_CACHE = 256
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_CACHE))

# public name -> the module that defines it
_PUBLIC = {
    "load": "transformer.api.load", "train": "transformer.api.train",
    "Translator": "transformer.api.text", "LanguageModel": "transformer.api.text", "MaskedLM": "transformer.api.text",
    "TextClassifier": "transformer.api.text",
    "ImageClassifier": "transformer.api.vision", "Captioner": "transformer.api.vision",
    "Error": "transformer.errors", "UserError": "transformer.errors",
    "ModelConfig": "transformer.config", "VisionConfig": "transformer.config", "preset": "transformer.config",
    "vision_preset": "transformer.config", "PRESETS": "transformer.config",
    "TranslationConfig": "transformer.tasks.translation", "LMConfig": "transformer.tasks.lm",
    "MLMConfig": "transformer.tasks.mlm", "ViTConfig": "transformer.tasks.vision",
    "CaptionTrainConfig": "transformer.tasks.caption", "ClassifyConfig": "transformer.tasks.classify",
    "LoopConfig": "transformer.training.loop",
    "OptimConfig": "transformer.training.optim",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'transformer' has no attribute {name!r}")
    value = getattr(import_module(_PUBLIC[name]), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from transformer.api.load import load  # noqa: F401
    from transformer.api.text import LanguageModel, MaskedLM, TextClassifier, Translator  # noqa: F401
    from transformer.api.train import train  # noqa: F401
    from transformer.api.vision import Captioner, ImageClassifier  # noqa: F401
    from transformer.config import PRESETS, ModelConfig, VisionConfig, preset, vision_preset  # noqa: F401
    from transformer.errors import Error, UserError  # noqa: F401
    from transformer.tasks.caption import CaptionTrainConfig  # noqa: F401
    from transformer.tasks.classify import ClassifyConfig  # noqa: F401
    from transformer.tasks.lm import LMConfig  # noqa: F401
    from transformer.tasks.mlm import MLMConfig  # noqa: F401
    from transformer.tasks.translation import TranslationConfig  # noqa: F401
    from transformer.tasks.vision import ViTConfig  # noqa: F401
    from transformer.training.loop import LoopConfig  # noqa: F401
    from transformer.training.optim import OptimConfig  # noqa: F401
