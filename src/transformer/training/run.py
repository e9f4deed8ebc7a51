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
from transformer.model.models import Decoder, Embedding, Encoder, build_model
from transformer.model.vision import VisionEncoder
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
    resuming (state and meta from it); else with `cfg.init` that model directory's model and tokenizer (a
    fine-tuning run: fresh optimiser); else a new model of `shape(vocab size of make_tokenizer())`, seeded.
    `cfg.freeze` is applied to the model (`freeze`)."""
    resumed = open_run(cfg, say)
    if resumed is None:
        torch.manual_seed(cfg.seed)
        if cfg.init is not None:
            model, model_cfg, tokenizer, _ = modeldir.load_model_dir(cfg.init, device)
            say(f"starting from the weights of {cfg.init}")
            resumed = model.train(), model_cfg, tokenizer, None, None
        else:
            tokenizer = make_tokenizer()
            model_cfg = shape(tokenizer.vocab_size)
            resumed = build_model(model_cfg).to(device), model_cfg, tokenizer, None, None
    if resumed[1].arch != arch:
        where = cfg.init if cfg.init is not None and resumed[3] is None else cfg.out
        raise UserError(f"{where}: this task trains an {arch} model, not arch {resumed[1].arch!r}")
    freeze(resumed[0], cfg.freeze)
    return resumed


def freeze(model: torch.nn.Module, spec: str | None) -> None:
    """Stop training part of `model`: "embeddings" (token, position and segment embeddings, and with tied
    embeddings the output projection, the same matrix), or "N": the embeddings and the lowest N layers of
    each stack (encoder, decoder). None: nothing. `UserError` for another value."""
    if spec is None:
        return
    if spec != "embeddings" and not (spec.isdigit() and int(spec) >= 0):
        raise UserError(f"`freeze` {spec!r}: give embeddings, or a number of lower layers")
    n = 0 if spec == "embeddings" else int(spec)
    stacks = [m for m in model.modules() if isinstance(m, (Encoder, Decoder))]
    if any(n > len(stack.layers) for stack in stacks):
        raise UserError(f"`freeze` {n}: more layers than a stack of the model has "
                        f"({min(len(stack.layers) for stack in stacks)})")
    for module in model.modules():
        if isinstance(module, Embedding):
            module.requires_grad_(False)
        elif isinstance(module, VisionEncoder):  # a ViT's embeddings: patches, [CLS], positions
            for part in (module.patch_embed, module.cls, module.positions):
                if part is not None:
                    part.requires_grad_(False)
    for stack in stacks:
        for layer in stack.layers[:n]:
            layer.requires_grad_(False)


def settle(cfg: LoopConfig, model_cfg: ModelConfig, wanted: ModelConfig, recorded: dict | None, meta: dict,
           say: Callable[[str], None]) -> LoopConfig:
    """`cfg` with its optimiser resolved for the model; when resuming (`recorded` is the run's meta), a
    `UserError` if this command's settings (`wanted` model, `cfg`, task `meta`) would change the run."""
    cfg = dataclasses.replace(cfg, optim=cfg.optim.resolve(model_cfg.d_model, cfg.max_steps))
    if cfg.init is not None:  # the model is the one it started from, whatever the model flags say
        wanted = model_cfg
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
