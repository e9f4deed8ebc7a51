"""The explicit decoding cache: keys and values of every attention layer, kept across steps.

`KVCache` is created empty by the caller (`model.new_cache()`), passed through the model's
`decode`/`forward`, and filled by the attention modules: self-attention appends each step's
keys/values, cross-attention stores the encoder output's once. Searches reorder it when
they choose beams and shrink it when sentences finish.

With restricted self-attention (`attn_window = r`, causal) a query sees only the last
r + 1 positions, itself included, so a self-attention entry keeps only those: a ring of
r + 1 slots, position p in slot p mod (r + 1) (`append_window`). Its memory is then
constant however long decoding runs. `KVCache(n, bounded=False)` keeps every position
instead (the reference the bounded cache is tested against).
"""

from __future__ import annotations

import torch
from torch import Tensor


class LayerCache:
    """Keys and values of one attention layer, kept across decoding steps, every row at the same position.

    Self-attention appends each step's keys/values into preallocated storage: `reserve`
    sets its capacity once (the search knows the longest output it allows), and past
    that it grows by doubling (so a step costs no full copy). Cross-attention stores
    the keys/values of the encoder output once. `select` copies only the filled
    positions and keeps the storage, so it costs O(length), not O(capacity).

    With a window (`append_window`, when `bounded`), the storage is instead a ring of
    r + 1 slots, (B, H, r + 1, D), and `length` still counts every position decoded.
    """

    def __init__(self, bounded: bool = True) -> None:
        self.k: Tensor | None = None  # (B, H, capacity, D); a ring: (B, H, r + 1, D)
        self.v: Tensor | None = None
        self.length = 0  # positions decoded so far (stored: min(length, r + 1) in a ring)
        self.reserved = 0  # capacity of the first allocation, when known
        self.bounded = bounded  # whether append_window may keep only the window
        self.window: int | None = None  # r, once this entry is a ring

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add (B, H, T, D) keys/values; return all so far, (B, H, length, D)."""
        t = k.size(2)
        if self.k is None or self.length + t > self.k.size(2):
            need = self.length + t
            capacity = self.reserved if self.reserved >= need else max(2 * need, 16)
            new_k = k.new_empty(k.size(0), k.size(1), capacity, k.size(3))
            new_v = v.new_empty(new_k.shape)
            if self.k is not None:
                new_k[:, :, : self.length] = self.k[:, :, : self.length]
                new_v[:, :, : self.length] = self.v[:, :, : self.length]
            self.k, self.v = new_k, new_v
        self.k[:, :, self.length : self.length + t] = k
        self.v[:, :, self.length : self.length + t] = v
        self.length += t
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def append_window(self, k: Tensor, v: Tensor, window: int) -> tuple[Tensor, Tensor]:
        """Add (B, H, T, D) keys/values of causal self-attention with radius r = `window`.

        Returns the keys/values the T new queries may need: the last min(length, r) before
        them, then the T new ones, (B, H, n, D), n <= r + T. They are in position order,
        except for T = 1 once the ring is full: then they are the r + 1 slots in ring
        order, all of them inside the query's band, so a band mask over n relative
        positions (all True for one query) is right whatever the order.

        Not `bounded`: a plain `append` (every position kept, in order).
        """
        if not self.bounded:
            return self.append(k, v)
        slots, t = window + 1, k.size(2)
        if t == 1 and self.k is not None:  # a decoding step: overwrite the slot leaving the band, in place
            self.k[:, :, self.length % slots] = k[:, :, 0]
            self.v[:, :, self.length % slots] = v[:, :, 0]
            self.length += 1
            n = min(self.length, slots)
            return self.k[:, :, :n], self.v[:, :, :n]  # (B, H, n, D)
        # Several positions (a prompt), or the first: the past r in order, then the new ones.
        # New storage rather than in place, so that `rewind` can restore the old ring.
        if self.k is not None:
            past = torch.arange(self.length - min(self.length, window), self.length, device=k.device)
            k = torch.cat([self.k.index_select(2, past % slots), k], dim=2)  # (B, H, n, D)
            v = torch.cat([self.v.index_select(2, past % slots), v], dim=2)
        self.length += t
        keep = min(slots, k.size(2))  # the last r + 1 positions go to their slots
        where = torch.arange(self.length - keep, self.length, device=k.device) % slots
        self.k = k.new_zeros(k.size(0), k.size(1), slots, k.size(3))  # (B, H, r + 1, D)
        self.v = v.new_zeros(self.k.shape)
        self.k[:, :, where], self.v[:, :, where] = k[:, :, -keep:], v[:, :, -keep:]
        self.window = window
        return k, v

    def set(self, k: Tensor, v: Tensor) -> None:
        """Store computed-once keys/values (cross-attention)."""
        self.k, self.v, self.length = k, v, k.size(2)

    def select(self, index: Tensor) -> None:
        """Keep batch rows `index` (B',): reorders beams and drops finished sentences.

        Copies the filled positions only. With spare capacity, they are gathered back
        into the same storage (its first B' rows, or new storage of the same capacity
        when B' is larger), so the next `append` still does not reallocate; the rows
        dropped stay allocated until the storage grows.
        """
        if self.k is None:
            return
        if self.window is not None or self.length == self.k.size(2):  # a ring, or no spare capacity: plain copy
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)
            return
        k = self.k[:, :, : self.length].index_select(0, index)  # (B', H, length, D)
        v = self.v[:, :, : self.length].index_select(0, index)
        rows = index.size(0)
        if rows > self.k.size(0):
            self.k = k.new_empty(rows, k.size(1), self.k.size(2), k.size(3))  # (B', H, capacity, D)
            self.v = v.new_empty(self.k.shape)
        else:
            self.k, self.v = self.k[:rows], self.v[:rows]  # views of the same storage
        self.k[:, :, : self.length] = k
        self.v[:, :, : self.length] = v


class KVCache:
    """The explicit decoding cache: one self- and one cross-attention entry per layer.

    Created empty by the caller, passed to `decode`/`forward`, filled by the
    attention modules. `length` is the number of target positions decoded so far.
    With a window r, the self-attention entries keep only the last r + 1 positions,
    unless `bounded` is False.
    """

    def __init__(self, n_layers: int, bounded: bool = True) -> None:
        self.self_attn = [LayerCache(bounded) for _ in range(n_layers)]
        self.cross_attn = [LayerCache() for _ in range(n_layers)]

    @property
    def length(self) -> int:
        return self.self_attn[0].length if self.self_attn else 0

    def reserve(self, positions: int) -> None:
        """Preallocate self-attention storage for `positions` target positions (before the first step)."""
        for entry in self.self_attn:
            entry.reserved = positions

    def select(self, index: Tensor) -> None:
        """Keep batch rows `index` in every layer (beam reordering, dropping finished rows)."""
        for entry in self.self_attn + self.cross_attn:
            entry.select(index)

    def select_beams(self, index: Tensor, sentences: Tensor) -> None:
        """Keep self-attention rows `index` (B'·K,) and cross-attention rows `sentences` (B',).

        For beam search whose cross-attention entries hold one row per sentence (the K beams
        of a sentence share it, `MultiHeadAttention.step`): rows `index` are beams of the
        sentences `sentences`, in that order.
        """
        for entry in self.self_attn:
            entry.select(index)
        for entry in self.cross_attn:
            entry.select(sentences)

    def reorder_beams(self, index: Tensor) -> None:
        """Keep batch rows `index` of the self-attention entries only.

        For beam reordering, where each row of `index` comes from the same sentence as
        the row it replaces: the cross-attention keys/values, the same for every beam of
        a sentence, need no copy.
        """
        for entry in self.self_attn:
            entry.select(index)

    def state(self) -> tuple:
        """A mark to `rewind` to (undoes a decoding step that failed part-way).

        Keeps each self-attention entry's length and storage: a step appends past the
        length in place, or (growing, or a ring given several positions) into new storage,
        and a ring's one-position step overwrites only the slot of a position that the
        step's retry no longer needs.
        """
        marks = tuple((e.length, e.k, e.v) for e in self.self_attn)
        return marks, tuple(e.k is None for e in self.cross_attn)

    def rewind(self, state: tuple) -> None:
        marks, empty = state
        for entry, (length, k, v) in zip(self.self_attn, marks):
            entry.length, entry.k, entry.v = length, k, v
        for entry, was_empty in zip(self.cross_attn, empty):
            if was_empty:
                entry.k = entry.v = None
                entry.length = 0
