"""Search and sampling: cached search equals full recomputation, scripted beam search, batching, sampling."""

import math
import warnings

import pytest
import torch

from transformer.config import ModelConfig, preset
from transformer.text.data import collate_source
from transformer.inference.sampling import sample
from transformer.inference.search import SearchConfig, beam_search, greedy_search, translate_batch
from transformer.model.models import build_model

PAD, BOS, EOS = 0, 2, 3
VOCAB = 30


def _model():
    """A tiny random translation model made peaky, with EOS likely in some contexts, not in others."""
    torch.manual_seed(4)
    model = build_model(preset("tiny", dropout=0.0, vocab_size=VOCAB, tie_embeddings=False)).eval()
    with torch.no_grad():
        model.out_proj.weight.mul_(3.0)
        model.out_proj.weight[EOS].mul_(2.0)
    return model


def _sources():
    """Six sources of different lengths (one empty), without EOS."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in (5, 2, 8, 0, 3, 6)]


def _limit(src, cfg):
    """a·|source| + b, |source| = the source's tokens plus the EOS collate_source adds."""
    return math.floor(cfg.max_len_a * (len(src) + 1) + cfg.max_len_b)


def _lp(n, alpha):
    return ((5 + n) / 6) ** alpha


@torch.no_grad()
def reference_greedy(model, src, limit):
    """Greedy search for one source, recomputing the decoder over the whole prefix each step."""
    source = torch.tensor([src + [EOS]])
    prefix = [BOS]
    while len(prefix) <= limit and prefix[-1] != EOS:
        prefix.append(model(source, torch.tensor([prefix]))[0, -1].argmax().item())
    return prefix[1:-1] if prefix[-1] == EOS else prefix[1:]


@torch.no_grad()
def reference_beam(model, src, limit, k, alpha):
    """Beam search for one source by full recomputation, with the rules of decode.py.

    Returns (tokens, score, log_prob) of every finished hypothesis, best first.
    """
    source = torch.tensor([src + [EOS]])
    live = [([], 0.0)]  # (tokens, log-prob)
    finished = []  # (tokens, log-prob, generated length)
    for step in range(1, limit + 1):
        tgt = torch.tensor([[BOS] + tokens for tokens, _ in live])
        log_probs = model(source.expand(len(live), -1), tgt)[:, -1].log_softmax(-1)
        candidates = [
            (lp + log_probs[i, v].item(), tokens + [v])
            for i, (tokens, lp) in enumerate(live)
            for v in range(log_probs.size(-1))
        ]
        candidates = sorted(candidates, key=lambda c: c[0], reverse=True)[: 2 * k]
        finished += [
            (seq[:-1], lp, step) for rank, (lp, seq) in enumerate(candidates) if seq[-1] == EOS and rank < k
        ]
        live = [(seq, lp) for lp, seq in candidates if seq[-1] != EOS][:k]
        if step == limit:
            finished += [(seq, lp, step) for seq, lp in live]
        if len(finished) >= k:
            break
    ranked = [(tokens, lp / _lp(n, alpha), lp) for tokens, lp, n in finished]
    return sorted(ranked, key=lambda h: h[1], reverse=True)


def test_cached_greedy_equals_full_recomputation():
    model, sources = _model(), _sources()
    cfg = SearchConfig(beam=1, max_len_b=5)
    out = greedy_search(model, collate_source(sources), cfg)
    expected = [reference_greedy(model, s, _limit(s, cfg)) for s in sources]
    assert out == expected
    # The batch exercises both ways of ending: EOS, and the length limit.
    assert any(len(o) == _limit(s, cfg) for o, s in zip(out, sources))
    assert any(len(o) < _limit(s, cfg) - 1 for o, s in zip(out, sources))


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_cached_beam_equals_full_recomputation(alpha):
    model, sources = _model(), _sources()
    cfg = SearchConfig(beam=3, alpha=alpha, max_len_b=5, n_best=3)
    out = beam_search(model, collate_source(sources), cfg)
    for hyps, src in zip(out, sources):
        expected = reference_beam(model, src, _limit(src, cfg), k=3, alpha=alpha)[:3]
        assert [h.tokens for h in hyps] == [tokens for tokens, _, _ in expected]
        assert [h.score for h in hyps] == pytest.approx([score for _, score, _ in expected], abs=1e-4)
        assert [h.log_prob for h in hyps] == pytest.approx([lp for _, _, lp in expected], abs=1e-4)
    # Some hypotheses end with EOS, others are cut at the length limit.
    cut = [len(h.tokens) == _limit(src, cfg) for hyps, src in zip(out, sources) for h in hyps]
    assert any(cut) and not all(cut)


