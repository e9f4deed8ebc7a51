"""The lean decoding step (`Decoder._step`, `DecoderLayer.step`, `MultiHeadAttention.step`) against the
general path, the pre-sliced cross-attention projections, and beams that share one memory row."""

import copy

import pytest
import torch

from transformer.config import preset
from transformer.inference.runtime import DecodingModel
from transformer.inference.search import SearchConfig, beam_search, greedy_search
from transformer.model.attention import InProjection, SplitInProjection
from transformer.model.captioner import EncoderDecoderCaptioner
from transformer.model.layers import DecoderLayer
from transformer.model.models import EncoderDecoder, build_model
from transformer.text.data import collate_source

VOCAB, BOS = 30, 2

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _model(**overrides):
    torch.manual_seed(0)
    return build_model(preset("tiny", **{"dropout": 0.0, "vocab_size": VOCAB, **overrides})).eval()


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
    assert model.beams_share_memory
    shared = beam_search(model, src, cfg)
    monkeypatch.setattr(EncoderDecoder, "beams_share_memory", False)
    repeated = beam_search(model, src, cfg)
    assert [[h.tokens for h in hyps] for hyps in shared] == [[h.tokens for h in hyps] for hyps in repeated]
    for a, b in zip(shared, repeated):
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-5)


def test_beams_share_memory_whatever_the_mode():
    """A constant of the class, not of the train/eval mode."""
    model = _model()
    prepared = DecodingModel(model)
    for m in (model, prepared):
        assert m.train().beams_share_memory is True and m.eval().beams_share_memory is True
    assert EncoderDecoder.beams_share_memory is DecodingModel.beams_share_memory is True
    assert EncoderDecoderCaptioner.beams_share_memory is True


def _no_general_path(monkeypatch):
    """Make the layers' general `forward` fail: the cached one-position steps must take `DecoderLayer.step`."""
    def fail(*args, **kwargs):
        raise AssertionError("a cached one-position step took the general path")
    monkeypatch.setattr(DecoderLayer, "forward", fail)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("overrides", [{}, {"norm_first": True}, {"attn_window": 2}],
                         ids=["post-norm", "pre-norm", "window"])
@torch.no_grad()
def test_shared_memory_steps_equal_full_recomputation_in_either_mode(monkeypatch, mode, overrides):
    """memory (B, S, d) with tgt (B·K, 1), step by step, in train mode (all dropout 0) as in eval mode:
    the lean step path, equal to the whole target at once with the memory repeated per beam."""
    model, (src, tgt) = _model(attn_dropout=0.0, act_dropout=0.0, **overrides), _batch()
    model.train(mode == "train")
    k = 3
    memory, memory_mask = model.encode(src)
    tgt = (tgt.repeat_interleave(k, dim=0) + torch.arange(k).repeat(src.size(0))[:, None]) % VOCAB  # (B·K, T)
    full = model.decode(tgt, memory.repeat_interleave(k, 0), memory_mask.repeat_interleave(k, 0))
    _no_general_path(monkeypatch)
    cache = model.new_cache()
    steps = torch.cat([model.decode(tgt[:, t : t + 1], memory, memory_mask, cache) for t in range(tgt.size(1))], 1)
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-5)
    assert cache.cross_attn[0].k.size(0) == src.size(0)  # kept once per sentence


def _decoder_steps(model, x, memory, memory_mask, seed):
    """The decoder (no embedding, so no embedding dropout) step by step over x (B, T, d), from `seed`."""
    torch.manual_seed(seed)
    cache = model.new_cache()
    return torch.cat([model.decoder(x[:, t : t + 1], memory, memory_mask, cache) for t in range(x.size(1))], 1)


@pytest.mark.parametrize("kind", ["dropout", "attn_dropout", "act_dropout"])
@torch.no_grad()
def test_train_mode_steps_apply_dropout(monkeypatch, kind):
    """In train mode the lean step path applies each dropout (residual, attention weights, FFN activation):
    different seeds give different outputs, the same seed the same; eval mode applies none."""
    model, (src, _) = _model(**{"attn_dropout": 0.0, "act_dropout": 0.0, kind: 0.3}), _batch()
    memory, memory_mask = model.encode(src)
    k = 2
    x = torch.randn(src.size(0) * k, 4, model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    clean = _decoder_steps(model, x, memory, memory_mask, 0)
    _no_general_path(monkeypatch)
    model.train()
    a, b, again = (_decoder_steps(model, x, memory, memory_mask, seed) for seed in (1, 2, 1))
    assert not torch.allclose(a, b) and not torch.allclose(a, clean)
    torch.testing.assert_close(a, again, rtol=0, atol=0)
    assert torch.equal(_decoder_steps(model.eval(), x, memory, memory_mask, 3), clean)


@pytest.mark.parametrize("overrides", [{}, {"norm_first": True}], ids=["post-norm", "pre-norm"])
@torch.no_grad()
def test_train_mode_step_path_draws_the_general_paths_dropout(overrides):
    """With one memory row per target row, the lean step and the general path (attention weights asked
    for) make the same random draws on the same shapes: from one seed, the same dropped outputs."""
    model, (src, tgt) = _model(dropout=0.2, attn_dropout=0.2, act_dropout=0.2, **overrides), _batch()
    memory, memory_mask = model.encode(src)
    model.train()
    torch.manual_seed(5)
    lean_cache = model.new_cache()
    lean = torch.cat([model.decode(tgt[:, t : t + 1], memory, memory_mask, lean_cache)
                      for t in range(tgt.size(1))], 1)
    torch.manual_seed(5)
    general = _general_steps(model, tgt, memory, memory_mask, model.new_cache())
    torch.testing.assert_close(lean, general, rtol=1e-5, atol=1e-5)


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
