"""The bounded cache of windowed decoding: the last r + 1 positions only, the results of recomputation."""

import pytest
import torch

from transformer.config import preset
from transformer.inference.sampling import sample
from transformer.inference.search import SearchConfig, beam_search, greedy_search
from transformer.model.cache import KVCache, LayerCache
from transformer.model.models import build_model
from transformer.text.data import collate_source

R = 3


def _lm(window=R):
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=50, arch="decoder", n_encoder_layers=0, attn_window=window, max_len=256)
    return build_model(cfg).eval()


def _ids(b, t, seed=1):
    return torch.randint(4, 50, (b, t), generator=torch.Generator().manual_seed(seed))  # (B, T)


def _assert_bounded(cache, window):
    for entry in cache.self_attn:
        for x in (entry.k, entry.v):
            assert x.size(2) <= window + 1
            assert x.untyped_storage().nbytes() <= x[:, :, :1].numel() * (window + 1) * x.element_size()


@pytest.mark.parametrize("chunks", [[2] + [1] * 8, [3] + [1] * 8, [9] + [1] * 6, [1] * 5 + [6, 1, 1, 2]])
@torch.no_grad()
def test_cached_steps_match_recomputation(chunks):
    """Prompts shorter, as long as and longer than r, then single steps (and a multi-position step later)."""
    model, tokens = _lm(), _ids(2, sum(chunks))
    full = model(tokens)  # (B, T, V), the same window without a cache
    cache, start = model.new_cache(), 0
    for t in chunks:
        logits = model(tokens[:, start : start + t], cache)
        torch.testing.assert_close(logits, full[:, start : start + t], atol=1e-5, rtol=1e-5)
        start += t
        assert cache.length == start
        _assert_bounded(cache, R)


@pytest.mark.parametrize("window,n", [(0, 70), (1, 70), (R, 200)])
@torch.no_grad()
def test_long_decoding_matches_recomputation_and_stays_bounded(window, n):
    """n positions one by one (past 64 the full forward takes the blocked path); the cache stays at r + 1."""
    model, tokens = _lm(window), _ids(2, n, seed=2)
    full = model(tokens)
    cache = model.new_cache()
    steps = [model(tokens[:, :5], cache)] + [model(tokens[:, i : i + 1], cache) for i in range(5, n)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == n
    _assert_bounded(cache, window)


@torch.no_grad()
def test_greedy_sampling_matches_recomputation_and_memory_is_bounded(monkeypatch):
    model, prompt = _lm(), _ids(2, 5, seed=3)
    caches = []
    new_cache = model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda: caches.append(new_cache()) or caches[-1])
    out = sample(model, prompt, 80, temperature=0)
    assert out.shape == (2, 85)
    tokens = prompt
    for _ in range(80):  # greedy by full recomputation
        tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, tokens)
    (cache,) = caches
    assert cache.length == 84  # the last token is sampled, not fed
    _assert_bounded(cache, R)


@torch.no_grad()
def test_unbounded_flag_keeps_every_position():
    model, tokens = _lm(), _ids(1, 20)
    cache = KVCache(model.cfg.n_decoder_layers, bounded=False)
    bounded = model.new_cache()
    for i in range(20):
        a, b = model(tokens[:, i : i + 1], cache), model(tokens[:, i : i + 1], bounded)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert all(e.k.size(2) >= 20 for e in cache.self_attn)
    _assert_bounded(bounded, R)


@pytest.mark.parametrize("failed", [1, 4])
@torch.no_grad()
def test_rewind_undoes_a_step_that_failed_part_way(failed):
    """A step of `failed` positions reaches layer 0 only, is rewound, and decoding goes on unchanged."""
    model, tokens = _lm(), _ids(2, 12)
    full = model(tokens)
    cache = model.new_cache()
    model(tokens[:, :7], cache)
    mark = cache.state()
    junk = torch.randn(2, 2, failed, 16)
    cache.self_attn[0].append_window(junk, junk, R)
    cache.rewind(mark)
    assert cache.length == 7
    steps = [model(tokens[:, i : i + 1], cache) for i in range(7, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 7:], atol=1e-5, rtol=1e-5)


def test_ring_select_keeps_rows():
    entry = LayerCache()
    chunk = torch.randn(3, 2, 6, 4)
    entry.append_window(chunk[:, :, :2], chunk[:, :, :2], 2)
    for i in range(2, 6):
        k, _ = entry.append_window(chunk[:, :, i : i + 1], chunk[:, :, i : i + 1], 2)
    entry.select(torch.tensor([2, 0]))
    assert entry.k.shape == (2, 2, 3, 4) and entry.length == 6
    # positions 3, 4, 5 in slots 0, 1, 2
    assert torch.equal(entry.k, chunk[[2, 0]][:, :, 3:6])


def _translation_model():
    torch.manual_seed(0)
    return build_model(preset("tiny", vocab_size=50, attn_window=2)).eval()


def _sources():
    g = torch.Generator().manual_seed(1)
    return collate_source([torch.randint(4, 50, (n,), generator=g).tolist() for n in (5, 2, 8, 3)], 0, 3)


@pytest.mark.parametrize("beam", [1, 3])
def test_search_on_a_windowed_translation_model_is_unchanged_by_bounding(monkeypatch, beam):
    model, src = _translation_model(), _sources()
    cfg = SearchConfig(beam=beam, n_best=beam, max_len_b=12)
    caches = []
    new_cache = model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda: caches.append(new_cache()) or caches[-1])
    search = greedy_search if beam == 1 else beam_search
    result = search(model, src, cfg)
    (bounded,) = caches
    assert bounded.length > 2 + 1  # decoding went past the window, and the cache stayed within it
    _assert_bounded(bounded, 2)
    monkeypatch.setattr(model, "new_cache", lambda: KVCache(model.cfg.n_decoder_layers, bounded=False))
    reference = search(model, src, cfg)
    if beam == 1:
        assert result == reference
        return
    for hyps, ref in zip(result, reference):
        assert [h.tokens for h in hyps] == [h.tokens for h in ref]
        assert [h.score for h in hyps] == pytest.approx([h.score for h in ref], abs=1e-5)


def test_lm_generation_of_ten_blocks_keeps_every_cache_within_the_window():
    """`lm sample`'s generation (inference.lm.generate_ids) of 10x the block: every cache it makes, however the
    context slides, holds at most r + 1 positions per self-attention entry at its end."""
    from transformer.inference.lm import generate_ids

    torch.manual_seed(0)
    block = 32
    model = build_model(preset("tiny", vocab_size=50, arch="decoder", n_encoder_layers=0, attn_window=R,
                               max_len=block)).eval()
    caches = []
    new_cache = model.new_cache
    model.new_cache = lambda: caches.append(new_cache()) or caches[-1]
    tokens = generate_ids(model, [5, 6, 7], 10 * block, temperature=0)
    assert tokens.size(1) == 3 + 10 * block and len(caches) > 1
    for cache in caches:
        _assert_bounded(cache, R)
        assert cache.length > R + 1  # each call went past the window
