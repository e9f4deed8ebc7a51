"""Label-smoothed cross-entropy (paper section 5.4, epsilon_ls = 0.1).

The smoothed target puts 1 - eps on the gold token and spreads eps uniformly over
the other V - 2 tokens, leaving padding out: pad is never a target, so it gets no
probability mass. Positions whose target is pad are ignored altogether.

The gradient is written out (softmax minus the smoothed target) in a custom autograd
function, so that training keeps one vocabulary-sized tensor (the log-probabilities)
instead of the several that autograd would build for log_softmax, gather and index.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _SmoothedCrossEntropy(torch.autograd.Function):
    """(N, V) logits and (N,) targets -> summed smoothed loss and summed NLL over non-pad rows."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, epsilon: float, pad_id: int) -> tuple[Tensor, Tensor]:
        vocab = logits.size(-1)
        lp = torch.log_softmax(logits.float(), dim=-1)  # (N, V), the only vocabulary-sized tensor kept
        gold = lp.gather(-1, target[:, None]).squeeze(-1)  # (N,)
        others = lp.sum(-1) - lp[:, pad_id] - gold  # sum of log-probs over non-gold, non-pad tokens
        keep = target != pad_id
        loss = torch.where(keep, -(1.0 - epsilon) * gold - epsilon / (vocab - 2) * others, 0.0).sum()
        nll = torch.where(keep, -gold, 0.0).sum()
        ctx.save_for_backward(lp, target, keep)
        ctx.epsilon, ctx.pad_id, ctx.dtype = epsilon, pad_id, logits.dtype
        return loss, nll

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_nll: Tensor):
        # d loss / d z = p - q (q the smoothed target); d nll / d z = p - onehot(gold).
        lp, target, keep = ctx.saved_tensors
        eps, pad_id = ctx.epsilon, ctx.pad_id
        uniform = eps / (lp.size(-1) - 2)
        rows = torch.arange(lp.size(0), device=lp.device)
        grad = lp.exp_()  # p, in place: lp is not needed again (no double backward)
        grad.mul_(grad_loss + grad_nll).sub_(grad_loss * uniform)  # p·(g_l + g_n) - g_l·uniform
        grad[:, pad_id] += grad_loss * uniform  # pad has no target mass
        grad[rows, target] -= grad_loss * (1.0 - eps - uniform) + grad_nll
        grad.mul_(keep[:, None])  # padded positions get no gradient
        return grad.to(ctx.dtype), None, None, None


def label_smoothed_cross_entropy(
    logits: Tensor, target: Tensor, epsilon: float = 0.1, pad_id: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Summed smoothed loss, summed NLL and the number of non-pad targets.

    logits (..., V) of any float dtype (the math is fp32), target (...) int ids.
    Returns (loss_sum, nll_sum) as fp32 scalars and n_tokens as an int64 scalar;
    divide by n_tokens for per-token means. With epsilon = 0, loss_sum equals
    ``F.cross_entropy(..., ignore_index=pad_id, reduction="sum")``. Needs V > 2.
    """
    loss, nll = _SmoothedCrossEntropy.apply(logits.reshape(-1, logits.size(-1)), target.reshape(-1), epsilon, pad_id)
    return loss, nll, (target != pad_id).sum()