def test_beam_of_one_equals_greedy():
    model, src = _model(), collate_source(_sources())
    greedy = greedy_search(model, src, SearchConfig(beam=1, max_len_b=5))
    beam = beam_search(model, src, SearchConfig(beam=1, max_len_b=5))
    assert [hyps[0].tokens for hyps in beam] == greedy
    assert translate_batch(model, src, SearchConfig(beam=1, max_len_b=5)) == greedy
    wide = SearchConfig(beam=3, max_len_b=5)
    assert translate_batch(model, src, wide) == [hyps[0].tokens for hyps in beam_search(model, src, wide)]


@pytest.mark.parametrize("beam", [1, 3])
def test_batch_invariance(beam):
    """A sentence decoded alone gives what it gives inside a batch of different-length sentences."""
    model, sources = _model(), _sources()
    cfg = SearchConfig(beam=beam, max_len_b=5)
    batched = translate_batch(model, collate_source(sources), cfg)
    alone = [translate_batch(model, collate_source([s]), cfg)[0] for s in sources]
    assert batched == alone


@pytest.mark.parametrize("beam", [1, 3])
def test_empty_source_and_length_limit(beam):
    model = _model()
    cfg = SearchConfig(beam=beam, max_len_a=1.5, max_len_b=1)
    sources = [[], [7, 8, 9, 10], []]
    out = translate_batch(model, collate_source(sources), cfg)
    assert len(out) == 3
    for o, s in zip(out, sources):
        assert len(o) <= 1.5 * (len(s) + 1) + 1
    assert out[0] == out[2] == translate_batch(model, collate_source([[]]), cfg)[0]


class ScriptedCache:
    """Keeps each row's prefix; `select` reorders/drops rows like KVCache.select."""

    def __init__(self):
        self.prefix = None  # (B, t)

    def select(self, index):
        self.prefix = self.prefix[index]


class Scripted:
    """An encoder-decoder look-alike whose next-token distribution is script(sentence, prefix).

    The sentence is named by the first source token, which the memory carries, so the
    search's reordering of memory and cache is part of what is tested. `script` returns
    {token: probability}; the remaining mass is shared equally by the other tokens.
    """

    vocab = 8

    def __init__(self, script):
        self.cfg = ModelConfig(vocab_size=self.vocab, d_model=8, n_heads=1, max_len=64)
        self.script = script
        self.batch_sizes = []  # rows fed to the decoder at each step

    def encode(self, src):
        return src[:, :, None].float(), (src != PAD)[:, None, None, :]

    def new_cache(self):
        return ScriptedCache()

    def decode(self, tgt, memory, memory_mask, cache):
        cache.prefix = tgt if cache.prefix is None else torch.cat([cache.prefix, tgt], dim=1)
        self.batch_sizes.append(tgt.size(0))
        sentences = memory[:, 0, 0].long().tolist()
        rows = [self.log_probs(s, tuple(p[1:])) for s, p in zip(sentences, cache.prefix.tolist())]
        return torch.stack(rows)[:, None, :]  # (B, 1, V): project passes it through as logits

    def project(self, h):
        return h

    def log_probs(self, sentence, prefix):
        dist = self.script(sentence, prefix)
        rest = (1 - sum(dist.values())) / (self.vocab - len(dist))
        return torch.tensor([dist.get(v, rest) for v in range(self.vocab)]).log()


