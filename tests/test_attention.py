"""The written-out and the fused attention paths agree, under every kind of mask."""

import math

import pytest
import torch

import transformer.model.attention as attention
from transformer.config import preset
from transformer.model.cache import LayerCache
from transformer.model.models import build_model
from transformer.model.attention import (
    MultiHeadAttention,
    padding_mask,
    scaled_dot_product_attention,
    self_attention_mask,
)


def _qkv(b=3, h=2, t=7, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, d, generator=g) for _ in range(3)]


def _masks(t=7):
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 0, 0, 0, 0], [5, 0, 0, 0, 0, 0, 0]])
    pad = padding_mask(tokens, pad_id=0)  # (3, 1, 1, 7)
    return {
        "none": None,
        "padding": pad,
        "causal": self_attention_mask(t, t, causal=True, window=None),
        "local": self_attention_mask(t, t, causal=False, window=2),
        "causal+local": self_attention_mask(t, t, causal=True, window=1),
        "padding+causal": pad & self_attention_mask(t, t, causal=True, window=None),
        "padding+local": pad & self_attention_mask(t, t, causal=False, window=1),
    }


@pytest.mark.parametrize("name", list(_masks()))
def test_fused_and_written_out_paths_agree(name):
    q, k, v = _qkv()
    mask = _masks()[name]
    fused, none = scaled_dot_product_attention(q, k, v, mask)
    explicit, weights = scaled_dot_product_attention(q, k, v, mask, need_weights=True)
    assert none is None
    assert not torch.isnan(fused).any() and not torch.isnan(explicit).any()
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=0)
    full = torch.ones(weights.shape, dtype=torch.bool) if mask is None else mask.expand(weights.shape)
    # Weights sum to 1 over the allowed keys, and are exactly 0 on masked keys.
    has_key = full.any(-1)
    torch.testing.assert_close(weights.sum(-1)[has_key], torch.ones(int(has_key.sum())), atol=1e-6, rtol=0)
    assert (weights[~full] == 0).all()


def test_fully_masked_row_gives_zeros_not_nan():
    q, k, v = _qkv()
    mask = torch.ones(3, 1, 7, 7, dtype=torch.bool)
    mask[1, 0, 2] = False  # query 2 of sentence 1 may attend to nothing
    for need_weights in (False, True):
        out, weights = scaled_dot_product_attention(q, k, v, mask, need_weights=need_weights)
        assert not torch.isnan(out).any()
        assert (out[1, :, 2] == 0).all()
        assert out[1, :, 3].abs().sum() > 0
        if weights is not None:
            assert (weights[1, :, 2] == 0).all()


def _sdpa_before_2_5(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
    """F.scaled_dot_product_attention as torch < 2.5 had it: NaN in a query row with every key masked."""
    assert not is_causal
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def test_fully_masked_row_is_zero_whatever_the_fused_kernel(monkeypatch):
    q, k, v = _qkv()
    mask = _masks()["padding+local"]  # sentence 2 (one real token): queries 2.. see no key
    expected, _ = scaled_dot_product_attention(q, k, v, mask, need_weights=True)
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", _sdpa_before_2_5)
    assert torch.isnan(_sdpa_before_2_5(q, k, v, mask)[2, :, 2:]).all()  # the stand-in does give NaN
    out, _ = scaled_dot_product_attention(q, k, v, mask)
    assert (out[2, :, 2:] == 0).all()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)  # and the right values elsewhere
    assert out[0].abs().sum() > 0


