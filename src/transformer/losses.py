"""Label-smoothed cross-entropy (paper section 5.4, epsilon_ls = 0.1).

The smoothed target puts 1 - eps on the gold token and spreads eps uniformly over
the other V - 2 tokens, leaving padding out: pad is never a target, so it gets no
probability mass. Positions whose target is pad are ignored altogether.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def label_smoothed_cross_entropy(
    logits: Tensor, target: Tensor, epsilon: float = 0.1, pad_id: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Summed smoothed loss, summed NLL and the number of non-pad targets.

    logits (..., V) of any float dtype (the math is fp32), target (...) int ids.
    Returns (loss_sum, nll_sum) as fp32 scalars and n_tokens as an int64 scalar;
    divide by n_tokens for per-token means. With epsilon = 0, loss_sum equals
    ``F.cross_entropy(..., ignore_index=pad_id, reduction="sum")``. Needs V > 2.
    """
    vocab = logits.size(-1)
    lp = F.log_softmax(logits.float(), dim=-1)  # (..., V), the only vocabulary-sized tensor
    gold = lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (...)
    others = lp.sum(-1) - lp[..., pad_id] - gold  # sum of log-probs over non-gold, non-pad tokens
    loss = -(1.0 - epsilon) * gold - epsilon / (vocab - 2) * others
    keep = target != pad_id
    zero = torch.zeros((), device=lp.device)
    return torch.where(keep, loss, zero).sum(), torch.where(keep, -gold, zero).sum(), keep.sum()