# A short hypothesis [4] against a long one [4, 6]; [5, 7] finishes third.
SCRIPT = {
    (): {4: 0.6, 5: 0.3},
    (4,): {EOS: 0.45, 6: 0.44},
    (5,): {7: 0.8},
    (4, 6): {EOS: 0.99},
    (5, 7): {EOS: 0.9},
}


@pytest.mark.parametrize("alpha, order", [
    (0.0, [[4], [4, 6], [5, 7]]),  # no penalty: raw log-probs, the short one wins
    (0.6, [[4, 6], [4], [5, 7]]),  # the paper's alpha: the long one wins
    (1.0, [[4, 6], [4], [5, 7]]),
])
def test_scripted_beam_search_scores_and_length_penalty(alpha, order):
    """By hand, beam 2: step 2 finishes [4]+EOS (p=.6·.45) and keeps [4, 6] (.6·.44) and
    [5, 7] (.3·.8); step 3 finishes both with EOS, giving 3 >= K finished: stop."""
    model = Scripted(lambda sentence, prefix: SCRIPT.get(prefix, {}))
    src = torch.tensor([[4, EOS]])
    log_probs = {
        (4,): math.log(0.6 * 0.45), (4, 6): math.log(0.6 * 0.44 * 0.99), (5, 7): math.log(0.3 * 0.8 * 0.9)
    }
    lengths = {(4,): 2, (4, 6): 3, (5, 7): 3}  # generated tokens, EOS included
    # (alpha 0: -1.309, -1.342, -1.532; alpha 0.6: -1.194, -1.129, -1.290; alpha 1: -1.122, -1.006, -1.149)
    scores = {t: log_probs[t] / ((5 + lengths[t]) / 6) ** alpha for t in log_probs}
    (hyps,) = beam_search(model, src, SearchConfig(beam=2, alpha=alpha, n_best=2))
    assert [h.tokens for h in hyps] == order[:2]
    assert [h.log_prob for h in hyps] == pytest.approx([log_probs[tuple(t)] for t in order[:2]], abs=1e-5)
    assert [h.score for h in hyps] == pytest.approx([scores[tuple(t)] for t in order[:2]], abs=1e-5)
    assert model.batch_sizes == [2, 2, 2]
    assert translate_batch(model, src, SearchConfig(beam=2, alpha=alpha)) == [order[0]]
    assert greedy_search(model, src, SearchConfig(beam=1)) == [[4]]  # greedy takes EOS at step 2


def _stop_after(sentence, prefix):
    """Sentence s (source token s + 4) says 4 for s steps, then EOS."""
    if len(prefix) < sentence - 4:
        return {4: 0.7, 5: 0.2}
    return {EOS: 0.9, 4: 0.05}


def test_finished_sentences_are_dropped():
    src = torch.tensor([[6, EOS], [4, EOS], [5, EOS]])  # stop after 2, 0, 1 tokens
    greedy = Scripted(_stop_after)
    assert greedy_search(greedy, src, SearchConfig(beam=1)) == [[4, 4], [], [4]]
    assert greedy.batch_sizes == [3, 2, 1]
    beam = Scripted(_stop_after)
    out = beam_search(beam, src, SearchConfig(beam=2))
    assert [hyps[0].tokens for hyps in out] == [[4, 4], [], [4]]
    # Sentence 2 (stops after 1 token) and sentence 1 (EOS first, then both beams EOS) have
    # 2 finished hypotheses after step 2 and leave; sentence 0 goes on alone.
    assert beam.batch_sizes == [6, 6, 2]


def test_eos_at_first_step():
    model = Scripted(lambda sentence, prefix: {EOS: 0.9, 4: 0.05})
    src = collate_source([[], [5, 6]])
    assert greedy_search(model, src, SearchConfig(beam=1)) == [[], []]
    out = beam_search(model, src, SearchConfig(beam=2))
    assert [hyps[0].tokens for hyps in out] == [[], []]
    assert out[0][0].log_prob == pytest.approx(math.log(0.9))
    assert out[0][0].score == pytest.approx(math.log(0.9))  # lp(1) = 1


