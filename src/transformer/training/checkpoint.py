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

Failures. A write that fails (a full disk, a read-only folder) removes the temporary
files and folders of that save and raises a `UserError` of one line naming the path and
the problem (``runs/x/checkpoints/step_00000004: cannot write: No space left on device``);
what was in force before stays in force. Only a save whose journal was already written
leaves its ``.next`` files: they are the new checkpoint, put in place by the next save or
by `tidy_run`. `tidy_run`, called when a training run starts, finishes or undoes
whatever interrupted saves, atomic writes and deletions of a run left behind.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from transformer.config import ModelConfig
from transformer.errors import UserError
from transformer.files import cannot, fsync_dir
from transformer.model.models import build_model

if TYPE_CHECKING:
    from transformer.text.tokenizer import Tokenizer

CONFIG, TOKENIZER, WEIGHTS, TRAIN_STATE = "config.json", "tokenizer.model", "model.safetensors", "train_state.pt"
_FILES = (CONFIG, TOKENIZER, WEIGHTS, TRAIN_STATE)
_JOURNAL = ".commit"
_NEXT = ".next"
_STEP_DIR = re.compile(r"step_(\d{8,})")


def _write_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it (not atomic on its own)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _discard(paths: Iterable[Path]) -> None:
    """Delete what a failed save left, as far as possible: the save's own error is the one to report."""
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _is_tmp_file(name: str) -> bool:
    """Whether `name` is the temporary of an atomic write (``.<file>.tmp-<pid>``)."""
    return name.startswith(".") and ".tmp-" in name[1:]


