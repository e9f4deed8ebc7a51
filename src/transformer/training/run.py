"""Starting a training run, or resuming one: the model, its vocabulary and state, and the checks.

A task calls `begin` (the newest checkpoint of the run directory when resuming, else a new
model on a new vocabulary), then `settle` (the optimiser resolved for the model; on resume,
a refusal of any setting that would make it another run), then `training.loop.fit`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch

from transformer.config import ModelConfig
from transformer.errors import UserError
from transformer.model.models import build_model
from transformer.text.tokenizer import Tokenizer
from transformer.training import checkpoint as ckpt
from transformer.store import modeldir
from transformer.training.loop import LoopConfig
from transformer.device import resolve_device


def open_run(cfg: LoopConfig, say: Callable[[str], None]):
    """(model, model config, tokenizer, train state, meta) of the newest checkpoint when resuming, else None.

    Refuses to start a new run over an existing one.
    """
    checkpoints = ckpt.list_checkpoints(cfg.out)
    if checkpoints and not cfg.resume:
        raise UserError(f"{cfg.out} already holds a training run; pass `resume` to continue it, or choose another `out`")
    if cfg.resume and checkpoints:
        latest = checkpoints[-1]
        model, model_cfg, tokenizer, meta = modeldir.load_model_dir(latest, resolve_device(cfg.device))
        state = modeldir.load_train_state(latest)
        if state is None:
            raise UserError(f"{latest}: checkpoint has no training state to resume from")
        say(f"resuming from {latest} (step {state['step']})")
        return model, model_cfg, tokenizer, state, meta
    if cfg.resume:
        say(f"{cfg.out}: no checkpoint to resume from; starting a new run")
    return None


def begin(cfg: LoopConfig, arch: str, shape: Callable[[int], ModelConfig], make_tokenizer: Callable[[], Tokenizer],
          device: torch.device, say: Callable[[str], None]):
    """(model, model config, tokenizer, train state, recorded meta) to train: the newest checkpoint's when
    resuming (state and meta from it), else a new model of `shape(vocab size of make_tokenizer())`, seeded."""
    resumed = open_run(cfg, say)
    if resumed is None:
        tokenizer = make_tokenizer()
        model_cfg = shape(tokenizer.vocab_size)
        torch.manual_seed(cfg.seed)
        resumed = build_model(model_cfg).to(device), model_cfg, tokenizer, None, None
    if resumed[1].arch != arch:
        raise UserError(f"{cfg.out}: this task trains an {arch} model, not arch {resumed[1].arch!r}")
    return resumed


def settle(cfg: LoopConfig, model_cfg: ModelConfig, wanted: ModelConfig, recorded: dict | None, meta: dict,
           say: Callable[[str], None]) -> LoopConfig:
    """`cfg` with its optimiser resolved for the model; when resuming (`recorded` is the run's meta), a
    `UserError` if this command's settings (`wanted` model, `cfg`, task `meta`) would change the run."""
    cfg = dataclasses.replace(cfg, optim=cfg.optim.resolve(model_cfg.d_model, cfg.max_steps))
    if recorded is not None:
        check_resume(cfg.out, {"model": model_cfg.to_dict(), **recorded},
                     {"model": wanted.to_dict(), "loop": cfg.to_dict(), **meta}, say)
    return cfg


# What may change when a run is resumed: how long it goes on, how often it reports, where it
# runs. Anything else (model shape, data, seed, vocabulary, optimiser, batching) would make
# the resumed run another run; --resume refuses it.
RESUMABLE = {"max_steps", "max_minutes", "max_epochs", "resume", "progress", "device", "precision",
             "log_every", "keep_last", "valid_every", "valid_bleu_lines", "eval_batches"}


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def check_resume(out: Path, recorded: dict, now: dict, say: Callable[[str], None]) -> None:
    """Refuse (`UserError` naming the setting) to resume the run in `out` with settings that change it.

    `recorded` and `now`: the run's configuration as its checkpoint recorded it and as this
    command would start it, as nested dicts ({"model": ..., "loop": ..., task: ...}). Keys
    that only one side has (a run recorded by an older version) are not compared. Changes
    of the settings in `RESUMABLE` are allowed and said.
    """
    old, new = _flat(recorded), _flat(now)
    derived = ("lr", "min_lr", "decay_steps")  # follow from other settings: name those first
    for key in sorted(old.keys() & new.keys(), key=lambda k: (k.rsplit(".", 1)[-1] in derived, k)):
        if old[key] == new[key]:
            continue
        name = key.rsplit(".", 1)[-1]
        flag = f"`{name}`"  # the setting; the command line shows its flag
        if name in RESUMABLE:
            if name not in ("resume", "progress"):
                say(f"resuming with {flag} {new[key]} (the run had {old[key]})")
            continue
        raise UserError(f"`resume`: {flag} would be {new[key]!r} but the run in {out} has {old[key]!r}; "
                        "resume with the run's settings, or start a new run with another `out`")