@pytest.mark.parametrize("beam", [1, 2])
def test_max_length(beam):
    """A model that never prefers EOS stops at floor(a·|source| + b) tokens."""
    model = Scripted(lambda sentence, prefix: {4: 0.9, 5: 0.06})
    src = collate_source([[], [4, 4], [4] * 5])  # |source| = 1, 3, 6
    cfg = SearchConfig(beam=beam, alpha=0.6, max_len_a=0.5, max_len_b=2, n_best=beam)
    limits = [2, 3, 5]  # floor(2.5), floor(3.5), floor(5)
    assert translate_batch(model, src, cfg) == [[4] * n for n in limits]
    if beam > 1:
        for hyps, n in zip(beam_search(model, src, cfg), limits):
            assert all(len(h.tokens) == n for h in hyps)  # unfinished beams finished at the limit
            assert hyps[0].log_prob == pytest.approx(n * math.log(0.9), abs=1e-5)
            assert hyps[0].score == pytest.approx(n * math.log(0.9) / ((5 + n) / 6) ** 0.6, abs=1e-5)


def _lm():
    torch.manual_seed(0)
    return build_model(preset("tiny", arch="decoder", dropout=0.0, vocab_size=VOCAB, max_len=32)).eval()


PROMPT = torch.tensor([[5, 9, 11, 4], [7, 7, 20, 13]])


@torch.no_grad()
def _reference_argmax(model, prompt, n):
    tokens = prompt
    for _ in range(n):
        tokens = torch.cat([tokens, model(tokens)[:, -1:].argmax(-1)], dim=1)
    return tokens


def test_sample_is_reproducible_with_a_generator():
    model = _lm()

    def run(seed):
        return sample(model, PROMPT, 20, generator=torch.Generator().manual_seed(seed))

    first = run(0)
    assert first.shape == (2, 24)
    assert torch.equal(first[:, :4], PROMPT)
    assert torch.equal(first, run(0))
    assert not torch.equal(first, run(1))


def test_greedy_sampling_modes_equal_argmax():
    model = _lm()
    expected = _reference_argmax(model, PROMPT, 12)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample(model, PROMPT, 12, temperature=0.0), expected)
    assert torch.equal(sample(model, PROMPT, 12, top_k=1, generator=g), expected)
    assert torch.equal(sample(model, PROMPT, 12, top_p=1e-6, generator=g), expected)


