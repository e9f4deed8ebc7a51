"""The KV cache: select/reorder keep the right rows, copy only the filled positions, and keep beam search unchanged."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from transformer.config import preset
from transformer.inference.search import SearchConfig, beam_search
from transformer.model.cache import KVCache, LayerCache
from transformer.model.models import build_model
from transformer.text.data import collate_source

H, D = 2, 4


def _chunk(b, t, seed):
    return torch.randn(b, H, t, D, generator=torch.Generator().manual_seed(seed))  # (B, H, T, D)


# Each case: the capacity reserved (0 = none), then steps: ("append", T) or ("select", row indices).
CASES = {
    "reserved, shrink and reorder": (
        20,
        [("append", 3), ("select", [2, 0, 1, 1]), ("append", 1), ("select", [3, 0]), ("append", 2)],
    ),
    "reserved, more rows than stored": (20, [("append", 2), ("select", [0, 0, 1, 1, 2, 2]), ("append", 4)]),
    "reserved, past capacity": (4, [("append", 3), ("select", [1, 2]), ("append", 3), ("select", [1]), ("append", 1)]),
    "not reserved": (0, [("append", 1), ("select", [2, 1]), ("append", 20), ("select", [0, 1, 0]), ("append", 1)]),
    "full when selected": (3, [("append", 3), ("select", [2, 0]), ("append", 1)]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_select_and_append_match_a_recomputed_reference(name):
    reserved, steps = CASES[name]
    cache = LayerCache()
    cache.reserved = reserved
    ref_k = ref_v = _chunk(3, 0, 0)  # (B, H, 0, D): the reference, recomputed by cat and index_select
    for i, (op, arg) in enumerate(steps):
        if op == "append":
            k, v = _chunk(ref_k.size(0), arg, i), _chunk(ref_k.size(0), arg, 100 + i)
            ref_k, ref_v = torch.cat([ref_k, k], dim=2), torch.cat([ref_v, v], dim=2)
            out_k, out_v = cache.append(k, v)
            assert torch.equal(out_k, ref_k) and torch.equal(out_v, ref_v)
        else:
            index = torch.tensor(arg)
            ref_k, ref_v = ref_k.index_select(0, index), ref_v.index_select(0, index)
            cache.select(index)
            assert torch.equal(cache.k[:, :, : cache.length], ref_k)
            assert torch.equal(cache.v[:, :, : cache.length], ref_v)
        assert cache.length == ref_k.size(2)


def test_select_keeps_the_reserved_capacity():
    cache = LayerCache()
    cache.reserved = 50
    cache.append(_chunk(4, 3, 0), _chunk(4, 3, 1))
    cache.select(torch.tensor([3, 1, 1]))
    assert cache.k.shape == (3, H, 50, D) and cache.v.shape == (3, H, 50, D)
    storage = cache.k.data_ptr(), cache.v.data_ptr()
    k, _ = cache.append(_chunk(3, 1, 2), _chunk(3, 1, 3))
    assert (cache.k.data_ptr(), cache.v.data_ptr()) == storage  # the next append did not reallocate
    assert k.shape == (3, H, 4, D)


def test_cross_attention_entry_selects():
    cache = LayerCache()
    k, v = _chunk(3, 5, 0), _chunk(3, 5, 1)
    cache.set(k, v)
    cache.select(torch.tensor([2, 2, 0]))
    assert torch.equal(cache.k, k[[2, 2, 0]]) and torch.equal(cache.v, v[[2, 2, 0]])
    assert cache.length == 5


def test_state_and_rewind_after_select():
    cache = KVCache(n_layers=2)
    cache.reserve(10)
    for entry in cache.self_attn:
        entry.append(_chunk(3, 2, 0), _chunk(3, 2, 1))
    cache.select(torch.tensor([1, 0]))
    mark = cache.state()
    for entry in cache.self_attn:  # a step that fails part-way ...
        entry.append(_chunk(2, 1, 2), _chunk(2, 1, 3))
    cache.cross_attn[0].set(_chunk(2, 6, 4), _chunk(2, 6, 5))
    cache.rewind(mark)  # ... is undone
    assert cache.length == 2 and all(e.k is None for e in cache.cross_attn)
    new = _chunk(2, 1, 6)
    for entry in cache.self_attn:
        k, _ = entry.append(new, new)
        assert torch.equal(k, torch.cat([_chunk(3, 2, 0)[[1, 0]], new], dim=2))


class _CountWrites(TorchDispatchMode):
    """Counts the tensor elements written by the aten ops run under it (any op but a view)."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        is_view = bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write
        if not is_view:
            outs = out if isinstance(out, (tuple, list)) else [out]
            self.elements += sum(t.numel() for t in outs if isinstance(t, torch.Tensor))
        return out


def _tiny_model():
    torch.manual_seed(0)
    return build_model(preset("tiny", vocab_size=50)).eval()


def _sources():
    g = torch.Generator().manual_seed(1)
    return collate_source([torch.randint(4, 50, (n,), generator=g).tolist() for n in (5, 2, 8, 3)], 0, 3)


def test_beam_search_copies_only_the_filled_cache(monkeypatch):
    """Each select/reorder writes O(rows · length) elements, not O(rows · capacity)."""
    calls = []  # (elements written, elements filled after the select, capacity, length)
    select = LayerCache.select

    def counted(self, index):
        with _CountWrites() as count:
            select(self, index)
        filled = 2 * self.k.size(0) * self.k.size(1) * self.length * self.k.size(3)  # k and v
        calls.append((count.elements, filled, self.k.size(2), self.length))

    monkeypatch.setattr(LayerCache, "select", counted)
    beam_search(_tiny_model(), _sources(), SearchConfig(beam=3, max_len_b=10))
    assert any(capacity > 4 * length for _, _, capacity, length in calls)  # the case that matters happens
    for written, filled, capacity, length in calls:
        assert written <= 2 * filled, (written, filled, capacity, length)


class _PlainLayerCache(LayerCache):
    """A reference cache entry without preallocation: cat on append, index_select on select."""

    def append(self, k, v):
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.set(k, v)
        return k, v

    def select(self, index):
        if self.k is not None:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


def _plain_cache(n_layers):
    cache = KVCache(n_layers)
    cache.self_attn = [_PlainLayerCache() for _ in range(n_layers)]
    cache.cross_attn = [_PlainLayerCache() for _ in range(n_layers)]
    return cache


@pytest.mark.parametrize("beam,max_len_b", [(3, 10), (4, 2)])
def test_beam_search_is_unchanged_by_the_cache_storage(monkeypatch, beam, max_len_b):
    model, src = _tiny_model(), _sources()
    cfg = SearchConfig(beam=beam, n_best=2, max_len_b=max_len_b)
    result = beam_search(model, src, cfg)
    monkeypatch.setattr(model, "new_cache", lambda: _plain_cache(model.cfg.n_decoder_layers))
    reference = beam_search(model, src, cfg)
    for hyps, ref in zip(result, reference):
        assert [h.tokens for h in hyps] == [h.tokens for h in ref]
        assert [h.score for h in hyps] == pytest.approx([h.score for h in ref], abs=1e-5)
