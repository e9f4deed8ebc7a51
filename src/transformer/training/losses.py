"""Label-smoothed cross-entropy (paper section 5.4, epsilon_ls = 0.1).

The smoothed target puts 1 - eps on the gold token and spreads eps uniformly over
the other V - 2 tokens, leaving padding out: pad is never a target, so it gets no
probability mass. Positions whose target is pad are ignored altogether.

The gradient is written out (softmax minus the smoothed target) in a custom autograd
function, so that autograd builds none of the vocabulary-sized tensors of log_softmax,
gather and index. The function keeps the logits and one log-sum-exp per row, and goes
over the (N, V) logits in chunks of rows, forward and backward: on a CPU, a chunk's fp32
working tensors (log-probabilities, then probabilities) fit in the cache, so that the
step reads the logits and writes their gradient in memory, and allocates no (N, V) fp32
tensor. That pays for bf16 logits (BENCHMARKS.md, the AMX Xeon section), not for fp32
ones. On other devices the one chunk is every row.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

CHUNK = 2**20  # elements of a chunk of rows on a CPU: 4 MB in fp32


def _chunks(logits: Tensor) -> Iterator[slice]:
    """Row slices of the (N, V) logits: about CHUNK elements each on a CPU, all N rows elsewhere."""
    n, vocab = logits.shape
    step = max(1, CHUNK // vocab) if logits.device.type == "cpu" else max(n, 1)
    return (slice(i, min(i + step, n)) for i in range(0, n, step))


class _SmoothedCrossEntropy(torch.autograd.Function):
    """(N, V) logits and (N,) targets -> summed smoothed loss and summed NLL over non-pad rows."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, epsilon: float, pad_id: int) -> tuple[Tensor, Tensor]:
        n, vocab = logits.shape
        lse, total, gold, pad = (torch.empty(n, device=logits.device) for _ in range(4))  # (N,) fp32 each
        for rows in _chunks(logits):
            z = logits[rows].float()  # (R, V)
            lp = torch.log_softmax(z, dim=-1)  # (R, V)
            lse[rows] = z.amax(-1) - lp.amax(-1)  # log sum exp z, from where lp is largest: precise
            total[rows] = lp.sum(-1)
            gold[rows] = lp.gather(-1, target[rows, None]).squeeze(-1)
            pad[rows] = lp[:, pad_id]
        others = total - pad - gold  # sum of log-probs over non-gold, non-pad tokens
        keep = target != pad_id
        loss = torch.where(keep, -(1.0 - epsilon) * gold - epsilon / (vocab - 2) * others, 0.0).sum()
        nll = torch.where(keep, -gold, 0.0).sum()
        ctx.save_for_backward(logits, lse, target, keep, gold.exp_(), pad.exp_())  # p of gold and of pad
        ctx.epsilon, ctx.pad_id = epsilon, pad_id
        return loss, nll

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_nll: Tensor):
        # d loss / d z = p - q (q the smoothed target); d nll / d z = p - onehot(gold). So the gradient is
        # p·(g_l + g_n) - g_l·uniform, except in the pad column (no target mass) and the gold one.
        logits, lse, target, keep, p_gold, p_pad = ctx.saved_tensors
        eps, pad_id = ctx.epsilon, ctx.pad_id
        uniform = eps / (logits.size(-1) - 2)
        scale, offset = grad_loss + grad_nll, grad_loss * uniform
        grad = torch.empty_like(logits)
        buffer = None
        for rows in _chunks(logits):
            if buffer is None:  # (R, V) fp32, reused by every chunk
                buffer = torch.empty(rows.stop - rows.start, logits.size(-1), device=logits.device)
            p = torch.sub(logits[rows], lse[rows, None], out=buffer[: rows.stop - rows.start]).exp_()
            grad[rows] = p.mul_(scale).sub_(offset)
        every = torch.arange(logits.size(0), device=logits.device)
        grad[:, pad_id] = (p_pad * scale).to(grad.dtype)
        grad[every, target] = (p_gold * scale - grad_loss * (1.0 - eps) - grad_nll).to(grad.dtype)
        grad[~keep] = 0.0  # padded positions get no gradient
        return grad, None, None, None


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
