"""A local Hugging Face model folder, read for import: config.json, the weights, the tokenizer files.

Nothing is downloaded: the folder is one a user already has (`save_pretrained`'s output, or a copy of
a Hub repository). Weights are read from model.safetensors (or its shards through
model.safetensors.index.json), else from pytorch_model.bin with ``torch.load(weights_only=True)``,
which unpickles tensors and containers only. Every problem is a `UserError` of one line naming the
folder and the file, option or tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from transformer.errors import UserError

SAFETENSORS, SHARD_INDEX, TORCH_BIN = "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"


@dataclass
class HFFolder:
    """A Hugging Face folder: its path, its config.json as a dict, and its tensors by name (CPU, fp32)."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, Tensor] = field(repr=False)

    @classmethod
    def open(cls, path: str | Path) -> "HFFolder":
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"{path}: {'not a directory' if path.exists() else 'no such directory'}")
        config = read_json(path / "config.json")
        if not isinstance(config, dict):
            raise UserError(f"{path / 'config.json'}: not a JSON object")
        return cls(path, config, _read_tensors(path))

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    def option(self, key: str, default: Any = None) -> Any:
        """config.json's `key`, or `default` when it is absent."""
        return self.config.get(key, default)

    def need(self, key: str) -> Any:
        """config.json's `key`; `UserError` when it is absent."""
        if key not in self.config:
            raise UserError(f"{self.path / 'config.json'}: no {key!r}")
        return self.config[key]

    def refuse(self, key: str, value: Any, why: str) -> None:
        """`UserError` naming option `key` = `value` of config.json and why it cannot be imported."""
        raise UserError(f"{self.path / 'config.json'}: {key} {value!r}: {why}")

    def expect(self, key: str, wanted: Any, default: Any = None, why: str = "not supported") -> None:
        """Refuse the folder unless option `key` (absent: `default`) equals `wanted` (or is one of a tuple)."""
        value = self.config.get(key, default)
        ok = value in wanted if isinstance(wanted, tuple) else value == wanted
        if not ok:
            self.refuse(key, value, why)

    def tensor(self, name: str, shape: tuple[int, ...] | None = None, *alternatives: str) -> Tensor:
        """The tensor `name` (or the first of `alternatives` present: checkpoints differ in prefixes) as fp32;
        `UserError` when it is missing or its shape is not `shape`."""
        for key in (name, *alternatives):
            if key in self.tensors:
                t = self.tensors[key]
                if shape is not None and tuple(t.shape) != tuple(shape):
                    raise UserError(f"{self.path}: tensor {key} has shape {tuple(t.shape)}, the config says "
                                    f"{tuple(shape)}")
                return t.float()
        raise UserError(f"{self.path}: no tensor {name} in the weights")

    def has(self, name: str) -> bool:
        return name in self.tensors

    def file(self, name: str) -> Path | None:
        """The folder's file `name`, or None when it has none."""
        file = self.path / name
        return file if file.is_file() else None


def read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{file}: no such file (a Hugging Face model folder has one)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{file}: cannot read: {' '.join(str(e).split())}") from None


def _read_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if (path / SAFETENSORS).is_file():
        files = [path / SAFETENSORS]
    elif (path / SHARD_INDEX).is_file():
        index = read_json(path / SHARD_INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise UserError(f"{path / SHARD_INDEX}: no \"weight_map\" object")
        files = [path / name for name in sorted(set(map(str, weight_map.values())))]
    elif (path / TORCH_BIN).is_file():
        return _read_torch_bin(path / TORCH_BIN)
    else:
        raise UserError(f"{path}: no weights ({SAFETENSORS}, {SHARD_INDEX} or {TORCH_BIN})")
    tensors: dict[str, Tensor] = {}
    for file in files:
        try:
            tensors |= load_file(file)
        except FileNotFoundError:
            raise UserError(f"{file}: no such file (named by {SHARD_INDEX})") from None
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{file}: not a valid safetensors file ({' '.join(str(e).split())})") from None
    return tensors


def _read_torch_bin(file: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or unsafe pickle fails anywhere in the unpickler
        raise UserError(f"{file}: cannot read ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(t, Tensor) for t in state.values()):
        raise UserError(f"{file}: not a state dict of tensors")
    return dict(state)
