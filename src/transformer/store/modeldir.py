"""Model directories: the one place that reads and writes them, for every kind of model.

A crash never leaves one unloadable.

A model directory holds::

    config.json        {"model": ModelConfig.to_dict(), "meta": {...caller's extras}}
    tokenizer.model    the SentencePiece model, as bytes
    model.safetensors  the weights; a tensor tied under several names is stored once,
                       the other names are kept as aliases in the file's metadata
    train_state.pt     optional: torch.save of the trainer's dict (optimizer, scheduler,
                       RNG states, step, data position); read with weights_only=True,
                       so it may hold tensors, numbers, strings, lists, tuples and dicts

A training run's layout (RUN/, RUN/checkpoints/step_*) is `training.checkpoint`'s.

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

A reader running while another process
rewrites the same directory is not supported.

Failures. A write that fails (a full disk, a read-only folder) removes the temporary
files and folders of that save and raises a `UserError` of one line naming the path and
the problem (``runs/x/checkpoints/step_00000004: cannot write: No space left on device``);
what was in force before stays in force. Only a save whose journal was already written
leaves its ``.next`` files: they are the new checkpoint, put in place by the next save or
by `finish_journal` (`training.checkpoint.tidy_run` calls it when a run starts).
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from transformer.config import ModelConfig
from transformer.errors import UserError
from transformer import files as fileops  # through the module: the fault tests tear its writes
from transformer.files import atomic_write_bytes, cannot, discard, fsync_dir, is_tmp_file
from transformer.model.models import build_model

if TYPE_CHECKING:
    from transformer.text.tokenizer import Tokenizer

CONFIG, TOKENIZER, WEIGHTS, TRAIN_STATE = "config.json", "tokenizer.model", "model.safetensors", "train_state.pt"
_FILES = (CONFIG, TOKENIZER, WEIGHTS, TRAIN_STATE)
JOURNAL, NEXT = ".commit", ".next"


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


def read_weights(file: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
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
    tensors, aliases = read_weights(file)
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
        return set(json.loads((path / JOURNAL).read_text()))
    except FileNotFoundError:
        return None


def resolve_file(path: Path, name: str) -> Path | None:
    """The file that currently holds `name` in model directory `path`, or None if it has none."""
    listed = _journal(path)
    if listed is not None:
        if name not in listed:
            return None
        if (path / (name + NEXT)).exists():
            return path / (name + NEXT)
    return path / name if (path / name).is_file() else None


def finish_journal(path: Path) -> None:
    """Step 3 of the journal when one exists; otherwise delete uncommitted ``.next`` and temporary files."""
    listed = _journal(path)
    for name in _FILES:
        staged = path / (name + NEXT)
        if listed is None:
            staged.unlink(missing_ok=True)
        elif staged.exists():
            os.replace(staged, path / name)
        elif name not in listed:
            (path / name).unlink(missing_ok=True)
    for stale in path.glob(glob.escape(f".{JOURNAL}.tmp-") + "*"):
        stale.unlink()
    if listed is not None:
        fsync_dir(path)
        (path / JOURNAL).unlink()
    fsync_dir(path)


def _config_bytes(model: dict, meta: dict | None) -> bytes:
    return json.dumps({"model": model, "meta": meta or {}}, indent=2).encode("utf-8")


def _replace_files(path: Path, files: dict[str, bytes]) -> None:
    """Replace the files of the existing model directory `path` through the journal (module docstring)."""
    finish_journal(path)
    try:
        for name, data in files.items():
            fileops.write_synced(path / (name + NEXT), data)
        fsync_dir(path)
        fileops.replace_file(path / JOURNAL, json.dumps(sorted(files)).encode("utf-8"))
    except BaseException:
        try:
            committed = _journal(path) is not None
        except (OSError, ValueError):
            committed = True  # cannot tell: leave the files to the next save, which can
        if not committed:  # the old files stay in force: the new ones are only litter
            discard(path / (name + NEXT) for name in files)
        raise
    finish_journal(path)


def _create_dir(path: Path, files: dict[str, bytes]) -> None:
    """Build the new model directory `path` beside it and rename it into place (module docstring)."""
    for stale in path.parent.glob(glob.escape(f".tmp-{path.name}-") + "*"):  # of a killed earlier save
        shutil.rmtree(stale)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        for name, data in files.items():
            fileops.write_synced(tmp / name, data)
        fsync_dir(tmp)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def _save_files(path: Path, files: dict[str, bytes]) -> None:
    """Write the model directory `path` holding exactly `files`; `UserError` naming it when that fails."""
    try:
        if path.is_dir():
            _replace_files(path, files)
        else:
            _create_dir(path, files)
    except OSError as e:
        raise cannot(path, "write", e) from None


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
    A failure raises `UserError` ("PATH: cannot write: reason") and leaves the old directory in force.
    """
    files = {CONFIG: _config_bytes(cfg.to_dict(), meta), TOKENIZER: tokenizer_bytes, WEIGHTS: _state_bytes(model)}
    if train_state is not None:
        buffer = io.BytesIO()
        torch.save(train_state, buffer)
        files[TRAIN_STATE] = buffer.getvalue()
    _save_files(Path(path), files)


