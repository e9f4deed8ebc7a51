"""A training run's checkpoints: where they go, pruning, tidying after a crash, averaging.

A training run is laid out as::

    RUN/                             a model directory holding the BEST checkpoint,
                                     so that ``translate --model RUN`` works
    RUN/log.jsonl                    the training log
    RUN/checkpoints/step_00001000/   the last K model directories, each with
                                     train_state.pt: resume reads the newest, and
                                     ``average RUN/checkpoints/step_*`` averages them

Each is a model directory (`store.modeldir`: written whole through its journal, never half).
`prune_checkpoints` renames a directory to ``.del-<name>`` before deleting it, so a
half-deleted checkpoint is never listed. `tidy_run`, called when a training run starts,
finishes or undoes whatever interrupted saves, atomic writes and deletions of a run left behind.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from transformer.errors import UserError
from transformer.files import cannot, is_tmp_file
from transformer.model.models import build_model
from transformer.store.modeldir import (
    TOKENIZER, TRAIN_STATE, WEIGHTS, finish_journal, has_leftovers, need_file, read_bytes, read_model_config,
    read_weights, resolve_file, save_model_dir,
)

_STEP_DIR = re.compile(r"step_(\d{8,})")


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
            if has_leftovers(path):
                finish_journal(path)
                for name in os.listdir(path):
                    if is_tmp_file(name) and (path / name).is_file():
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
    cfg, _ = read_model_config(first)
    tokenizer = read_bytes(need_file(first, TOKENIZER))
    template, aliases = read_weights(need_file(first, WEIGHTS))
    sums = {k: t.to(torch.float32, copy=True) for k, t in template.items()}
    for path in map(Path, paths[1:]):
        if read_model_config(path)[0] != cfg:
            raise UserError(f"{path}: model config differs from {first}'s; only checkpoints of one run can be averaged")
        if read_bytes(need_file(path, TOKENIZER)) != tokenizer:
            raise UserError(f"{path}: tokenizer differs from {first}'s; only checkpoints of one run can be averaged")
        tensors, _ = read_weights(need_file(path, WEIGHTS))
        if {k: t.shape for k, t in tensors.items()} != {k: t.shape for k, t in template.items()}:
            raise UserError(f"{path}: tensor names or shapes differ from {first}'s")
        for k, t in tensors.items():
            sums[k] += t
    mean = {k: (s / len(paths)).to(template[k].dtype) for k, s in sums.items()}
    return mean | {a: mean[s] for a, s in aliases.items()}


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
            raise UserError(f"{out_dir}: `out` is one of the checkpoints to average ({path}); writing it would "
                            "replace that checkpoint and drop its training state; choose another `out`")
    if out_dir.is_dir() and resolve_file(out_dir, TRAIN_STATE) is not None:
        raise UserError(f"{out_dir}: `out` is a training checkpoint (it has {TRAIN_STATE}); writing it would "
                        "replace that checkpoint and drop its training state; choose another `out`")
    mean = average_checkpoints(paths)
    first = Path(paths[0])
    cfg, meta = read_model_config(first)
    model = build_model(cfg)
    model.load_state_dict(mean)
    meta = meta | {"averaged_from": [str(p) for p in paths]}
    save_model_dir(out_dir, model, cfg, read_bytes(need_file(first, TOKENIZER)), meta=meta)