def _replace_file(path: Path, data: bytes) -> None:
    """`atomic_write_bytes` raising OSError, and leaving no temporary file when it fails."""
    for stale in path.parent.glob(glob.escape(f".{path.name}.tmp-") + "*"):  # of a killed earlier write
        stale.unlink(missing_ok=True)
    tmp = _tmp_name(path)
    try:
        _write_file(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        _discard([tmp])
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that it holds either the old or the new content, even after a crash.

    `UserError` ("PATH: cannot write: reason") when it fails; the old content then stays.
    """
    path = Path(path)
    try:
        _replace_file(path, data)
    except OSError as e:
        raise cannot(path, "write", e) from None


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 `text`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def append_text(path: Path, text: str) -> None:
    """Append `text` to the file `path` (a log); `UserError` naming it when that fails.

    Not atomic: a crash may leave the last line cut short, which readers of a log skip.
    """
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise cannot(path, "write", e) from None


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
        fsync_dir(path)
        (path / _JOURNAL).unlink()
    fsync_dir(path)


def _config_bytes(model: dict, meta: dict | None) -> bytes:
    return json.dumps({"model": model, "meta": meta or {}}, indent=2).encode("utf-8")


def _replace_files(path: Path, files: dict[str, bytes]) -> None:
    """Replace the files of the existing model directory `path` through the journal (module docstring)."""
    _finish_journal(path)
    try:
        for name, data in files.items():
            _write_file(path / (name + _NEXT), data)
        fsync_dir(path)
        _replace_file(path / _JOURNAL, json.dumps(sorted(files)).encode("utf-8"))
    except BaseException:
        try:
            committed = _journal(path) is not None
        except (OSError, ValueError):
            committed = True  # cannot tell: leave the files to the next save, which can
        if not committed:  # the old files stay in force: the new ones are only litter
            _discard(path / (name + _NEXT) for name in files)
        raise
    _finish_journal(path)


def _create_dir(path: Path, files: dict[str, bytes]) -> None:
    """Build the new model directory `path` beside it and rename it into place (module docstring)."""
    for stale in path.parent.glob(glob.escape(f".tmp-{path.name}-") + "*"):  # of a killed earlier save
        shutil.rmtree(stale)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        for name, data in files.items():
            _write_file(tmp / name, data)
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
        file = _need(src, name)
        try:
            files[name] = file.read_bytes()
        except OSError as e:
            raise cannot(file, "read", e) from None
    _save_files(Path(dst), files)


def read_meta(path: Path) -> dict[str, Any] | None:
    """The meta dict of the model directory `path`, or None when `path` holds no model."""
    path = Path(path)
    if not path.is_dir() or _resolve(path, CONFIG) is None:
        return None
    return read_config(path)[1]


def _need(path: Path, name: str) -> Path:
    """The file holding `name` in model directory `path`; `UserError` if there is none."""
    file = _resolve(path, name)
    if file is None:
        raise UserError(f"{path}: model directory has no {name}")
    return file


def read_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The "model" and "meta" objects of the config.json of model directory `path`, not parsed further."""
    path = Path(path)
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
    if not isinstance(data.get("meta", {}), dict):
        raise UserError(f'{path / CONFIG}: "meta" is not an object')
    return data["model"], data.get("meta", {})


def _read_config(path: Path) -> tuple[ModelConfig, dict[str, Any]]:
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
    """Delete all checkpoints of the run but the newest `keep` (and leftovers of interrupted deletes).

    `UserError` ("PATH: cannot delete: reason") when a deletion fails.
    """
    checkpoints = list_checkpoints(run_dir)
    doomed = Path(run_dir) / "checkpoints"
    try:
        for doomed in (Path(run_dir) / "checkpoints").glob(".del-*"):
            shutil.rmtree(doomed)
        for doomed in checkpoints[: max(len(checkpoints) - keep, 0)]:
            trash = doomed.with_name(".del-" + doomed.name)
            os.rename(doomed, trash)
            shutil.rmtree(trash)
    except OSError as e:
        raise cannot(doomed, "delete", e) from None


def _leftovers(path: Path) -> bool:
    """Whether model directory `path` holds a journal, ``.next`` files or temporaries of an interrupted save."""
    return (path / _JOURNAL).exists() or any(
        name.endswith(_NEXT) or _is_tmp_file(name) for name in os.listdir(path))


def tidy_run(run_dir: Path) -> None:
    """Finish or undo what interrupted saves left in the run directory `run_dir`.

    In RUN/ and each checkpoint: a written journal is carried out, uncommitted ``.next``
    files and temporaries of atomic writes (``.<file>.tmp-<pid>``) are deleted; under
    checkpoints/, half-built (``.tmp-*``) and half-deleted (``.del-*``) directories go.
    Does nothing (and writes nothing) when there is nothing to do. `UserError` naming
    the path when a deletion fails.
    """
    run = Path(run_dir)
    if not run.is_dir():
        return
    path = run
    try:
        for path in (run, *list_checkpoints(run)):
            if _leftovers(path):
                _finish_journal(path)
                for name in os.listdir(path):
                    if _is_tmp_file(name) and (path / name).is_file():
                        (path / name).unlink()
        root = run / "checkpoints"
        if root.is_dir():
            for path in sorted(root.iterdir()):
                if path.name.startswith((".tmp-", ".del-")) and path.is_dir():
                    shutil.rmtree(path)
    except OSError as e:
        raise cannot(path, "clean up", e) from None


def average_checkpoints(paths: Sequence[Path]) -> dict[str, Tensor]:
    """Parameter-wise mean of the weights saved in model directories `paths`: a full state_dict.

    Sums in fp32 and casts back to each tensor's saved dtype. Tied names map to one tensor.
    `UserError` naming two of the paths if their configs, tokenizers, tensor names or shapes differ.
    """
    if not paths:
        raise UserError("no checkpoints to average")
    first = Path(paths[0])
    cfg, _ = _read_config(first)
    tokenizer = _read_bytes(_need(first, TOKENIZER))
    template, aliases = _read_state(_need(first, WEIGHTS))
    sums = {k: t.to(torch.float32, copy=True) for k, t in template.items()}
    for path in map(Path, paths[1:]):
        if _read_config(path)[0] != cfg:
            raise UserError(f"{path}: model config differs from {first}'s; only checkpoints of one run can be averaged")
        if _read_bytes(_need(path, TOKENIZER)) != tokenizer:
            raise UserError(f"{path}: tokenizer differs from {first}'s; only checkpoints of one run can be averaged")
        tensors, _ = _read_state(_need(path, WEIGHTS))
        if {k: t.shape for k, t in tensors.items()} != {k: t.shape for k, t in template.items()}:
            raise UserError(f"{path}: tensor names or shapes differ from {first}'s")
        for k, t in tensors.items():
            sums[k] += t
    mean = {k: (s / len(paths)).to(template[k].dtype) for k, s in sums.items()}
    return mean | {a: mean[s] for a, s in aliases.items()}


def _read_bytes(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as e:
        raise cannot(file, "read", e) from None


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return a.resolve() == b.resolve()


def write_average(paths: Sequence[Path], out_dir: Path) -> None:
    """Write a model directory (no train_state) with the average of `paths`' weights.

    Config and tokenizer come from the first; its meta gains ``averaged_from``. Refuses
    (`UserError`) an `out_dir` that is one of `paths` or any other training checkpoint
    (one with a train state): writing it would replace that model and drop its training state.
    """
    out_dir = Path(out_dir)
    for path in map(Path, paths):
        if _same_dir(path, out_dir):
            raise UserError(f"{out_dir}: --out is one of the checkpoints to average ({path}); writing it would "
                            "replace that checkpoint and drop its training state; choose another --out")
    if out_dir.is_dir() and _resolve(out_dir, TRAIN_STATE) is not None:
        raise UserError(f"{out_dir}: --out is a training checkpoint (it has {TRAIN_STATE}); writing it would "
                        "replace that checkpoint and drop its training state; choose another --out")
    mean = average_checkpoints(paths)
    first = Path(paths[0])
    cfg, meta = _read_config(first)
    model = build_model(cfg)
    model.load_state_dict(mean)
    meta = meta | {"averaged_from": [str(p) for p in paths]}
    save_model_dir(out_dir, model, cfg, _read_bytes(_need(first, TOKENIZER)), meta=meta)
