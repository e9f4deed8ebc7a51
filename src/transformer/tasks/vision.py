"""ViT image classification: training on an image folder or a bundled set, prediction, and what the
vision tasks share (their model directories, starting or resuming a run).

Data. `--images DIR` is an image folder (one subfolder per class); its fixed random tenth
(seed 0) is the validation part. `--bundled digits|mnist` is a set of `images.data`, split
once and for all (seed 0) into test (20%, never used in training), validation (10%) and
training (70%) parts; `scripts/vision_results.py` reports the test part. A batch is
`batch_size` training images drawn with a generator seeded with (seed, step), each moved,
turned and scaled at random within `shift`, `rotate` and `scale` (`images.data.random_affine`),
so a run resumes exactly. Validation
accuracy picks the best model.

A model directory of a vision task holds what a text model's does (config.json,
model.safetensors, checkpoints, train_state.pt, log.jsonl): config.json's "model" is the
`VisionConfig` (or `CaptionConfig`) and its meta names the classes; a classifier has no
vocabulary, so its tokenizer.model is empty.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from transformer.config import VisionConfig
from transformer.errors import UserError
from transformer.images.data import ImageSet, bundled, random_affine, read_folder, split
from transformer.model.models import init_weights
from transformer.model.vision import ViT, build_vit
from transformer.store.kinds import load_vit
from transformer.training.checkpoint import list_checkpoints
from transformer.store import modeldir
from transformer.training.lock import guard
from transformer.training.loop import LoopConfig, Objective, fit
from transformer.device import resolve_device
from transformer.training.run import check_resume, freeze

TEST_FRACTION, VALID_FRACTION = 0.2, 0.1


@dataclass(frozen=True)
class ViTConfig:
    """What a ViT training run reads: the images (a folder or a bundled set) and how it batches them."""

    loop: LoopConfig
    images: Path | None = None
    bundled: str | None = None
    batch_size: int = 64
    shift: float = 1.0  # augmentation: pixels an image may move along each axis,
    rotate: float = 0.0  # degrees it may turn,
    scale: float = 0.0  # and how much it may grow or shrink (a factor within 1 ± scale)

    def to_dict(self) -> dict:
        return {"images": None if self.images is None else str(self.images), "bundled": self.bundled,
                "batch_size": self.batch_size, "shift": self.shift, "rotate": self.rotate, "scale": self.scale}


class _NoVocabulary:
    """The tokenizer of a classifier's model directory: none (an empty tokenizer.model)."""

    def to_bytes(self) -> bytes:
        return b""


def splits(images: Path | None, name: str | None) -> dict[str, ImageSet]:
    """{"train", "valid"} of an image folder, or {"test", "valid", "train"} of a bundled set (fixed, seed 0)."""
    if (images is None) == (name is None):
        raise UserError("give the images: `images` DIR or `bundled` NAME (one of them)")
    if images is not None:
        data = read_folder(images)
        valid, train = split(len(data), (VALID_FRACTION,))
        return {"train": data.subset(train), "valid": data.subset(valid)}
    data = bundled(name)
    test, valid, train = split(len(data), (TEST_FRACTION, VALID_FRACTION))
    return {"train": data.subset(train), "valid": data.subset(valid), "test": data.subset(test)}


def start(loop: LoopConfig, wanted, meta: dict, build: Callable, load: Callable, d_model: int, device: torch.device,
          say: Callable[[str], None]):
    """(model, its config, train state or None, the loop with its optimiser resolved) of a new run, or of
    the newest checkpoint when resuming; refuses a new run over an old one, and a resume that changes it."""
    checkpoints = list_checkpoints(loop.out)
    if checkpoints and not loop.resume:
        raise UserError(f"{loop.out} already holds a training run; pass `resume` to continue it, or choose "
                        "another `out`")
    loop = dataclasses.replace(loop, optim=loop.optim.resolve(d_model, loop.max_steps))
    if loop.init is not None:
        wanted = _initial(loop.init, wanted, device)
    if not (loop.resume and checkpoints):
        torch.manual_seed(loop.seed)
        model = build(wanted) if loop.init is None else _from_init(loop.init, wanted, load, device, say)
        freeze(model, loop.freeze)
        return model.to(device), wanted, None, loop
    model, cfg, recorded = load(checkpoints[-1], device)
    freeze(model, loop.freeze)
    state = modeldir.load_train_state(checkpoints[-1])
    if state is None:
        raise UserError(f"{checkpoints[-1]}: checkpoint has no training state to resume from")
    check_resume(loop.out, {"model": cfg.to_dict(), **recorded}, {"model": wanted.to_dict(), "loop": loop.to_dict(),
                                                                  **meta}, say)
    say(f"resuming from {checkpoints[-1]} (step {state['step']})")
    return model.train(), cfg, state, loop


