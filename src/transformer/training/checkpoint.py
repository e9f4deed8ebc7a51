"""Checkpoints: self-contained model directories that a crash never leaves unloadable.

A model directory holds::

    config.json        {"model": ModelConfig.to_dict(), "meta": {...caller's extras}}
    tokenizer.model    the SentencePiece model, as bytes
    model.safetensors  the weights; a tensor tied under several names is stored once,
                       the other names are kept as aliases in the file's metadata
    train_state.pt     optional: torch.save of the trainer's dict (optimizer, scheduler,
                       RNG states, step, data position); read with weights_only=True,
                       so it may hold tensors, numbers, strings, lists, tuples and dicts

A training run is laid out as::

    RUN/                             a model directory holding the BEST checkpoint,
                                     so that ``translate --model RUN`` works
    RUN/log.jsonl                    the training log
    RUN/checkpoints/step_00001000/   the last K model directories, each with
                                     train_state.pt: resume reads the newest, and
                                     ``average RUN/checkpoints/step_*`` averages them

Crash safety. A single file is written by `atomic_write_bytes`: a temporary file in
the same directory, fsync, `os.replace`, fsync of the directory. `save_model_dir`
replaces a model directory as a whole, so that a process killed at any moment leaves
either the old or the new checkpoint loadable, never a mix:

* A directory that does not exist yet is built as the sibling ``.tmp-<name>-<pid>``
  and renamed into place, so it appears complete or not at all.
* An existing directory cannot be swapped for a new one, because RUN/ also holds
  log.jsonl and checkpoints/. Its files are replaced through a roll-forward journal:

  1. each new file is written and fsynced as ``<file>.next``; a crash here leaves
     the old checkpoint in force, as readers ignore ``.next`` files without a journal;
  2. the journal ``.commit``, the list of the new files, is written atomically: from
     this moment the new checkpoint is the one in force;
  3. each ``<file>.next`` is renamed over ``<file>``, files not listed are deleted,
     and ``.commit`` is deleted.

  While ``.commit`` exists, readers take ``<file>.next`` if it is still there and
  ``<file>`` otherwise, and treat files it does not list as absent. The next save
  first finishes an interrupted step 3, or deletes uncommitted ``.next`` files.

`prune_checkpoints` renames a directory to ``.del-<name>`` before deleting it, so a
half-deleted checkpoint is never listed. A reader running while another process
rewrites the same directory is not supported.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from transformer.config import ModelConfig
from transformer.errors import UserError
from transformer.model.models import build_model

if TYPE_CHECKING:
    from transformer.text.tokenizer import Tokenizer

CONFIG, TOKENIZER, WEIGHTS, TRAIN_STATE = "config.json", "tokenizer.model", "model.safetensors", "train_state.pt"
_FILES = (CONFIG, TOKENIZER, WEIGHTS, TRAIN_STATE)
_JOURNAL = ".commit"
_NEXT = ".next"
_STEP_DIR = re.compile(r"step_(\d{8,})")


def _fsync_dir(path: Path) -> None:
    """Make the directory's entries (creations, renames, deletions) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it (not atomic on its own)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that it holds either the old or the new content, even after a crash."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _write_file(tmp, data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 `text`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _state_bytes(model: nn.Module) -> bytes:
    """The model's state_dict as safetensors bytes, each tied tensor stored once under its first name."""
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.dtype, t.shape, t.stride())
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
            tensors[name] = t.detach().cpu().contiguous()
    return safetensors_bytes(tensors, metadata={"aliases": json.dumps(aliases)})


