"""The lean decoding step (`Decoder._step`, `DecoderLayer.step`, `MultiHeadAttention.step`) against the
general path, the pre-sliced cross-attention projections, and beams that share one memory row."""

import copy

import pytest
import torch

from transformer.config import preset
from transformer.inference.runtime import DecodingModel
from transformer.inference.search import SearchConfig, beam_search, greedy_search
from transformer.model.attention import InProjection, SplitInProjection
from transformer.model.models import EncoderDecoder, build_model
from transformer.text.data import collate_source

VOCAB, BOS = 30, 2

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _model(**overrides):
    torch.manual_seed(0)
    return build_model(preset("tiny", dropout=0.0, vocab_size=VOCAB, **overrides)).eval()


def _batch():
    """A padded source batch (B, S) and target inputs (B, 7) starting with BOS."""
    g = torch.Generator().manual_seed(0)
    src = collate_source([torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in (5, 2, 8, 1)])
    tgt = torch.randint(4, VOCAB, (src.size(0), 7), generator=g)
    tgt[:, 0] = BOS
    return src, tgt


def _general_steps(model, tgt, memory, memory_mask, cache):
    """Step by step through the general path (the layers' `forward`): attention weights requested."""
    return torch.cat([model.decode(tgt[:, t : t + 1], memory, memory_mask, cache, attn_weights={})
                      for t in range(tgt.size(1))], dim=1)


@pytest.mark.parametrize("overrides", [
    {}, {"norm_first": True}, {"attn_window": 2}, {"attn_window": 2, "norm_first": True},
], ids=["post-norm", "pre-norm", "window", "window, pre-norm"])
@pytest.mark.parametrize("bounded", [True, False], ids=["bounded", "unbounded"])
@pytest.mark.parametrize("masked", [True, False], ids=["padded", "no mask"])
@torch.no_grad()
def test_lean_steps_equal_full_recomputation_and_the_general_path(overrides, bounded, masked):
    model, (src, tgt) = _model(**overrides), _batch()
    memory, memory_mask = model.encode(src)
    if not masked:
        memory_mask = None  # what the searches pass when nothing is padded
    full = model.decode(tgt, memory, memory_mask)  # (B, T, d): no cache, every position at once
    cache = model.new_cache()
    for entry in cache.self_attn:
        entry.bounded = bounded
    lean = torch.cat([model.decode(tgt[:, t : t + 1], memory, memory_mask, cache) for t in range(tgt.size(1))], 1)
    general = _general_steps(model, tgt, memory, memory_mask, model.new_cache())
    torch.testing.assert_close(lean, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lean, general, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_beams_attend_to_one_shared_memory_row():
    """memory (B, S, d) with tgt (B·K, 1): the same as memory repeated K times, and kept once per sentence."""
    model, (src, tgt) = _model(), _batch()
    k = 3
    memory, memory_mask = model.encode(src)
    tgt = (tgt.repeat_interleave(k, dim=0) + torch.arange(k).repeat(src.size(0))[:, None]) % VOCAB  # (B·K, T)
    shared, repeated = model.new_cache(), model.new_cache()
    for t in range(tgt.size(1)):
        a = model.decode(tgt[:, t : t + 1], memory, memory_mask, shared)
        b = model.decode(tgt[:, t : t + 1], memory.repeat_interleave(k, 0), memory_mask.repeat_interleave(k, 0),
                         repeated)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert shared.cross_attn[0].k.size(0) == src.size(0) and repeated.cross_attn[0].k.size(0) == k * src.size(0)


@pytest.mark.parametrize("n_best", [1, 3])
def test_beam_search_with_shared_memory_is_unchanged(monkeypatch, n_best):
    model = _model()
    src = collate_source([[5, 6, 7], [], [8, 9, 10, 11, 12, 13], [4]])  # padded, and sentences finish apart
    cfg = SearchConfig(beam=3, n_best=n_best, max_len_b=6)
    assert model.beams_share_memory and not model.train().beams_share_memory  # only the eval step path shares
    model.eval()
    shared = beam_search(model, src, cfg)
    monkeypatch.setattr(EncoderDecoder, "beams_share_memory", property(lambda self: False))
    repeated = beam_search(model, src, cfg)
    assert [[h.tokens for h in hyps] for hyps in shared] == [[h.tokens for h in hyps] for hyps in repeated]
    for a, b in zip(shared, repeated):
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-5)


@torch.no_grad()
def test_split_projection_equals_the_fused_one():
    fused = InProjection(16, 48)
    split = SplitInProjection(fused)
    x, memory = torch.randn(3, 16), torch.randn(3, 5, 16)
    torch.testing.assert_close(split.queries(x), fused(x)[:, :16], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(split.keys_values(memory), fused(memory)[..., 16:], rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_fp32_decoding_model_equals_the_model():
    """DecodingModel splits cross-attention's projection (a copy): same logits, same greedy output."""
    model, (src, tgt) = _model(tie_embeddings=False), _batch()
    original = copy.deepcopy(model.state_dict())
    prepared = DecodingModel(model)
    assert all(isinstance(layer.cross_attn.in_proj, SplitInProjection) for layer in prepared.model.decoder.layers)
    assert all(type(layer.cross_attn.in_proj) is InProjection for layer in model.decoder.layers)  # untouched
    exact = model.project(model.decode(tgt, *model.encode(src)))
    memory, memory_mask = prepared.encode(src)
    cache = prepared.new_cache()
    steps = torch.cat([prepared.project(prepared.decode(tgt[:, t : t + 1], memory, memory_mask, cache))
                       for t in range(tgt.size(1))], dim=1)
    torch.testing.assert_close(steps, exact, rtol=1e-5, atol=1e-5)
    cfg = SearchConfig(beam=1, max_len_b=6)
    assert greedy_search(prepared, src, cfg) == greedy_search(model, src, cfg)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items())
