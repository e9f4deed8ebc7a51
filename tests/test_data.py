import random
from pathlib import Path

import numpy as np
import pytest
import torch

from transformer.text.data import (
    Pair,
    TokenBatchSampler,
    collate,
    collate_source,
    encode_pairs,
    read_lines,
    read_parallel,
)
from transformer.errors import UserError


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


class WordTokenizer:
    """Stand-in tokenizer: one token (id 4) per whitespace-separated word."""

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [[4] * len(t.split()) for t in texts]

    encode_target = encode


# ---- reading files ----


def test_read_lines_strips_and_splits_on_newline_only(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.txt", "\ufeff one \r\n\ttwo\n\nfour\u2028still four\n")
    assert read_lines(path) == ["one", "two", "", "four\u2028still four"]
    assert read_lines(_write(tmp_path / "b.txt", "x\ny")) == ["x", "y"]
    assert read_lines(_write(tmp_path / "c.txt", b"")) == []


def test_read_lines_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"missing\.en: no such file"):
        read_lines(tmp_path / "missing.en")
    with pytest.raises(UserError, match="is a directory"):
        read_lines(tmp_path)


def test_read_lines_invalid_utf8(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.de", b"ok\n\xff\xfe bad\n")
    with pytest.raises(UserError) as e:
        read_lines(path)
    assert str(e.value) == f"{path}:2: invalid UTF-8 (byte 0xff at column 1)"
    path = _write(tmp_path / "bad2.de", "a\nb\nc\u00e9 \n".encode() + b"x\xc3(\n")
    with pytest.raises(UserError, match=r"bad2\.de:4: invalid UTF-8 \(byte 0xc3 at column 2\)"):
        read_lines(path)


def test_read_parallel_skips_and_counts_empty(tmp_path: Path) -> None:
    src = _write(tmp_path / "a.en", "Hello\n\nthree\n  \nfive\n")
    tgt = _write(tmp_path / "a.de", "Hallo\nzwei\n\nvier\nfünf \n")
    pairs, skipped = read_parallel(src, tgt)
    assert pairs == [Pair("Hello", "Hallo", 1), Pair("five", "fünf", 5)]
    assert skipped == 3


def test_read_parallel_line_count_mismatch(tmp_path: Path) -> None:
    src = _write(tmp_path / "a.en", "1\n2\n3\n")
    tgt = _write(tmp_path / "a.de", "1\n2\n")
    with pytest.raises(UserError, match=r"a\.en has 3 lines but .*a\.de has 2"):
        read_parallel(src, tgt)


def test_read_parallel_empty_corpus(tmp_path: Path) -> None:
    src = _write(tmp_path / "a.en", "x\n\n")
    tgt = _write(tmp_path / "a.de", "\ny\n")
    with pytest.raises(UserError, match=r"a\.en: empty corpus"):
        read_parallel(src, tgt)


def test_encode_pairs_and_length_limit() -> None:
    pairs = [Pair("a b", "c", 1), Pair("d", "e f g", 3)]
    src, tgt, kept = encode_pairs(WordTokenizer(), pairs, 5, "x.en", "x.de")
    assert src == [[4, 4], [4]] and tgt == [[4], [4, 4, 4]] and kept == pairs
    with pytest.raises(UserError) as e:
        encode_pairs(WordTokenizer(), pairs, 4, "x.en", "x.de")
    assert str(e.value) == (
        "x.de:3: sentence has 3 tokens, over the limit of 2 "
        "(raise the model's max_len, clean the data, or skip such pairs with `too_long` skip)"
    )
    with pytest.raises(UserError, match=r"x\.en:1: sentence needs 3 tokens, more than `max_tokens` 2"):
        encode_pairs(WordTokenizer(), pairs, 9, "x.en", "x.de", max_tokens=2)


def test_encode_pairs_skips_pairs_too_long_when_asked() -> None:
    pairs = [Pair("a b", "c", 1), Pair("d", "e f g", 3), Pair("h", "i", 4), Pair("j k l m", "n", 7)]
    src, tgt, kept = encode_pairs(WordTokenizer(), pairs, 4, "x.en", "x.de", skip_too_long=True)
    assert [p.line for p in kept] == [1, 4] and src == [[4, 4], [4]] and tgt == [[4], [4]]
    src, tgt, kept = encode_pairs(WordTokenizer(), pairs, 9, "x.en", "x.de", max_tokens=3, skip_too_long=True)
    assert [p.line for p in kept] == [1, 4] and [len(s) for s in src] == [2, 1]


# ---- batching ----


def _cost(batch: list[int], src_lens: list[int], tgt_lens: list[int]) -> int:
    """Padded size as documented: B * max(longest source + 1, longest target + 1)."""
    width = max(max(src_lens[i], tgt_lens[i]) + 1 for i in batch)
    return len(batch) * width


def _random_lengths(n: int, seed: int) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    src = [rng.randint(1, 60) for _ in range(n)]
    return src, [max(1, s + rng.randint(-10, 10)) for s in src]


@pytest.mark.parametrize("max_tokens", [71, 100, 500, 4096])
@pytest.mark.parametrize("shuffle", [True, False])
def test_batches_fit_and_cover_every_index(max_tokens: int, shuffle: bool) -> None:
    src, tgt = _random_lengths(3000, max_tokens)
    sampler = TokenBatchSampler(src, tgt, max_tokens, seed=1, shuffle=shuffle)
    for epoch in range(3):
        batches = sampler.batches(epoch)
        assert all(batches)
        assert all(_cost(b, src, tgt) <= max_tokens for b in batches)
        assert sorted(i for b in batches for i in b) == list(range(3000))
    # greedy cutting: adding the next sentence of the sorted order would overflow
    if not shuffle:
        flat = [i for b in batches for i in b]
        assert flat == sorted(range(3000), key=lambda i: (tgt[i], src[i]))
        for b, nxt in zip(batches, batches[1:]):
            assert _cost(b + nxt[:1], src, tgt) > max_tokens


def test_batches_deterministic_and_epochs_differ() -> None:
    src, tgt = _random_lengths(2000, 0)
    state, torch_state, np_state = random.getstate(), torch.get_rng_state(), np.random.get_state()
    a = TokenBatchSampler(src, tgt, 1000, seed=7)
    b = TokenBatchSampler(src, tgt, 1000, seed=7)
    assert a.batches(3) == b.batches(3)
    assert a.batches(3) != a.batches(4)
    assert a.batches(3) != TokenBatchSampler(src, tgt, 1000, seed=8).batches(3)
    fixed = TokenBatchSampler(src, tgt, 1000, shuffle=False)
    assert fixed.batches(0) == fixed.batches(1)
    assert random.getstate() == state and torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state[1])