def _read_state(file: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The stored tensors of a safetensors file (on CPU) and its alias -> stored-name map."""
    try:
        with safe_open(file, "pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
            return {k: f.get_tensor(k) for k in f.keys()}, aliases
    except FileNotFoundError:
        raise UserError(f"{file}: no such file") from None
    except (SafetensorError, ValueError) as e:
        raise UserError(f"{file}: not a valid weights file ({e})") from None


def _load_state(model: nn.Module, file: Path) -> None:
    """Copy the weights in `file` into `model`, requiring every name and shape to match."""
    tensors, aliases = _read_state(file)
    try:
        model.load_state_dict(tensors | {a: tensors[s] for a, s in aliases.items()})
    except (RuntimeError, KeyError) as e:
        raise UserError(f"{file}: weights do not fit the model: {' '.join(str(e).split())}") from None


def save_weights(model: nn.Module, path: Path) -> None:
    """Write the model's weights to the safetensors file `path`, atomically."""
    atomic_write_bytes(Path(path), _state_bytes(model))


def load_weights(model: nn.Module, path: Path) -> None:
    """Load weights written by `save_weights` into `model` (strictly); `UserError` naming `path` on failure."""
    _load_state(model, Path(path))


def _journal(path: Path) -> set[str] | None:
    """The files listed by the journal of model directory `path`, or None when there is none."""
    try:
        return set(json.loads((path / _JOURNAL).read_text()))
    except FileNotFoundError:
        return None


def _resolve(path: Path, name: str) -> Path | None:
    """The file that currently holds `name` in model directory `path`, or None if it has none."""
    listed = _journal(path)
    if listed is not None:
        if name not in listed:
            return None
        if (path / (name + _NEXT)).exists():
            return path / (name + _NEXT)
    return path / name if (path / name).is_file() else None


def _finish_journal(path: Path) -> None:
    """Step 3 of the journal when one exists; otherwise delete uncommitted ``.next`` and temporary files."""
    listed = _journal(path)
    for name in _FILES:
        staged = path / (name + _NEXT)
        if listed is None:
            staged.unlink(missing_ok=True)
        elif staged.exists():
            os.replace(staged, path / name)
        elif name not in listed:
            (path / name).unlink(missing_ok=True)
    for stale in path.glob(glob.escape(f".{_JOURNAL}.tmp-") + "*"):
        stale.unlink()
    if listed is not None:
        _fsync_dir(path)
        (path / _JOURNAL).unlink()
    _fsync_dir(path)


def save_model_dir(
    path: Path,
    model: nn.Module,
    cfg: ModelConfig,
    tokenizer_bytes: bytes,
    train_state: dict | None = None,
    meta: dict | None = None,
) -> None:
    """Write (or replace) the model directory `path` as a whole; see the module docstring.

    `meta` (JSON-serialisable) is stored in config.json and returned by `load_model_dir`;
    `train_state` is stored as train_state.pt and returned by `load_train_state`.
    """
    path = Path(path)
    files = {
        CONFIG: json.dumps({"model": cfg.to_dict(), "meta": meta or {}}, indent=2).encode("utf-8"),
        TOKENIZER: tokenizer_bytes,
        WEIGHTS: _state_bytes(model),
    }
    if train_state is not None:
        buffer = io.BytesIO()
        torch.save(train_state, buffer)
        files[TRAIN_STATE] = buffer.getvalue()
    if path.is_dir():
        _finish_journal(path)
        for name, data in files.items():
            _write_file(path / (name + _NEXT), data)
        _fsync_dir(path)
        atomic_write_text(path / _JOURNAL, json.dumps(sorted(files)))
        _finish_journal(path)
    else:
        for stale in path.parent.glob(glob.escape(f".tmp-{path.name}-") + "*"):
            shutil.rmtree(stale)
        tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
        tmp.mkdir(parents=True)
        for name, data in files.items():
            _write_file(tmp / name, data)
        _fsync_dir(tmp)
        os.rename(tmp, path)
        _fsync_dir(path.parent)


def _need(path: Path, name: str) -> Path:
    """The file holding `name` in model directory `path`; `UserError` if there is none."""
    file = _resolve(path, name)
    if file is None:
        raise UserError(f"{path}: model directory has no {name}")
    return file


def _read_config(path: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The model config and meta dict stored in model directory `path`."""
    if not path.is_dir():
        raise UserError(f"{path}: {'not a directory' if path.exists() else 'no such directory'}")
    file = _resolve(path, CONFIG)
    if file is None:
        raise UserError(f"{path} is not a model directory (no {CONFIG})")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{path / CONFIG}: invalid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise UserError(f'{path / CONFIG}: no "model" section')
    try:
        return ModelConfig.from_dict(data["model"]), data.get("meta", {})
    except (UserError, TypeError, ValueError) as e:
        raise UserError(f"{path / CONFIG}: bad model config: {e}") from None


def load_model_dir(
    path: Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, ModelConfig, "Tokenizer", dict[str, Any]]:
    """The model (in eval mode, on `device`), its config, tokenizer and meta dict saved in `path`.

    Raises `UserError` naming the path when a piece is missing, corrupt or does not fit.
    """
    from transformer.text.tokenizer import Tokenizer

    path = Path(path)
    cfg, meta = _read_config(path)
    try:
        tokenizer = Tokenizer.from_bytes(_need(path, TOKENIZER).read_bytes())
    except ValueError as e:
        raise UserError(f"{path / TOKENIZER}: bad tokenizer model: {e}") from None
    model = build_model(cfg)
    _load_state(model, _need(path, WEIGHTS))
    return model.to(device).eval(), cfg, tokenizer, meta


def load_train_state(path: Path) -> dict | None:
    """The training state saved in model directory `path`, on CPU, or None if it has none."""
    file = _resolve(Path(path), TRAIN_STATE)
    if file is None:
        return None
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file fails anywhere in the unpickler, with many exception types
        raise UserError(f"{Path(path) / TRAIN_STATE}: cannot read training state ({e})") from None


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` goes: ``run_dir/checkpoints/step_<8 digits>``."""
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoint directories of a run, oldest step first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all checkpoints of the run but the newest `keep` (and leftovers of interrupted deletes)."""
    checkpoints = list_checkpoints(run_dir)
    for stale in (Path(run_dir) / "checkpoints").glob(".del-*"):
        shutil.rmtree(stale)
    for old in checkpoints[: max(len(checkpoints) - keep, 0)]:
        trash = old.with_name(".del-" + old.name)
        os.rename(old, trash)
        shutil.rmtree(trash)


def average_checkpoints(paths: Sequence[Path]) -> dict[str, Tensor]:
    """Parameter-wise mean of the weights saved in model directories `paths`: a full state_dict.

    Sums in fp32 and casts back to each tensor's saved dtype. Tied names map to one tensor.
    `UserError` if the checkpoints' configs, tensor names or shapes differ.
    """
    if not paths:
        raise UserError("no checkpoints to average")
    first = Path(paths[0])
    cfg, _ = _read_config(first)
    template, aliases = _read_state(_need(first, WEIGHTS))
    sums = {k: t.to(torch.float32, copy=True) for k, t in template.items()}
    for path in map(Path, paths[1:]):
        if _read_config(path)[0] != cfg:
            raise UserError(f"{path}: model config differs from {first}'s")
        tensors, _ = _read_state(_need(path, WEIGHTS))
        if {k: t.shape for k, t in tensors.items()} != {k: t.shape for k, t in template.items()}:
            raise UserError(f"{path}: tensor names or shapes differ from {first}'s")
        for k, t in tensors.items():
            sums[k] += t
    mean = {k: (s / len(paths)).to(template[k].dtype) for k, s in sums.items()}
    return mean | {a: mean[s] for a, s in aliases.items()}


def write_average(paths: Sequence[Path], out_dir: Path) -> None:
    """Write a model directory (no train_state) with the average of `paths`' weights.

    Config and tokenizer come from the first; its meta gains ``averaged_from``.
    """
    mean = average_checkpoints(paths)
    first = Path(paths[0])
    cfg, meta = _read_config(first)
    model = build_model(cfg)
    model.load_state_dict(mean)
    meta = meta | {"averaged_from": [str(p) for p in paths]}
    save_model_dir(Path(out_dir), model, cfg, _need(first, TOKENIZER).read_bytes(), meta=meta)
