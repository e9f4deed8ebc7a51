"""Sampling with scripted logits: nucleus (top-p), top-k, temperature; and generate_ids' sliding context."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from transformer.inference.sampling import sample

# The next-token distribution of the scripted model after token 0. Sorted: token 1 (.30),
# 3 (.25), 5 (.15), 2 (.10), 6 (.08), 0 (.06), 7 (.04), 4 (.02); cumulative mass
# .30, .55, .70, .80, .88, .94, .98, 1. After token 7 it is the same, flipped: token j has
# PROBS[7 - j]. No two tokens tie, and the top_p values below stay clear of the cumulative
# sums (so float rounding cannot decide the nucleus).
PROBS = torch.tensor([0.06, 0.30, 0.10, 0.25, 0.02, 0.15, 0.08, 0.04])
V = len(PROBS)
N = 20_000  # draws per distribution: the standard error of a frequency is at most 0.0035
FREQUENCY_TOLERANCE = 0.015  # about 4 standard errors


class Scripted(nn.Module):
    """A stand-in decoder-only model: the logits of each position are `table[token at that position]`."""

    def __init__(self, table: torch.Tensor, max_len: int = 32) -> None:
        super().__init__()
        self.table = table  # (V, V) logits of the next token given the current one
        self.cfg = SimpleNamespace(max_len=max_len, pad_id=0)

    def new_cache(self):
        return None

    def forward(self, tokens: torch.Tensor, cache=None) -> torch.Tensor:
        return self.table[tokens]  # (B, T, V)


def _table() -> torch.Tensor:
    table = torch.zeros(V, V)
    table[0] = PROBS.log()
    table[7] = PROBS.flip(0).log()
    return table


def _draw(temperature=1.0, top_k=None, top_p=None, seed=0) -> dict[int, torch.Tensor]:
    """N tokens drawn after token 0 and N after token 7 (one sampling step of a batch of 2N rows)."""
    prompt = torch.tensor([0] * N + [7] * N)[:, None]
    out = sample(Scripted(_table()), prompt, 1, temperature, top_k, top_p, torch.Generator().manual_seed(seed))
    return {0: out[:N, 1], 7: out[N:, 1]}


# (temperature, top_k, top_p) -> the tokens that may be drawn after token 0
CASES = {
    "top_p=0.2": ((1.0, None, 0.2), {1}),  # the first token alone reaches 0.2
    "top_p=0.5": ((1.0, None, 0.5), {1, 3}),  # .30 < .5, then .55 reaches it
    "top_p=0.6": ((1.0, None, 0.6), {1, 3, 5}),  # .55 < .6: token 5 is needed
    "top_p=0.75": ((1.0, None, 0.75), {1, 3, 5, 2}),
    "top_p=0.85": ((1.0, None, 0.85), {1, 3, 5, 2, 6}),
    "top_p=0.9": ((1.0, None, 0.9), {1, 3, 5, 2, 6, 0}),  # .88 < .9, then .94 reaches it
    "top_p=1": ((1.0, None, 1.0), set(range(V))),
    "top_k=1": ((1.0, 1, None), {1}),
    "top_k=3": ((1.0, 3, None), {1, 3, 5}),
    "top_k=5": ((1.0, 5, None), {1, 3, 5, 2, 6}),
    "top_k=100": ((1.0, 100, None), set(range(V))),  # more than the vocabulary: no filter
    # top-p applies to the top-k renormalised: .30/.70, .55/.70 = .79 reaches 0.75 (alone: 4 tokens)
    "top_k=3,top_p=0.75": ((1.0, 3, 0.75), {1, 3}),
    # temperature first: p^2 renormalised is .46, .32, .11, ...: {1, 3} reach 0.75 (at T=1: 4 tokens)
    "T=0.5,top_p=0.75": ((0.5, None, 0.75), {1, 3}),
    "T=2": ((2.0, None, None), set(range(V))),
    "T=2,top_p=0.5": ((2.0, None, 0.5), {1, 3, 5}),  # p^.5 renormalised: .21, .19, .15 -> .55
}


@pytest.mark.parametrize("case", CASES)
def test_only_the_allowed_tokens_are_drawn_with_their_renormalised_probabilities(case):
    (temperature, top_k, top_p), allowed = CASES[case]
    draws = _draw(temperature, top_k, top_p)
    for last, probs, support in ((0, PROBS, allowed), (7, PROBS.flip(0), {V - 1 - t for t in allowed})):
        assert set(draws[last].unique().tolist()) == support  # each allowed token is drawn, no other
        tempered = probs ** (1 / temperature)
        expected = torch.zeros(V)
        expected[list(support)] = tempered[list(support)] / tempered[list(support)].sum()
        frequencies = torch.bincount(draws[last], minlength=V).float() / N
        assert (frequencies - expected).abs().max() < FREQUENCY_TOLERANCE, (case, last, frequencies, expected)


def test_same_generator_seed_same_draws():
    a, b, c = _draw(top_p=0.9, seed=1), _draw(top_p=0.9, seed=1), _draw(top_p=0.9, seed=2)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


def test_temperature_zero_is_argmax_whatever_the_filters():
    """Several steps through the cache path: each token is the argmax after the previous one."""
    torch.manual_seed(0)
    table = torch.randn(V, V)
    model = Scripted(table)
    prompt = torch.arange(V)[:, None]  # every token once
    for top_k, top_p in ((None, None), (3, None), (None, 0.5), (4, 0.9)):
        out = sample(model, prompt, 6, temperature=0.0, top_k=top_k, top_p=top_p,
                     generator=torch.Generator().manual_seed(0))
        assert out.shape == (V, 7)
        assert torch.equal(out[:, 1:], table.argmax(-1)[out[:, :-1]])
    # top_k=1 is greedy too, at any temperature
    assert torch.equal(sample(model, prompt, 6, temperature=5.0, top_k=1), out)


@pytest.mark.parametrize("bad", [dict(top_p=0.0), dict(top_p=1.5), dict(top_k=0), dict(temperature=-1.0)])
def test_invalid_sampling_options(bad):
    with pytest.raises(ValueError, match="top_p"):
        sample(Scripted(_table()), torch.zeros(1, 1, dtype=torch.long), 1, **bad)


# ---- generate_ids: sliding context past the block -----------------------------------------


class Counter(nn.Module):
    """A decoder-only stand-in that continues 100, 101, 102, ... (next token = current + 1),
    and records how many positions each call makes a cache hold."""

    def __init__(self, block: int) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(max_len=block, pad_id=0)
        self.weight = nn.Parameter(torch.zeros(1))  # generate_ids reads the device off a parameter
        self.positions: list[int] = []  # cache length after each call
        self.caches = 0

    def new_cache(self):
        self.caches += 1
        return SimpleNamespace(length=0)

    def forward(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        cache.length += tokens.size(1)
        self.positions.append(cache.length)
        return torch.nn.functional.one_hot(tokens + 1, 1000).float() * 10  # (B, T, 1000)


def _generate(monkeypatch, block: int, prompt: list[int], n_tokens: int):
    """generate_ids with the Counter model; returns the ids, the model and the (context, n) of each pass (a new
    cache, the context in one call, then n steps)."""
    from transformer.inference import lm, sampling

    calls = []
    steps = sampling._steps

    def recording_steps(model, context, n, *args, **kwargs):
        calls.append((context[0].tolist(), n))
        return steps(model, context, n, *args, **kwargs)

    monkeypatch.setattr(sampling, "_steps", recording_steps)
    model = Counter(block)
    ids = lm.generate_ids(model, prompt, n_tokens, temperature=0.0)
    return ids, model, calls


@pytest.mark.parametrize("block, schedule", [
    (16, [(5, 11), (8, 8), (8, 8), (8, 8), (8, 5)]),  # keep 16 // 2 = 8, add 8
    (15, [(5, 10), (7, 8), (7, 8), (7, 8), (7, 6)]),  # keep 15 // 2 = 7, add 8
])
def test_generate_ids_slides_the_context(monkeypatch, block, schedule):
    prompt = [100, 101, 102, 103, 104]
    ids, model, calls = _generate(monkeypatch, block, prompt, 40)
    assert ids.shape == (1, len(prompt) + 40)
    assert ids[0].tolist() == list(range(100, 100 + len(prompt) + 40))  # the prompt, then every new token
    assert [(len(context), n) for context, n in calls] == schedule
    assert calls[0][0] == prompt  # shorter than block // 2: the whole prompt
    so_far = len(prompt) + calls[0][1]
    for context, n in calls[1:]:  # after the first call: the last block // 2 tokens
        assert context == ids[0, so_far - block // 2 : so_far].tolist()
        so_far += n
    # The model never holds more than the block; it holds block - 1 at most, as the last
    # sampled token of a call is returned, not fed.
    assert max(model.positions) == block - 1
    assert model.caches == len(calls)  # a fresh cache per call


def test_generate_ids_with_a_prompt_longer_than_the_block(monkeypatch):
    prompt = list(range(100, 120))  # 20 tokens, block 16
    ids, model, calls = _generate(monkeypatch, 16, prompt, 10)
    assert ids.shape == (1, 30) and ids[0, :20].tolist() == prompt
    assert calls == [(prompt[-8:], 8), (list(range(120, 128)), 2)]
    assert max(model.positions) == 15


def test_generate_ids_within_the_block_does_not_slide(monkeypatch):
    prompt = [100, 101, 102, 103, 104]
    ids, model, calls = _generate(monkeypatch, 16, prompt, 11)  # 5 + 11 = 16: fits
    assert calls == [(prompt, 11)] and ids.shape == (1, 16)
    assert model.positions == list(range(5, 16))  # the prompt in one call, then one token per call
