"""The one optimiser and schedule stack (training.optim): the paper's equation (3), cosine, AdamW groups."""

import math

import pytest
import torch
from torch import nn

from transformer.errors import UserError
from transformer.training.optim import OptimConfig, lr_factor, make_optimizer

D, WARMUP = 512, 4000
PEAK = 1 / math.sqrt(D * WARMUP)  # 6.99e-4, the value at step == warmup


def paper_lr(step: int, d_model: int, warmup: int) -> float:
    """Equation (3) of the paper, written out: d_model^-0.5 · min(step^-0.5, step · warmup^-1.5)."""
    return d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


def test_the_default_schedule_is_the_papers_equation_3() -> None:
    cfg = OptimConfig().resolve(D, max_steps=None)
    assert cfg.lr == pytest.approx(PEAK) and PEAK == pytest.approx(6.988e-4, rel=1e-3)
    for step in (1, 7, WARMUP // 2, WARMUP - 1, WARMUP, WARMUP + 1, 4 * WARMUP, 100_000):
        assert cfg.lr * lr_factor(step, cfg) == pytest.approx(paper_lr(step, D, WARMUP), rel=1e-12), step
    scaled = OptimConfig(lr_scale=2.0).resolve(D, None)
    assert scaled.lr == pytest.approx(2 * PEAK) and scaled.lr_scale == 1.0  # resolved: the scale is in lr


def test_cosine_and_constant_schedules() -> None:
    cfg = OptimConfig(lr=1e-3, schedule="cosine", warmup=10).resolve(256, max_steps=110)
    assert (cfg.decay_steps, cfg.min_lr) == (110, pytest.approx(1e-4))
    assert lr_factor(5, cfg) == pytest.approx(0.5)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.55)  # half way down the cosine to lr / 10
    assert lr_factor(110, cfg) == pytest.approx(0.1) and lr_factor(500, cfg) == pytest.approx(0.1)
    assert lr_factor(40, OptimConfig(lr=1e-3, warmup=10).resolve(256, None)) == pytest.approx(0.5)  # sqrt(10/40)
    assert lr_factor(40, OptimConfig(lr=1e-3, warmup=10, schedule="constant").resolve(256, None)) == 1.0
    # decay_steps and min_lr mean nothing outside cosine and linear: resolving leaves them unset, so --max-steps can change
    assert OptimConfig().resolve(D, 1000) == OptimConfig().resolve(D, 2000)
    with pytest.raises(UserError, match="`schedule` exponential"):
        OptimConfig(schedule="exponential")


def test_adam_settings_and_weight_decay_groups() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    opt, _ = make_optimizer(model, OptimConfig().resolve(D, None))
    (group,) = opt.param_groups  # no weight decay: one group, plain Adam
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.9, 0.98), 1e-9, 0.0)
    assert group["fused"] and not group["foreach"]  # CPU parameters: the fused kernels
    assert len(group["params"]) == 2  # frozen parameters left out
    opt, _ = make_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.1).resolve(D, None))
    decayed, plain = opt.param_groups
    assert [p.dim() for p in decayed["params"]] == [2] and decayed["weight_decay"] == 0.1
    assert [p.dim() for p in plain["params"]] == [1] and plain["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="resolved"):
        make_optimizer(model, OptimConfig())


def test_optimizer_updates_use_the_schedule() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt, sched = make_optimizer(model, OptimConfig(warmup=10).resolve(D, None))
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
            torch.testing.assert_close(before - model.weight.detach(), paper_lr(1, D, 10) * grad.sign())
    assert used == pytest.approx([paper_lr(s, D, 10) for s in range(1, 6)])


def test_the_fused_cpu_adam_takes_the_foreach_steps() -> None:
    """The fused kernels (the default on CPU) update as the foreach ones did, weight decay included."""
    torch.manual_seed(1)
    models = [nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    cfg = OptimConfig(lr=1e-2, warmup=3, weight_decay=0.1).resolve(D, None)
    fused, _ = make_optimizer(models[0], cfg)
    params = list(models[1].parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    foreach = torch.optim.AdamW(groups, lr=1e-2 * lr_factor(1, cfg), betas=(0.9, 0.98), eps=1e-9, foreach=True)
    assert fused.param_groups[0]["fused"]
    x = torch.randn(16, 6)
    for _ in range(5):
        for model, opt in zip(models, (fused, foreach)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