def test_batches_group_similar_lengths() -> None:
    src, tgt = _random_lengths(3000, 1)
    batches = TokenBatchSampler(src, tgt, 2000, seed=0).batches(0)

    def padding(batches: list[list[int]]) -> float:
        pad = sum(_cost(b, src, tgt) - sum(max(src[i], tgt[i]) + 1 for i in b) for b in batches)
        return pad / sum(_cost(b, src, tgt) for b in batches)

    order = list(range(3000))
    random.Random(0).shuffle(order)
    sizes = [len(b) for b in batches]
    naive = [order[sum(sizes[:k]) : sum(sizes[: k + 1])] for k in range(len(sizes))]
    assert padding(batches) < 0.2 < 0.4 < padding(naive)


def test_sentence_over_max_tokens() -> None:
    with pytest.raises(UserError, match=r"needs 51 tokens, more than `max_tokens` 50"):
        TokenBatchSampler([3, 50, 4], [2, 10, 4], max_tokens=50)
    assert TokenBatchSampler([3, 49, 4], [2, 10, 4], max_tokens=50).batches(0)


# ---- collation ----


def test_collate_exact() -> None:
    src_tokens, tgt_in, tgt_out = collate([[5, 6, 7], [8]], [[9], [10, 11]])
    assert src_tokens.dtype == tgt_in.dtype == tgt_out.dtype == torch.long
    assert src_tokens.tolist() == [[5, 6, 7, 3], [8, 3, 0, 0]]
    assert tgt_in.tolist() == [[2, 9, 0], [2, 10, 11]]
    assert tgt_out.tolist() == [[9, 3, 0], [10, 11, 3]]
    src_tokens, tgt_in, tgt_out = collate([[5]], [[6]], pad_id=9, bos_id=8, eos_id=7)
    assert (src_tokens.tolist(), tgt_in.tolist(), tgt_out.tolist()) == ([[5, 7]], [[8, 6]], [[6, 7]])


def test_collate_source() -> None:
    out = collate_source([[4], [5, 6, 7]])
    assert out.dtype == torch.long and out.shape == (2, 4)
    assert out.tolist() == [[4, 3, 0, 0], [5, 6, 7, 3]]
