"""Dropout with 16-bit masks (model.dropout): its drop rate, its expectation, its gradient, its seeds."""

import math

import pytest
import torch

from transformer.model.dropout import Dropout, dropout, effective_p, keep_mask

N = 1_000_000


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_the_drop_rate_is_p_in_every_lane(p) -> None:
    torch.manual_seed(0)
    keep = keep_mask(torch.Size([N]), p, torch.device("cpu"))
    sigma = math.sqrt(p * (1 - p) / N)
    assert abs((~keep).float().mean().item() - p) < 5 * sigma
    for lane in range(4):  # each of the four 16-bit lanes of a 64-bit draw
        assert abs((~keep[lane::4]).float().mean().item() - p) < 5 * 2 * sigma, lane
    assert abs(effective_p(p) - p) <= 2**-17


def test_the_expectation_is_the_input_exactly() -> None:
    torch.manual_seed(1)
    x = torch.randn(64, 33)  # an odd number of elements: the last word is used in part
    y = dropout(x, 0.1, training=True)
    kept = y != 0
    scale = 1 / (1 - effective_p(0.1))
    assert torch.equal(y[kept], x[kept] * scale)  # E[y] = (1 - p_eff) · x · scale = x
    mean = torch.stack([dropout(x, 0.1, training=True) for _ in range(2000)]).mean(0)
    torch.testing.assert_close(mean, x, atol=0.1, rtol=0.0)  # 2000 draws: sigma 0.33/sqrt(2000)·|x| < 0.03


def test_the_gradient_is_the_same_mask() -> None:
    torch.manual_seed(2)
    x = torch.randn(8, 5, 16, requires_grad=True)
    g = torch.randn(8, 5, 16)
    y = dropout(x, 0.25, training=True)
    y.backward(g)
    scale = 1 / (1 - effective_p(0.25))
    assert torch.equal(x.grad, torch.where(y != 0, g * scale, 0.0))
    assert 0 < (y == 0).sum() < y.numel()


def test_bf16_stays_bf16() -> None:
    x = torch.randn(4, 7, dtype=torch.bfloat16, requires_grad=True)
    y = dropout(x, 0.1, training=True)
    y.sum().backward()
    assert y.dtype == x.grad.dtype == torch.bfloat16


def test_a_seed_gives_the_same_masks_and_the_generator_moves_on() -> None:
    x = torch.ones(1000)
    torch.manual_seed(3)
    first, second = dropout(x, 0.1, True), dropout(x, 0.1, True)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.1, True), first) and torch.equal(dropout(x, 0.1, True), second)
    assert not torch.equal(first, second)
    state = torch.get_rng_state()  # a checkpoint's RNG state brings the next mask back
    third = dropout(x, 0.1, True)
    torch.set_rng_state(state)
    assert torch.equal(dropout(x, 0.1, True), third)


def test_identity_in_eval_or_at_p_0_and_p_must_be_below_1() -> None:
    x = torch.randn(3, 4)
    module = Dropout(0.1).eval()
    assert module(x) is x and dropout(x, 0.0, training=True) is x
    assert effective_p(0.999999) < 1.0
    with pytest.raises(ValueError, match="must be >= 0 and < 1"):
        dropout(x, 1.0, training=True)
