"""The paper's optimiser (section 5.3): Adam with beta1 = 0.9, beta2 = 0.98, eps = 1e-9,
and the learning rate of equation (3), linear warm-up then inverse square root decay.
"""

from __future__ import annotations

import torch
from torch import nn


def inverse_sqrt_lr(step: int, d_model: int, warmup: int = 4000, scale: float = 1.0) -> float:
    """Equation (3): scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), for step >= 1.

    It rises linearly for `warmup` steps, peaks at step == warmup with
    scale * (d_model * warmup)^-0.5, then decays as step^-0.5.
    """
    return scale * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


def make_optimizer(
    model: nn.Module,
    lr: float = 1.0,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-9,
    weight_decay: float = 0.0,
) -> torch.optim.Adam:
    """Adam over the trainable parameters: fused kernels when they all live on CUDA, else foreach.

    Keep lr = 1.0 with `make_scheduler`: the schedule multiplies it.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.device.type == "cuda" for p in params)
    return torch.optim.Adam(
        params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
        fused=fused or None, foreach=None if fused else True,
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, d_model: int, warmup: int, scale: float = 1.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Schedule so that optimizer update number s (1-based) uses base_lr * inverse_sqrt_lr(s, ...).

    Call ``scheduler.step()`` after each ``optimizer.step()``. LambdaLR counts from 0
    and applies lambda(0) at construction, hence the shift by one.
    """
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: inverse_sqrt_lr(i + 1, d_model, warmup, scale)
    )
