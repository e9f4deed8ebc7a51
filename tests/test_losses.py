import math

import torch
import torch.nn.functional as F

from transformer.training import losses
from transformer.training.losses import label_smoothed_cross_entropy

PAD = 0


def test_hand_computed_example() -> None:
    rows = [[1.0, 2.0, 0.5, -1.0, 0.0], [0.3, 0.1, 0.2, 3.0, -2.0]]
    logits = torch.tensor([rows])  # (1, 2, V=5)
    target = torch.tensor([[3, PAD]])  # second position is padding
    eps = 0.1
    log_z = math.log(sum(math.exp(x) for x in rows[0]))
    lp = [x - log_z for x in rows[0]]
    # gold 3 gets 1 - eps; tokens 1, 2, 4 get eps / (5 - 2) each; pad 0 gets nothing
    expected = -(1 - eps) * lp[3] - eps / 3 * (lp[1] + lp[2] + lp[4])

    loss, nll, n = label_smoothed_cross_entropy(logits, target, eps, PAD)
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    assert math.isclose(nll.item(), -lp[3], rel_tol=1e-6)
    assert n.item() == 1


def test_no_smoothing_is_cross_entropy() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    target = torch.randint(1, 11, (3, 7))
    target[0, 4:] = PAD
    target[2, 1:] = PAD
    expected = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=PAD, reduction="sum")
    loss, nll, n = label_smoothed_cross_entropy(logits, target, epsilon=0.0, pad_id=PAD)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(nll, expected)
    assert n.item() == 7 + 4 + 1
    _, nll_smoothed, _ = label_smoothed_cross_entropy(logits, target, epsilon=0.1, pad_id=PAD)
    torch.testing.assert_close(nll_smoothed, expected)


def test_gradient_is_softmax_minus_smoothed_target() -> None:
    torch.manual_seed(1)
    vocab, eps = 6, 0.2
    logits = torch.randn(4, vocab, requires_grad=True)
    target = torch.tensor([2, 5, PAD, 1])
    label_smoothed_cross_entropy(logits, target, eps, PAD)[0].backward()

    q = torch.full((4, vocab), eps / (vocab - 2))
    q[:, PAD] = 0.0
    q[torch.arange(4), target] = 1 - eps
    expected = torch.softmax(logits.detach(), -1) - q
    expected[2] = 0.0  # padded position: no gradient at all
    torch.testing.assert_close(logits.grad, expected)
    # the pad logit is only pushed down by its own probability: no target mass on pad
    torch.testing.assert_close(logits.grad[[0, 1, 3], PAD], torch.softmax(logits.detach(), -1)[[0, 1, 3], PAD])


def test_bf16_logits_use_fp32_math() -> None:
    torch.manual_seed(2)
    logits = torch.randn(5, 9, dtype=torch.bfloat16)
    target = torch.randint(1, 9, (5,))
    loss, nll, _ = label_smoothed_cross_entropy(logits, target)
    assert loss.dtype == nll.dtype == torch.float32
    torch.testing.assert_close(loss, label_smoothed_cross_entropy(logits.float(), target)[0])


def _autograd_reference(logits, target, eps, pad):
    """The same loss written with plain autograd ops, to check the hand-written backward."""
    lp = torch.log_softmax(logits.float(), -1)
    q = torch.full_like(lp, eps / (lp.size(-1) - 2))
    q[..., pad] = 0.0
    q.scatter_(-1, target[..., None], 1 - eps)
    keep = (target != pad).float()
    loss = (-(q * lp).sum(-1) * keep).sum()
    nll = (-lp.gather(-1, target[..., None]).squeeze(-1) * keep).sum()
    return loss, nll


def test_gradients_of_loss_and_nll_match_autograd() -> None:
    torch.manual_seed(3)
    logits = torch.randn(3, 5, 13)
    target = torch.randint(1, 13, (3, 5))
    target[1, 3:] = PAD
    for weights in ((1.0, 0.0), (0.0, 1.0), (0.7, -0.3)):
        ours = logits.clone().requires_grad_(True)
        ref = logits.clone().requires_grad_(True)
        loss, nll, _ = label_smoothed_cross_entropy(ours, target, 0.1, PAD)
        (weights[0] * loss + weights[1] * nll).backward()
        ref_loss, ref_nll = _autograd_reference(ref, target, 0.1, PAD)
        (weights[0] * ref_loss + weights[1] * ref_nll).backward()
        torch.testing.assert_close(loss, ref_loss)
        torch.testing.assert_close(ours.grad, ref.grad, atol=1e-6, rtol=1e-5)


def test_bf16_gradient_is_the_fp32_gradient_rounded_once() -> None:
    torch.manual_seed(4)
    logits = torch.randn(6, 4, 50).bfloat16()
    target = torch.randint(1, 50, (6, 4))
    target[2, 1:] = PAD
    ours = logits.clone().requires_grad_(True)
    ref = logits.float().requires_grad_(True)
    (0.9 * label_smoothed_cross_entropy(ours, target, 0.1, PAD)[0]).backward()
    (0.9 * label_smoothed_cross_entropy(ref, target, 0.1, PAD)[0]).backward()
    assert ours.grad.dtype == torch.bfloat16
    assert torch.equal(ours.grad, ref.grad.bfloat16())  # the gold column too: no second rounding


def test_chunks_of_rows_give_what_one_chunk_gives(monkeypatch) -> None:
    torch.manual_seed(5)
    logits = torch.randn(7, 5, 40) * 4
    target = torch.randint(1, 40, (7, 5))
    target[3, 2:] = PAD
    results = []
    for chunk in (10**6, 3 * 40):  # one chunk; chunks of 3 rows, the last of 2
        monkeypatch.setattr(losses, "CHUNK", chunk)
        x = logits.clone().requires_grad_(True)
        loss, nll, _ = label_smoothed_cross_entropy(x, target, 0.1, PAD)
        (0.6 * loss + 0.3 * nll).backward()
        results.append((loss, nll, x.grad))
    for one, many in zip(*results):
        torch.testing.assert_close(many, one, rtol=0, atol=0)
    ref = logits.clone().requires_grad_(True)
    ref_loss, ref_nll = _autograd_reference(ref, target, 0.1, PAD)
    (0.6 * ref_loss + 0.3 * ref_nll).backward()
    torch.testing.assert_close(results[1][2], ref.grad, atol=1e-6, rtol=1e-5)