def copy_model_dir(src: Path, dst: Path, meta: dict | None = None) -> None:
    """Write (or replace) the model directory `dst` with the model of `src` (config, tokenizer and the
    weights byte for byte; no train state) and `meta`."""
    src = Path(src)
    model, _ = read_config(src)  # any model's config (a vision model's too), as it is
    files = {CONFIG: _config_bytes(model, meta)}
    for name in (TOKENIZER, WEIGHTS):
        file = need_file(src, name)
        try:
            files[name] = file.read_bytes()
        except OSError as e:
            raise cannot(file, "read", e) from None
    _save_files(Path(dst), files)


def read_meta(path: Path) -> dict[str, Any] | None:
    """The meta dict of the model directory `path`, or None when `path` holds no model."""
    path = Path(path)
    if not path.is_dir() or resolve_file(path, CONFIG) is None:
        return None
    return read_config(path)[1]


def need_file(path: Path, name: str) -> Path:
    """The file holding `name` in model directory `path`; `UserError` if there is none."""
    file = resolve_file(path, name)
    if file is None:
        raise UserError(f"{path}: model directory has no {name}")
    return file


def read_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The "model" and "meta" objects of the config.json of model directory `path`, not parsed further."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: {'not a directory' if path.exists() else 'no such directory'}")
    file = resolve_file(path, CONFIG)
    if file is None:
        raise UserError(f"{path} is not a model directory (no {CONFIG})")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{path / CONFIG}: invalid JSON ({e})") from None
    if isinstance(data, dict) and "model_type" in data and "model" not in data:
        raise UserError(f"{path}: a Hugging Face folder, not a model directory; convert it with "
                        f"`transformer import {path} --out DIR`")
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise UserError(f'{path / CONFIG}: no "model" section')
    if not isinstance(data.get("meta", {}), dict):
        raise UserError(f'{path / CONFIG}: "meta" is not an object')
    return data["model"], data.get("meta", {})


def read_model_config(path: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The model config and meta dict stored in model directory `path`."""
    model, meta = read_config(path)
    try:
        return ModelConfig.from_dict(model), meta
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
    cfg, meta = read_model_config(path)
    try:
        tokenizer = Tokenizer.from_bytes(need_file(path, TOKENIZER).read_bytes())
    except ValueError as e:
        raise UserError(f"{path / TOKENIZER}: bad tokenizer model: {e}") from None
    model = build_model(cfg)
    _load_state(model, need_file(path, WEIGHTS))
    return model.to(device).eval(), cfg, tokenizer, meta


def load_train_state(path: Path) -> dict | None:
    """The training state saved in model directory `path`, on CPU, or None if it has none."""
    file = resolve_file(Path(path), TRAIN_STATE)
    if file is None:
        return None
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file fails anywhere in the unpickler, with many exception types
        raise UserError(f"{Path(path) / TRAIN_STATE}: cannot read training state ({e})") from None


def has_leftovers(path: Path) -> bool:
    """Whether model directory `path` holds a journal, ``.next`` files or temporaries of an interrupted save."""
    return (path / JOURNAL).exists() or any(
        name.endswith(NEXT) or is_tmp_file(name) for name in os.listdir(path))


def read_bytes(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as e:
        raise cannot(file, "read", e) from None
