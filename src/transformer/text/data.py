"""Reading parallel text, and batching sentence pairs by token count.

The paper batches "sentence pairs together by approximate sequence length";
`TokenBatchSampler` does the same so that a batch holds about `max_tokens`
positions with little padding. Problems with the user's files raise
`UserError` naming the file and the 1-based line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
import torch
from torch import Tensor

from transformer.errors import UserError
from transformer.text.tokenizer import Tokenizer


def open_binary(path: str | Path) -> BinaryIO:
    """`path` opened for reading bytes; a missing file, a directory or an unreadable one raise `UserError`."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a text file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def decode(data: bytes, path: str | Path, first_line: int = 1) -> str:
    """`data`, whole lines of the file `path` from line `first_line` on, as text; invalid UTF-8 raises
    `UserError` naming the file, the line and the column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + first_line
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise UserError(
            f"{path}:{line}: invalid UTF-8 (byte 0x{data[e.start]:02x} at column {column})"
        ) from None


def read_text(path: str | Path) -> str:
    """The whole of a UTF-8 text file, without a leading byte-order mark.

    A missing file, a directory or invalid UTF-8 raise `UserError` naming the file
    (and for invalid UTF-8 the line and column).
    """
    with open_binary(path) as f:
        try:
            data = f.read()
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror})") from None
    return decode(data, path).removeprefix("\ufeff")


def read_lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 text file (see `read_text`), each stripped of surrounding whitespace.

    Lines are split on ``"\\n"`` only, so line numbers match those of editors
    and of the parallel file.
    """
    text = read_text(path)
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the file ends with a newline (or is empty)
    return [line.strip() for line in lines]


@dataclass(frozen=True)
class Pair:
    """A source sentence, its translation, and their 1-based line number in the files."""

    src: str
    tgt: str
    line: int


def read_parallel(src_path: str | Path, tgt_path: str | Path) -> tuple[list[Pair], int]:
    """Sentence pairs of two line-aligned files, and how many pairs were skipped.

    A pair is skipped when either side is empty after stripping whitespace.
    """
    src_lines, tgt_lines = read_lines(src_path), read_lines(tgt_path)
    if len(src_lines) != len(tgt_lines):
        raise UserError(
            f"{src_path} has {len(src_lines)} lines but {tgt_path} has {len(tgt_lines)}"
        )
    pairs = [
        Pair(s, t, n)
        for n, (s, t) in enumerate(zip(src_lines, tgt_lines), start=1)
        if s and t
    ]
    if not pairs:
        raise UserError(f"{src_path}: empty corpus (no line with text on both sides)")
    return pairs, len(src_lines) - len(pairs)


def encode_pairs(
    tokenizer: Tokenizer,
    pairs: list[Pair],
    max_len: int,
    src_path: str | Path,
    tgt_path: str | Path,
    max_tokens: int | None = None,
    skip_too_long: bool = False,
) -> tuple[list[list[int]], list[list[int]], list[Pair]]:
    """Token ids of each pair's source and target, without BOS/EOS, and the pairs they come from.

    Each side may have at most ``max_len - 2`` tokens, leaving room for BOS and EOS, and a
    pair at most `max_tokens` padded positions (see `TokenBatchSampler`). A longer pair is
    left out when `skip_too_long` (real corpora always hold a few: fairseq and OpenNMT skip
    them too), else it is a `UserError` naming its file and line.
    """
    limit = max_len - 2
    src_ids, tgt_ids = tokenizer.encode([p.src for p in pairs]), tokenizer.encode_target([p.tgt for p in pairs])
    kept: tuple[list, list, list] = ([], [], [])
    for pair, src, tgt in zip(pairs, src_ids, tgt_ids):
        path, longest = (src_path, src) if len(src) >= len(tgt) else (tgt_path, tgt)
        problem = None
        if len(longest) > limit:
            problem = f"sentence has {len(longest)} tokens, over the limit of {limit} (raise the model's max_len"
        elif max_tokens is not None and len(longest) + 1 > max_tokens:
            problem = f"sentence needs {len(longest) + 1} tokens, more than `max_tokens` {max_tokens} (raise it"
        if problem is None:
            for out, item in zip(kept, (src, tgt, pair)):
                out.append(item)
        elif not skip_too_long:
            raise UserError(f"{path}:{pair.line}: {problem}, clean the data, or skip such pairs with `too_long` skip)")
    return kept


