"""Blocked windowed self-attention (model/window.py) against masked full attention, and its cost."""

import pytest
import torch
import torch.nn.functional as F

from transformer.model import attention, window
from transformer.model.attention import MultiHeadAttention, scaled_dot_product_attention, self_attention_mask
from transformer.model.cache import LayerCache
from transformer.model.window import default_block, use_windowed, windowed_attention

B, H, D = 3, 2, 8


def _inputs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g, requires_grad=True) for _ in range(3))
    # right-padded rows of different lengths; the last is empty when n < 3 (all keys masked)
    lengths = torch.tensor([n, max(n - 2, 1), n // 3])
    pad = (torch.arange(n)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, n)
    grad = torch.randn(B, H, n, D, generator=g)
    return q, k, v, pad, grad


def _grads(out, grad, *xs):
    return torch.autograd.grad(out, xs, grad)


def _dense(q, k, v, r, causal, pad):
    n = q.size(2)
    mask = self_attention_mask(n, n, causal=causal, window=r)  # None: n = 1, causal
    if pad is not None:
        mask = pad if mask is None else mask & pad
    return scaled_dot_product_attention(q, k, v, mask)[0]


@pytest.mark.parametrize("r", [1, 3, 8])
@pytest.mark.parametrize("causal", [False, True], ids=["two-sided", "causal"])
@pytest.mark.parametrize("blocks", ["b=r", "default", "b<r"])
@pytest.mark.parametrize("size", ["1", "r", "r+1", "several", "ragged"])
def test_windowed_equals_masked_full_attention(r, causal, blocks, size):
    block = {"b=r": r, "default": None, "b<r": max(r // 3, 1)}[blocks]
    b = block or default_block(r)
    n = {"1": 1, "r": r, "r+1": r + 1, "several": 4 * b, "ragged": 3 * b + 2}[size]
    q, k, v, pad, grad = _inputs(n, seed=r * 7 + n)
    for key_pad in (pad, None):
        ref = _dense(q, k, v, r, causal, key_pad)
        out = windowed_attention(q, k, v, r, causal, key_pad, block=block)
        assert out.shape == (B, H, n, D)
        assert not out.isnan().any()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        for got, want in zip(_grads(out, grad, q, k, v), _grads(ref, grad, q, k, v)):
            assert not got.isnan().any()
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the empty row (length n // 3 == 0 when n < 3) attends to nothing: zeros
    if n < 3:
        assert (windowed_attention(q, k, v, r, causal, pad, block=block)[2] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_radius_zero_attends_to_itself_only(causal):
    q, k, v, pad, _ = _inputs(37)
    out = windowed_attention(q, k, v, 0, causal, None, block=4)
    torch.testing.assert_close(out, v.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, _dense(q, k, v, 0, causal, None), atol=1e-6, rtol=1e-6)


def test_two_dimensional_padding_mask_and_errors():
    q, k, v, pad, _ = _inputs(20)
    a = windowed_attention(q, k, v, 3, False, pad, block=4)
    b = windowed_attention(q, k, v, 3, False, pad[:, 0, 0, :], block=4)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="same length"):
        windowed_attention(q, k[:, :, :10], v[:, :, :10], 3)
    with pytest.raises(ValueError, match="key padding mask"):
        windowed_attention(q, k, v, 3, False, pad[..., :10])
    with pytest.raises(ValueError, match=">= 0"):
        windowed_attention(q, k, v, -1)


def _score_elements(monkeypatch, fn):
    """Run fn and return the number of score elements of every fused attention call it makes."""
    seen = []
    fused = F.scaled_dot_product_attention

    def counting(q, k, v, *args, **kwargs):
        seen.append(q.shape[:-1].numel() * k.size(-2))  # (… , T_q) × T_k scores
        return fused(q, k, v, *args, **kwargs)

    monkeypatch.setattr(window.F, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        fn()
    return seen


@pytest.mark.parametrize("causal", [False, True])
def test_work_grows_linearly_in_length(monkeypatch, causal):
    r = 8
    b = default_block(r)
    span = (2 if causal else 3) * b
    counts = {}
    for n in (64, 128, 256, 512, 1024):
        q, k, v = (torch.randn(1, 1, n, 4) for _ in range(3))
        seen = _score_elements(monkeypatch, lambda: windowed_attention(q, k, v, r, causal))
        assert len(seen) == 1  # all the blocks in one fused call
        counts[n] = seen[0]
        assert counts[n] == n * span  # n / b blocks of b queries × span keys: n·b, not n²
    assert all(counts[2 * n] == 2 * counts[n] for n in (64, 128, 256, 512))
    assert counts[1024] < 1024**2 / 20


def _mha(seed=0):
    torch.manual_seed(seed)
    return MultiHeadAttention(16, 2).eval()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("r", [1, 8])
def test_multi_head_attention_dispatches_the_window(monkeypatch, causal, r):
    """With window=/causal= and no cache, MHA takes the blocked path for long T; equal to the dense mask."""
    mha = _mha()
    calls = []
    real = attention.windowed_attention
    monkeypatch.setattr(attention, "windowed_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for n in (5, 4 * default_block(r) + 3):  # short: dense path; long: blocked
        x = torch.randn(B, n, 16, requires_grad=True)
        lengths = torch.tensor([n, n - 3, 2])
        pad = (torch.arange(n)[None, :] < lengths[:, None])[:, None, None, :]
        calls.clear()
        out, w = mha(x, mask=pad, window=r, causal=causal)
        assert w is None and len(calls) == int(use_windowed(n, r))
        dense_mask = pad & self_attention_mask(n, n, causal, r)
        ref, _ = mha(x, mask=dense_mask)  # the old interface: the whole mask
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        grad = torch.randn_like(out)
        params = [x, *mha.parameters()]
        for got, want in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(ref, params, grad)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # need_weights keeps the written-out dense path, with the same band
        calls.clear()
        out_w, weights = mha(x, mask=pad, window=r, causal=causal, need_weights=True)
        assert not calls and weights.shape == (B, 2, n, n)
        assert (weights.masked_select(~dense_mask.expand_as(weights)) == 0).all()
        torch.testing.assert_close(out_w, ref, atol=1e-5, rtol=1e-5)


def test_cached_decoding_with_a_window_matches_the_whole_sequence():
    """With a cache, T_q is small and T_k is the cache length: the dense path, band built from the past."""
    mha, r = _mha(), 3
    n = 4 * default_block(r) + 5
    x = torch.randn(2, n, 16)
    with torch.no_grad():
        full, _ = mha(x, window=r, causal=True)  # blocked
        cache = LayerCache()
        steps = [mha(x[:, :7], cache=cache, window=r, causal=True)[0]]  # a prompt, then one at a time
        steps += [mha(x[:, i : i + 1], cache=cache, window=r, causal=True)[0] for i in range(7, n)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == n


def test_dropout_in_training_keeps_empty_rows_zero():
    q, k, v, pad, _ = _inputs(40)
    out = windowed_attention(q, k, v, 3, False, pad, dropout_p=0.5, block=4)
    assert out.shape == (B, H, 40, D) and not out.isnan().any()
    # row 2 has 13 real keys: queries from 13 + 3 on see none
    assert (out[2, :, 16:] == 0).all()