def _initial(init: Path, wanted: VisionConfig, device: torch.device) -> VisionConfig:
    """The config a run fine-tuning the model in `init` trains: its own, with the data's number of classes;
    `UserError` when the data's images are not the size and channels the model takes."""
    _, cfg, _ = load_vit(init, device)
    have, need = (cfg.image_height, cfg.image_width, cfg.channels), (wanted.image_height, wanted.image_width,
                                                                   wanted.channels)
    if have != need:
        raise UserError(f"`init` {init}: the model takes {have[0]}x{have[1]} images of {have[2]} channel(s), "
                        f"the data has {need[0]}x{need[1]} of {need[2]}")
    return cfg.replace(n_classes=wanted.n_classes)


def _from_init(init: Path, wanted: VisionConfig, load: Callable, device: torch.device, say: Callable) -> ViT:
    """The ViT of `init`, with a new classifier head when the data's classes are not the model's."""
    model, cfg, meta = load(init, device)
    say(f"starting from the weights of {init}")
    if cfg.n_classes != wanted.n_classes or meta.get("classes") is None:
        say(f"a new classifier head for {wanted.n_classes} classes")
        model.head = torch.nn.Linear(cfg.d_model, wanted.n_classes, device=model.head.weight.device)
        init_weights(model.head)
        model.cfg = wanted
    return model.train()


def accuracy(model: ViT, data: ImageSet, batch_size: int = 256) -> float:
    """The share of `data` the model classifies right."""
    device = next(model.parameters()).device
    right = 0
    for i in range(0, len(data), batch_size):
        logits = model(data.images[i : i + batch_size].to(device))
        right += int((logits.argmax(-1).cpu() == data.labels[i : i + batch_size]).sum())
    return right / max(len(data), 1)


def train_vit(cfg: ViTConfig, shape: Callable[..., VisionConfig], say: Callable[[str], None] = print) -> Path:
    """Train (or resume) a ViT classifier of shape(image_height=, image_width=, channels=, n_classes=) (what
    the data decides); returns the run directory, whose top holds the best model."""
    with guard(cfg.loop.out, say):
        parts = splits(cfg.images, cfg.bundled)
        train, valid = parts["train"], parts["valid"]
        _, c, h, w = train.images.shape
        wanted = shape(image_height=h, image_width=w, channels=c, n_classes=len(train.classes))
        device = resolve_device(cfg.loop.device)
        meta = {"vit": cfg.to_dict(), "classes": list(train.classes)}
        model, stored, state, loop = start(cfg.loop, wanted, meta, build_vit, load_vit, wanted.d_model, device, say)
        say(f"ViT: {sum(p.numel() for p in model.parameters()):,} parameters, {stored.n_patches} patches of "
            f"{stored.patch_size}x{stored.patch_size}; {len(train)} training, {len(valid)} validation images")

        def batch(step: int):
            generator = torch.Generator().manual_seed(loop.seed * 1_000_003 + step)
            index = torch.randint(len(train), (cfg.batch_size,), generator=generator)
            images = random_affine(train.images[index], generator, cfg.shift, cfg.rotate, cfg.scale)
            return images.to(device), train.labels[index].to(device)

        def loss(model: ViT, batch) -> tuple[torch.Tensor, int]:
            images, labels = batch
            return F.cross_entropy(model(images).float(), labels, reduction="sum"), labels.numel()

        objective = Objective(batch=batch, loss=loss, validate=lambda m: {"accuracy": accuracy(m, valid)},
                              best_metric="accuracy", higher_is_better=True)
        return fit(loop, model, stored, _NoVocabulary(), objective, state, meta, say)