class TokenBatchSampler:
    """Batches of sentence indices grouped by length; each batch's padded size ≤ max_tokens.

    The padded size of a batch of B pairs is ``B * max(S, T)``, where
    ``S = longest source + 1`` (the EOS of `collate`'s ``src_tokens``) and
    ``T = longest target + 1`` (the BOS of ``tgt_in`` / the EOS of ``tgt_out``):
    the number of positions, padding included, of the larger of the source and
    target tensors.
    """

    def __init__(
        self,
        src_lens: Sequence[int],
        tgt_lens: Sequence[int],
        max_tokens: int,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if len(src_lens) != len(tgt_lens):
            raise ValueError(f"{len(src_lens)} source lengths but {len(tgt_lens)} target lengths")
        self.src_lens = np.asarray(src_lens, dtype=np.int64)
        self.tgt_lens = np.asarray(tgt_lens, dtype=np.int64)
        self.widths = np.maximum(self.src_lens, self.tgt_lens) + 1  # max(S, T) of each pair alone
        self.max_tokens, self.seed, self.shuffle = max_tokens, seed, shuffle
        need = int(self.widths.max(initial=0))
        if need > max_tokens:
            raise UserError(
                f"a sentence pair needs {need} tokens, more than `max_tokens` {max_tokens}; "
                f"raise `max_tokens` to at least {need}"
            )

    def batches(self, epoch: int) -> list[list[int]]:
        """Every index exactly once, in batches; the same for the same (seed, epoch).

        Indices are sorted by (target length, source length) and cut greedily into
        batches. With `shuffle`, ties are broken at random and the order of the
        batches is shuffled, both by a generator seeded from (seed, epoch) that
        leaves the global random state alone; without it, batches come in sorted
        order.
        """
        return [batch.tolist() for batch in self.arrays(epoch)]

    def arrays(self, epoch: int) -> list[np.ndarray]:
        """`batches(epoch)` as int64 arrays, views of one array: for millions of sentences, a fraction of the
        memory of lists of Python ints."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.widths)) if self.shuffle else np.arange(len(self.widths))
        order = order[np.lexsort((self.src_lens[order], self.tgt_lens[order]))]  # stable sort
        widths = self.widths[order]
        # Greedy: a batch takes the next sentences while (its size) x (its widest) <= max_tokens. Its size is
        # the first k where (k + 1) x (running max of the widths from its start) goes over.
        ends, start, most = [], 0, self.max_tokens // max(int(widths.min(initial=1)), 1)
        while start < len(widths):
            running = np.maximum.accumulate(widths[start : start + most])
            over = np.flatnonzero(np.arange(1, len(running) + 1) * running > self.max_tokens)
            start += int(over[0]) if len(over) else len(running)
            ends.append(start)
        batches = np.split(order, ends[:-1]) if ends else []
        if self.shuffle:
            batches = [batches[k] for k in rng.permutation(len(batches))]
        return batches


def pad(seqs: list[list[int]], pad_id: int = Tokenizer.PAD) -> Tensor:
    """(B, L) long tensor of `seqs`, right-padded with `pad_id` to the longest."""
    out = torch.full((len(seqs), max(map(len, seqs), default=0)), pad_id, dtype=torch.long)
    for row, seq in enumerate(seqs):
        out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def collate(
    src: list[list[int]],
    tgt: list[list[int]],
    pad_id: int = Tokenizer.PAD,
    bos_id: int = Tokenizer.BOS,
    eos_id: int = Tokenizer.EOS,
) -> tuple[Tensor, Tensor, Tensor]:
    """Tensors for a training batch of B pairs of token ids (without BOS/EOS).

    Returns ``src_tokens`` (B, S) = x + [EOS], ``tgt_in`` (B, T) = [BOS] + y and
    ``tgt_out`` (B, T) = y + [EOS], each right-padded with `pad_id`, where S and T
    are one more than the longest source and target.
    """
    return (
        collate_source(src, pad_id, eos_id),
        pad([[bos_id] + y for y in tgt], pad_id),
        pad([y + [eos_id] for y in tgt], pad_id),
    )


def collate_source(
    src: list[list[int]], pad_id: int = Tokenizer.PAD, eos_id: int = Tokenizer.EOS
) -> Tensor:
    """``src_tokens`` (B, S) = x + [EOS], right-padded with `pad_id`, for translation."""
    return pad([x + [eos_id] for x in src], pad_id)
