import math

import pytest
import torch
from torch import nn

from transformer.optim import inverse_sqrt_lr, make_optimizer, make_scheduler

D, WARMUP = 512, 4000
PEAK = 1 / math.sqrt(D * WARMUP)  # 6.99e-4, the value at step == warmup


def test_schedule_values() -> None:
    assert PEAK == pytest.approx(6.988e-4, rel=1e-3)
    assert inverse_sqrt_lr(1, D, WARMUP) == pytest.approx(1 / (math.sqrt(D) * WARMUP**1.5))
    assert inverse_sqrt_lr(WARMUP // 2, D, WARMUP) == pytest.approx(PEAK / 2)  # linear warm-up
    assert inverse_sqrt_lr(WARMUP, D, WARMUP) == pytest.approx(PEAK)
    assert inverse_sqrt_lr(4 * WARMUP, D, WARMUP) == pytest.approx(PEAK / 2)  # 1/sqrt(step) decay
    assert inverse_sqrt_lr(WARMUP, D, WARMUP, scale=2.0) == pytest.approx(2 * PEAK)


def test_peak_is_at_warmup() -> None:
    lrs = [inverse_sqrt_lr(s, 256, 100) for s in range(1, 1000)]
    assert lrs.index(max(lrs)) + 1 == 100


def test_adam_settings() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    opt = make_optimizer(model)
    group = opt.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.9, 0.98), 1e-9, 0.0)
    assert group["foreach"] and not group["fused"]  # CPU parameters
    assert len(group["params"]) == 2  # frozen parameters left out


def test_optimizer_updates_use_the_schedule() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = make_optimizer(model)
    sched = make_scheduler(opt, d_model=D, warmup=10)
    used: list[float] = []
    opt.register_step_pre_hook(lambda o, args, kwargs: used.append(o.param_groups[0]["lr"]))
    for step in range(1, 6):
        before = model.weight.detach().clone()
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).sum().backward()
        grad = model.weight.grad.clone()
        opt.step()
        sched.step()
        if step == 1:  # Adam's first update is lr * sign(grad)
            torch.testing.assert_close(before - model.weight.detach(), inverse_sqrt_lr(1, D, 10) * grad.sign())
    assert used == pytest.approx([inverse_sqrt_lr(s, D, 10) for s in range(1, 6)])