@pytest.mark.parametrize("old_kernel", [False, True])
def test_windowed_padded_encoder_has_no_nan(monkeypatch, old_kernel):
    """Restricted self-attention over a padded batch: padding queries far from real tokens see no key."""
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=50, attn_window=1)).eval()
    src = torch.tensor([[5, 6, 7, 8, 9, 10, 3], [5, 3, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        reference, _ = model.encode(src)
        if old_kernel:
            monkeypatch.setattr(attention.F, "scaled_dot_product_attention", _sdpa_before_2_5)
        memory, _ = model.encode(src)
        x = torch.randn(2, 7, model.cfg.d_model)
        mask = padding_mask(src, 0) & self_attention_mask(7, 7, causal=False, window=1)
        assert not mask[1, 0, 4].any()  # such a query row exists
        mha = next(m for m in model.modules() if isinstance(m, MultiHeadAttention))
        fast, _ = mha(x, mask=mask)
        slow, _ = mha(x, mask=mask, need_weights=True)
    assert not torch.isnan(memory).any()
    torch.testing.assert_close(memory, reference, atol=1e-5, rtol=0)
    assert not torch.isnan(fast).any()
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast[1, 4], mha.out_proj.bias)  # a row with no key: W^O · 0 + bias


def test_local_window_mask_shape_and_content():
    mask = self_attention_mask(5, 5, causal=False, window=1)
    expected = torch.tensor(
        [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(mask, expected)
    # Queries that follow cached positions are aligned to the end of the keys.
    assert torch.equal(self_attention_mask(2, 5, causal=True, window=None), torch.tril(torch.ones(5, 5, dtype=torch.bool))[3:])
    assert self_attention_mask(4, 4, causal=False, window=None) is None
    # A decoding step (one query, the last position) sees every key: no mask to build, unless a window cuts.
    assert self_attention_mask(1, 5, causal=True, window=None) is None
    assert self_attention_mask(1, 5, causal=True, window=4) is None
    assert torch.equal(self_attention_mask(1, 5, causal=True, window=2), torch.tensor([[False, False, True, True, True]]))


def test_multihead_module_paths_agree_and_weights_per_head():
    torch.manual_seed(0)
    mha = MultiHeadAttention(d_model=16, n_heads=4).eval()
    x = torch.randn(2, 5, 16)
    memory = torch.randn(2, 6, 16)
    mask = padding_mask(torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]), 0)
    for mem in (None, memory):
        m = None if mem is None else mask
        fast, none = mha(x, mem, mask=m)
        slow, weights = mha(x, mem, mask=m, need_weights=True)
        assert none is None
        assert weights.shape == (2, 4, 5, 5 if mem is None else 6)
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    assert not any("weight" in k for k in vars(mha) if not k.startswith("_"))  # nothing stashed


def test_layer_cache_appends_beyond_capacity_and_selects_rows():
    cache = LayerCache()
    chunks = [torch.randn(3, 2, n, 4) for n in (1, 20, 1, 5)]
    for c in chunks:
        k, v = cache.append(c, -c)
    full = torch.cat(chunks, dim=2)
    assert torch.equal(k, full) and torch.equal(v, -full)
    cache.select(torch.tensor([2, 0]))
    k, _ = cache.append(torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 1, 4))
    assert torch.equal(k[:, :, :-1], full[[2, 0]])


def test_causal_without_a_mask_tensor_equals_the_causal_mask_and_the_weights_path():
    q, k, v = _qkv()
    t = q.size(2)
    mask = self_attention_mask(t, t, causal=True, window=None)
    expected, _ = scaled_dot_product_attention(q, k, v, mask)
    out, _ = scaled_dot_product_attention(q, k, v, causal=True)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    out_w, weights = scaled_dot_product_attention(q, k, v, causal=True, need_weights=True)
    torch.testing.assert_close(out_w, expected, atol=1e-5, rtol=0)
    assert (weights.triu(1) == 0).all()


def test_training_under_cpu_bf16_autocast_computes_attention_in_fp32_with_the_same_result():
    """The bf16 autocast training path runs the kernel in fp32 (its bf16 backward is slow on CPUs):
    outputs within bf16 rounding of fp32, bf16 out, and gradients reaching q, k and v."""
    q, k, v = (x.clone().requires_grad_() for x in _qkv())
    reference, _ = scaled_dot_product_attention(q, k, v, causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
        out, _ = scaled_dot_product_attention(qb, kb, vb, causal=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, atol=3e-2, rtol=0)
    out.float().sum().backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in (q, k, v))