def test_top_k_samples_only_from_the_top_k():
    model = _lm()
    out = sample(model, PROMPT, 20, temperature=3.0, top_k=3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(out[:, :-1])[:, 3:]  # (B, 20, V): the distribution of each sampled token
    top3 = logits.topk(3, dim=-1).indices
    new = out[:, 4:, None]
    assert (top3 == new).any(-1).all()
    assert (top3[..., :1] != new).any()  # not just argmax


def test_sample_stops_at_eos_and_respects_max_len():
    model = _lm()
    greedy = _reference_argmax(model, PROMPT[:1], 10)[0, 4:].tolist()
    eos = greedy[3]
    out = sample(model, PROMPT[:1], 10, temperature=0.0, eos_id=eos)
    assert out.shape == (1, 4 + greedy.index(eos) + 1)  # stopped early
    assert out[0, 4:].tolist() == greedy[: greedy.index(eos) + 1]
    both = sample(model, PROMPT, 10, temperature=0.0, eos_id=eos)
    row = both[0, 4:].tolist()
    assert row[: greedy.index(eos) + 1] == greedy[: greedy.index(eos) + 1]
    assert set(row[greedy.index(eos) + 1 :]) <= {PAD}  # padded after its EOS
    with pytest.raises(ValueError, match="max_len=32"):
        sample(model, PROMPT, 29)


# ---- min_len, the preallocated cache, and DecodingModel (bf16, int8, torch.compile) -----------


@pytest.mark.parametrize("beam", [1, 2])
def test_min_len_forbids_eos_until_then(beam):
    model = Scripted(lambda sentence, prefix: {EOS: 0.9, 4: 0.05})  # EOS first, if allowed
    src = collate_source([[], [5, 6]])
    assert translate_batch(model, src, SearchConfig(beam=beam, min_len=2)) == [[4, 4], [4, 4]]
    if beam > 1:
        best = beam_search(model, src, SearchConfig(beam=beam, min_len=2))[0][0]
        assert best.log_prob == pytest.approx(2 * math.log(0.05) + math.log(0.9), abs=1e-5)
    # The maximum length still wins: floor(0·|source| + 3) = 3 tokens.
    cfg = SearchConfig(beam=beam, min_len=10, max_len_a=0.0, max_len_b=3)
    assert translate_batch(model, src, cfg) == [[4, 4, 4], [4, 4, 4]]
    with pytest.raises(ValueError, match="min_len"):
        SearchConfig(min_len=-1)


def test_cache_is_preallocated_once():
    from transformer.model.cache import KVCache

    cache = KVCache(2)
    cache.reserve(7)
    k = torch.randn(3, 2, 1, 4)
    for step in range(7):
        cache.self_attn[0].append(k + step, k - step)
        assert cache.self_attn[0].k.size(2) == 7  # one allocation, of the reserved size
    storage = cache.self_attn[0].k
    keys, _ = cache.self_attn[0].append(k, k)  # past the reservation it grows, keeping the contents
    assert cache.self_attn[0].k is not storage and keys.shape == (3, 2, 8, 4)
    assert torch.equal(keys[:, :, :7], storage)
    # the search reserves the longest output it allows
    model, caches = _model(), []
    new_cache = model.new_cache
    model.new_cache = lambda: caches.append(new_cache()) or caches[-1]
    src = collate_source(_sources())
    cfg = SearchConfig(beam=1, max_len_b=5)
    greedy_search(model, src, cfg)
    assert caches[0].self_attn[0].k.size(2) == max(_limit(s, cfg) for s in _sources())


def test_reorder_beams_leaves_cross_attention_alone():
    from transformer.model.cache import KVCache

    cache = KVCache(1)
    cache.self_attn[0].append(torch.arange(4.0).view(4, 1, 1, 1), torch.zeros(4, 1, 1, 1))
    cross = torch.randn(4, 1, 3, 1)
    cache.cross_attn[0].set(cross, cross)
    cache.reorder_beams(torch.tensor([1, 1, 3, 2]))
    assert cache.self_attn[0].k[:, 0, 0, 0].tolist() == [1.0, 1.0, 3.0, 2.0]
    assert cache.cross_attn[0].k is cross


def _tied_model():
    torch.manual_seed(5)
    model = build_model(preset("tiny", dropout=0.0, vocab_size=VOCAB)).eval()
    with torch.no_grad():
        model.tgt_embed.tokens.weight.mul_(3.0)
    return model


@pytest.mark.parametrize("make", [_model, _tied_model])
def test_int8_quantized_model_translates_like_fp32(make):
    from transformer.inference.runtime import DecodingModel

    model, src = make(), collate_source(_sources())
    quantized = DecodingModel(model, quantize="int8")
    int8 = torch.ao.nn.quantized.dynamic.Linear
    assert not [n for n, m in quantized.named_modules() if isinstance(m, torch.nn.Linear)]  # every linear layer,
    assert {n.rsplit(".", 1)[-1] for n, m in quantized.named_modules() if isinstance(m, int8)} >= {
        "q_proj", "kv_proj", "in_proj", "out_proj", "w1", "w2"}  # cross-attention's split projections included
    assert (quantized.head is None) == (model.out_proj is not None)  # the tied projection too
    # Teacher-forced logits stay close to fp32 (int8 rounding flips a few near-ties: a random
    # tiny model is not peaky enough for identical translations).
    tgt = torch.randint(4, VOCAB, (src.size(0), 8), generator=torch.Generator().manual_seed(0))
    tgt[:, 0] = BOS
    with torch.no_grad():
        exact = model.project(model.decode(tgt, *model.encode(src)))
        approx = quantized.project(quantized.decode(tgt, *quantized.encode(src), quantized.new_cache()))
    assert (exact - approx).abs().max() < 0.2 * exact.std()
    assert (exact.argmax(-1) == approx.argmax(-1)).float().mean() > 0.85
    for beam in (1, 3):
        cfg = SearchConfig(beam=beam, max_len_b=5)
        out = translate_batch(quantized, src, cfg)
        assert len(out) == len(_sources())
        assert all(len(o) <= _limit(s, cfg) and all(0 <= t < VOCAB and t != EOS for t in o) for o, s in zip(out, _sources()))
    assert type(model.decoder.layers[0].ffn.w1) is torch.nn.Linear  # the original is untouched


def test_bf16_model_gives_valid_translations():
    from transformer.inference.runtime import DecodingModel

    model, sources = _model(), _sources()
    bf16 = DecodingModel(model, precision="bf16")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32
    cfg = SearchConfig(beam=3, max_len_b=5)
    out = translate_batch(bf16, collate_source(sources), cfg)
    assert len(out) == len(sources)
    assert all(len(o) <= _limit(s, cfg) and all(0 <= t < VOCAB and t != EOS for t in o) for o, s in zip(out, sources))
    with pytest.raises(ValueError, match="fp32"):
        DecodingModel(model, precision="bf16", quantize="int8")
    with pytest.raises(ValueError, match="quantize"):
        DecodingModel(model, quantize="int4")


@pytest.mark.parametrize("fail_after_running", [False, True])
def test_compile_failure_falls_back_to_eager(monkeypatch, fail_after_running):
    """If torch.compile fails (even after part of a step ran), warn once and decode eagerly, unchanged."""
    from transformer.inference.runtime import DecodingModel

    def broken_compile(fn, **kwargs):
        def compiled(*args):
            if fail_after_running:
                fn(*args)  # appends to the cache, then fails: the step must be undone
            raise RuntimeError("inductor: no C++ compiler")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    model, src = _model(), collate_source(_sources())
    compiled = DecodingModel(model, compile=True)
    assert compiled.compiled
    for beam in (1, 3):
        cfg = SearchConfig(beam=beam, max_len_b=5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = translate_batch(compiled, src, cfg)
        assert out == translate_batch(model, src, cfg)
        assert len([w for w in caught if "torch.compile failed" in str(w.message)]) == (beam == 1)
    assert not compiled.compiled


def test_cli_decoding_options(monkeypatch, capsys):
    from transformer.api import load as api_load
    from transformer.api import text as api_text
    from transformer.cli import parse
    from transformer.cli import translation as cli
    from transformer.inference.runtime import DecodingModel

    class Tok:
        def encode(self, lines):
            return [[4 + len(line) % 20] * len(line.split()) for line in lines]

        def decode(self, ids):
            return [" ".join(map(str, x)) for x in ids]

    model, seen = _model(), []
    monkeypatch.setattr(api_load.kinds, "model_kind", lambda path: "translation")
    monkeypatch.setattr(api_load.modeldir, "load_model_dir", lambda path, device: (model, model.cfg, Tok(), {}))
    original = api_text.translate_lines
    monkeypatch.setattr(api_text, "translate_lines", lambda m, *a, **k: seen.append(m) or original(m, *a, **k))
    args = parse(["translate", "--model", "x", "--quantize", "int8", "--beam", "2", "--min-len", "3", "--no-progress"])
    hyps = cli._translate_text(args, ["a b c", "d e"], "stdin")
    assert isinstance(seen[-1], DecodingModel) and seen[-1].quantize == "int8"
    assert all(len(h.split()) >= 3 for h in hyps)
    args = parse(["translate", "--model", "x", "--no-progress"])
    cli._translate_text(args, ["a b c"], "stdin")
    assert seen[-1] is model  # no option, and --precision auto on a CPU: the model as it is
