"""Import of pretrained Hugging Face checkpoints into this package's blocks (`transformer import`).

Each family maps its checkpoint's weights onto our models; no Hugging Face module is wrapped:

- Marian / OPUS-MT (`MarianMTModel`) -> `EncoderDecoder` (`marian.py`);
- BERT (`BertForMaskedLM`, `BertForPreTraining`) -> `EncoderOnly` (`bert.py`);
- GPT-2 (`GPT2LMHeadModel`) -> `DecoderOnly` (`gpt2.py`);
- ViT (`ViTForImageClassification`) -> `ViT` (`vision.py`).

The result is a model directory like any other (config.json, tokenizer.model, model.safetensors), so
`transformer.load`, every command and `train --init` take it. Its meta records where it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import Tensor, nn

from transformer.config import ModelConfig, VisionConfig
from transformer.errors import UserError
from transformer.pretrained.folder import HFFolder
from transformer.store import modeldir

FAMILIES = ("marian", "bert", "gpt2", "vit")


@dataclass
class Converted:
    """What a family's converter gives: our config, our state dict, the tokenizer's bytes, the task's meta."""

    config: ModelConfig | VisionConfig
    state: dict[str, Tensor] = field(repr=False)
    tokenizer: bytes
    meta: dict[str, Any]
    kind: str  # translation, lm, mlm or vit


def _converter(model_type: str) -> Callable[[HFFolder], Converted] | None:
    if model_type == "marian":
        from transformer.pretrained.marian import convert
    elif model_type == "bert":
        from transformer.pretrained.bert import convert
    elif model_type == "gpt2":
        from transformer.pretrained.gpt2 import convert
    elif model_type == "vit":
        from transformer.pretrained.vision import convert
    else:
        return None
    return convert


def convert_folder(path: str | Path) -> Converted:
    """The Hugging Face folder `path` converted; `UserError` for a model type, option or tensor we do not take."""
    folder = HFFolder.open(path)
    convert = _converter(folder.model_type)
    if convert is None:
        raise UserError(f"{folder.path / 'config.json'}: model_type {folder.model_type!r} cannot be imported; "
                        f"the families are {', '.join(FAMILIES)}")
    return convert(folder)


def build(converted: Converted) -> nn.Module:
    """Our model of `converted.config` holding the converted weights (strictly: every tensor, every shape)."""
    if converted.kind == "vit":
        from transformer.model.vision import ViT

        model = ViT(converted.config)
    else:
        from transformer.model.models import build_model

        model = build_model(converted.config)
    missing, unexpected = model.load_state_dict(converted.state, strict=False)
    if missing or unexpected:  # a converter's bug, not the user's input: it names the tensors
        raise RuntimeError(f"converted weights do not fit: missing {missing}, unexpected {unexpected}")
    return model.eval()


def import_huggingface(path: str | Path, out: str | Path) -> tuple[str, nn.Module]:
    """Convert the Hugging Face folder `path` and write the model directory `out` (new, or replaced whole).

    Returns the kind of model written and the model itself (in eval mode).
    """
    converted = convert_folder(path)
    model = build(converted)
    meta = converted.meta | {"imported_from": {"path": str(Path(path).resolve()), "format": "huggingface"}}
    modeldir.save_model_dir(Path(out), model, converted.config, converted.tokenizer, meta=meta)
    return converted.kind, model
