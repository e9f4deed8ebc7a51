"""What kind of model a path holds, and the loaders of the vision models.

Kinds: ``translation`` (an encoder-decoder), ``lm`` (decoder-only), ``mlm`` (a BERT-style
encoder), ``classifier`` (such an encoder fine-tuned to label texts: `transformer classify`), ``vit`` (an image classifier), ``captioner`` (a ViT, a bridge and an LM),
``ctranslate2`` (a folder of `transformer export --to ctranslate2`, translation or LM) and
``huggingface`` (a Hugging Face model folder, which `pretrained` converts on loading). A training
run directory, one of its checkpoints and an averaged model are all model directories
(`store.modeldir`); the kind is read from their config.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from transformer.config import CaptionConfig, ModelConfig, VisionConfig
from transformer.errors import UserError
from transformer.model.captioner import Captioner, build_captioner
from transformer.model.classifier import POOLS, EncoderClassifier
from transformer.model.vision import ViT, build_vit
from transformer.store import modeldir
from transformer.text.tokenizer import Tokenizer

KINDS = ("translation", "lm", "mlm", "classifier", "vit", "captioner", "ctranslate2", "huggingface")
ARCH_KINDS = {"encoder-decoder": "translation", "decoder": "lm", "encoder": "mlm"}
# An exported CTranslate2 folder: CTranslate2's model.bin, our tokenizer and our model config beside it.
CT2_MODEL, CT2_TOKENIZER, CT2_CONFIG = "model.bin", "tokenizer.model", "transformer.json"


def is_ctranslate2_dir(path: str | Path) -> bool:
    """Whether `path` is a folder written by `transformer export --to ctranslate2`."""
    path = Path(path)
    return (path / CT2_MODEL).is_file() and (path / CT2_CONFIG).is_file()


def is_huggingface_dir(path: str | Path) -> bool:
    """Whether `path` is a Hugging Face model folder (a config.json naming a `model_type`, not ours)."""
    file = Path(path) / modeldir.CONFIG
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" in config and "model" not in config


def model_kind(path: str | Path) -> str:
    """The kind (one of `KINDS`) of the model in `path`; `UserError` naming the path when it holds none."""
    path = Path(path)
    if is_ctranslate2_dir(path):
        return "ctranslate2"
    if is_huggingface_dir(path):
        return "huggingface"
    model, meta = modeldir.read_config(path)  # UserError: no such directory, not a model directory, bad JSON
    if "vit" in meta:
        return "vit"
    if "caption" in meta:
        return "captioner"
    if "classify" in meta:
        return "classifier"
    return ARCH_KINDS.get(model.get("arch", "encoder-decoder"), "translation")  # else loading says what is wrong


def load_vision_dir(path: Path, parse: Callable[[dict], object], build: Callable[..., nn.Module], kind: str,
                    device: str | torch.device = "cpu"):
    """(model in eval mode, config, meta) of a vision model directory; `kind` is the meta key of the task."""
    model_dict, meta = modeldir.read_config(path)
    if kind not in meta:
        raise UserError(f"{path}: not a {kind} model directory")
    try:
        cfg = parse(model_dict)
    except (UserError, TypeError, ValueError) as e:
        raise UserError(f"{Path(path) / modeldir.CONFIG}: bad model config: {e}") from None
    model = build(cfg)
    modeldir.load_weights(model, Path(path) / modeldir.WEIGHTS)
    return model.to(device).eval(), cfg, meta


def load_vit(path: Path, device: str | torch.device = "cpu") -> tuple[ViT, VisionConfig, dict]:
    """(ViT in eval mode, its config, meta) of a `transformer vit train` model directory."""
    return load_vision_dir(path, VisionConfig.from_dict, build_vit, "vit", device)


def load_captioner(path: Path, device: str | torch.device = "cpu") -> tuple[Captioner, CaptionConfig, dict]:
    """(captioner in eval mode, its config, meta) of a `transformer caption train` model directory."""
    return load_vision_dir(path, CaptionConfig.from_dict, build_captioner, "caption", device)


def load_text_classifier(path: Path, device: str | torch.device = "cpu"
                         ) -> tuple[EncoderClassifier, ModelConfig, Tokenizer, dict]:
    """(classifier in eval mode, its encoder's config, tokenizer, meta) of a `transformer classify train` model
    directory; meta["classify"] holds the label names ("labels"), "pool" and whether it takes pairs ("pairs")."""
    path = Path(path)
    cfg, meta = modeldir.read_model_config(path)
    task = meta.get("classify")
    labels = task.get("labels") if isinstance(task, dict) else None
    if not isinstance(labels, list) or not labels or task.get("pool") not in POOLS:
        raise UserError(f"{path / modeldir.CONFIG}: not a text classifier (no classify labels and pool in meta)")
    model = EncoderClassifier(cfg, len(labels), task["pool"])
    modeldir.load_weights(model, modeldir.need_file(path, modeldir.WEIGHTS))
    return model.to(device).eval(), cfg, load_tokenizer(path), meta


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer stored in the model directory `path`."""
    file = Path(path) / modeldir.TOKENIZER
    try:
        return Tokenizer.from_bytes(file.read_bytes())
    except (OSError, ValueError) as e:
        raise UserError(f"{file}: cannot read the vocabulary: {e}") from None
