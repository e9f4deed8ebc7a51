"""One optimiser and learning-rate schedule for every task.

The optimiser is Adam (Kingma and Ba, 2015) with decoupled weight decay (AdamW,
Loshchilov and Hutter, 2019) on the matrices only; with `weight_decay` 0 it is plain
Adam, the paper's optimiser (section 5.3: beta1 0.9, beta2 0.98, eps 1e-9).

The learning rate of optimiser update s (1-based) is `lr · factor(s)`: a linear warm-up
over `warmup` updates to the peak `lr`, then

- ``inverse-sqrt``: lr · sqrt(warmup / s). With lr = (d_model · warmup)^-0.5, the default
  when `lr` is not given, this is the paper's equation (3) exactly:
  d_model^-0.5 · min(s^-0.5, s · warmup^-1.5);
- ``cosine``: half a cosine from lr down to `min_lr` at `decay_steps`, constant after;
- ``linear``: a straight line from lr down to `min_lr` (default 0) at `decay_steps`, constant after: BERT's
  fine-tuning schedule (Devlin et al., 2019);
- ``constant``: lr.

`OptimConfig.resolve` fills in what depends on the model and the run (the paper's peak,
`lr_scale`, the cosine's end and floor), so that a run records exactly what it used.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from transformer.errors import UserError

SCHEDULES = ("inverse-sqrt", "cosine", "linear", "constant")
DECAYING = ("cosine", "linear")  # down to min_lr at decay_steps


@dataclass(frozen=True)
class OptimConfig:
    """Adam(W) and its schedule; the defaults are the paper's (section 5.3)."""

    lr: float | None = None  # peak learning rate; None: the paper's (d_model · warmup)^-0.5
    lr_scale: float = 1.0  # multiplies the peak
    schedule: str = "inverse-sqrt"  # after warm-up: inverse-sqrt | cosine | linear | constant
    warmup: int = 4000  # linear warm-up updates
    decay_steps: int | None = None  # cosine, linear: the update where min_lr is reached (default: max_steps, else 5000)
    min_lr: float | None = None  # cosine, linear: the floor (default: cosine lr / 10, linear 0)
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-9
    weight_decay: float = 0.0  # decoupled, on matrices only
    clip_norm: float | None = None  # clip the gradient norm of each update to this

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise UserError(f"`schedule` {self.schedule}: choose {', '.join(SCHEDULES)}")
        if self.warmup < 0:
            raise UserError(f"`warmup` {self.warmup}: must be >= 0")
        if self.lr is not None and self.lr <= 0:
            raise UserError(f"`lr` {self.lr}: must be > 0")

    def resolve(self, d_model: int, max_steps: int | None) -> "OptimConfig":
        """This configuration with every default decided: the peak lr (lr_scale applied), decay_steps, min_lr."""
        lr = (self.lr if self.lr is not None else (d_model * max(self.warmup, 1)) ** -0.5) * self.lr_scale
        if self.schedule not in DECAYING:
            return dataclasses.replace(self, lr=lr, lr_scale=1.0)
        decay_steps = self.decay_steps or max_steps or 5000
        min_lr = self.min_lr if self.min_lr is not None else (lr / 10 if self.schedule == "cosine" else 0.0)
        return dataclasses.replace(self, lr=lr, lr_scale=1.0, decay_steps=decay_steps, min_lr=min_lr)


def lr_factor(step: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak lr for optimiser update `step` (1-based); `cfg` resolved."""
    warmup = cfg.warmup
    if warmup and step <= warmup:
        return step / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "inverse-sqrt":
        return math.sqrt(max(warmup, 1) / step)
    floor = cfg.min_lr / cfg.lr
    progress = min(max(step - warmup, 0) / max(cfg.decay_steps - warmup, 1), 1.0)
    if cfg.schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(
    model: nn.Module, cfg: OptimConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters and its schedule; `cfg` resolved (see `OptimConfig.resolve`).

    Fused kernels (one pass over each parameter's state) when every parameter lives on a CPU
    or a CUDA GPU, else the foreach ones. Call
    ``scheduler.step()`` after each ``optimizer.step()``: LambdaLR counts from 0 and
    applies lambda(0) at construction, hence the shift by one.
    """
    if cfg.lr is None or cfg.lr_scale != 1.0 or (cfg.schedule in DECAYING and (cfg.decay_steps is None or cfg.min_lr is None)):
        raise ValueError("make_optimizer needs a resolved OptimConfig (OptimConfig.resolve)")
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.weight_decay:
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
    else:
        groups = [{"params": params, "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        fused=fused or None, foreach=None if fused else True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i + 1, cfg))
    return optimizer, scheduler
