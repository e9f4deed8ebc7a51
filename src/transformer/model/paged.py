"""A paged KV cache: the keys and values of many sequences in one pool of fixed-size blocks.

The memory of a language model server that decodes sequences of very different lengths
together, each joining and leaving at any step (continuous batching; Kwon et al., 2023,
"Efficient Memory Management for Large Language Model Serving with PagedAttention").

- `BlockPool` holds, for every layer, keys and values of `n_blocks` blocks of `block_tokens`
  positions, and the list of free blocks. A position p of a sequence lives in slot
  `table[p // block_tokens] · block_tokens + p % block_tokens` of the pool, where `table` is
  the sequence's list of blocks.
- `PagedSequence` is one sequence's block table and length. Blocks are taken as it grows
  (`grow`) and given back when it ends (`release`); with a window r (restricted
  self-attention) the blocks wholly before its last r positions go back as it decodes
  (`forget_before`), so it holds at most about r + 1 positions.
- `PagedBatch` is the cache of one model call over some sequences, T new positions each (a
  prompt: T tokens of one sequence; a decoding step: one token of each of B sequences). It
  gives the model each row's position offset (`length`, (B,)) and, layer by layer, attention
  over each row's own keys and values gathered from the pool (`PagedLayer.attend`: causal,
  within the window).

Attention itself is PyTorch's fused kernel on the gathered keys; the pool is what lets
sequences at different positions share a batch without a cache padded to the longest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


class BlockPool:
    """Keys and values of every layer in `n_blocks` blocks of `block_tokens` positions, and the free blocks."""

    def __init__(self, n_layers: int, n_blocks: int, block_tokens: int, n_heads: int, d_head: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if n_blocks < 1 or block_tokens < 1:
            raise ValueError(f"need n_blocks >= 1 and block_tokens >= 1; got {n_blocks}, {block_tokens}")
        self.n_blocks, self.block_tokens = n_blocks, block_tokens
        shape = (n_layers, n_blocks * block_tokens, n_heads, d_head)  # slot = block · block_tokens + offset
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._free = list(range(n_blocks - 1, -1, -1))  # a stack: block 0 is taken first

    @property
    def free(self) -> int:
        """Blocks not held by any sequence."""
        return len(self._free)

    @property
    def used(self) -> int:
        return self.n_blocks - len(self._free)

    def take(self) -> int:
        if not self._free:
            raise MemoryError("the KV block pool has no free block")
        return self._free.pop()

    def give_back(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


@dataclass(eq=False)
class PagedSequence:
    """One sequence's blocks: `table[i]` holds positions i·block_tokens.. (-1: given back, before the window)."""

    table: list[int] = field(default_factory=list)
    length: int = 0  # positions whose keys/values are in the pool

    def blocks_for(self, positions: int, block_tokens: int) -> int:
        """How many more blocks `positions` more positions need."""
        return max(0, -(-(self.length + positions) // block_tokens) - len(self.table))

    def grow(self, pool: BlockPool, positions: int) -> None:
        """Take the blocks that `positions` more positions need (`MemoryError` when the pool has too few)."""
        need = self.blocks_for(positions, pool.block_tokens)
        if need > pool.free:
            raise MemoryError(f"the KV block pool has {pool.free} free blocks; {need} are needed")
        self.table.extend(pool.take() for _ in range(need))

    def forget_before(self, pool: BlockPool, position: int) -> None:
        """Give back the blocks whose positions all come before `position` (out of a window for good)."""
        for i in range(min(position // pool.block_tokens, len(self.table))):
            if self.table[i] >= 0:
                pool.give_back([self.table[i]])
                self.table[i] = -1

    def release(self, pool: BlockPool) -> None:
        """Give back every block (the sequence ended)."""
        pool.give_back([b for b in self.table if b >= 0])
        self.table = []

    @property
    def blocks(self) -> int:
        """Blocks held now."""
        return sum(b >= 0 for b in self.table)


class PagedLayer:
    """One layer's view of a `PagedBatch`: the cache `MultiHeadAttention` hands its self-attention to."""

    def __init__(self, batch: PagedBatch, layer: int) -> None:
        self.batch, self.layer = batch, layer

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal self-attention of the rows' T new positions: q, k, v (B, H, T, D) -> (B, H, T, D).

        The new keys/values go into the pool first. A decoding step (T = 1) then attends row by row
        to that row's own keys, gathered from its blocks, with no padding and no mask (a lone last
        query sees all of them), so the work follows each row's length, not the longest row's. A
        prompt (T > 1) gathers the padded batch and masks it with `PagedBatch.row_mask`.
        """
        batch, pool = self.batch, self.batch.pool
        b, h, t, d = k.shape
        keys, values = pool.k[self.layer], pool.v[self.layer]  # (slots, H, D)
        new = batch.write_slots.view(-1)  # (B·T,)
        keys.index_copy_(0, new, k.transpose(1, 2).reshape(b * t, h, d).to(keys.dtype))
        values.index_copy_(0, new, v.transpose(1, 2).reshape(b * t, h, d).to(values.dtype))
        if t == 1:
            rows = []
            for row, n in enumerate(batch.widths):
                slots = batch.read_slots[row, :n]  # (n,) the row's keys lo..end-1
                k_row = keys.index_select(0, slots).transpose(0, 1)[None]  # (1, H, n, D)
                v_row = values.index_select(0, slots).transpose(0, 1)[None]
                if k_row.dtype != q.dtype:  # a pool kept in another precision than the model computes in
                    k_row, v_row = k_row.to(q.dtype), v_row.to(q.dtype)
                rows.append(F.scaled_dot_product_attention(q[row:row + 1], k_row, v_row))
            return torch.cat(rows)  # (B, H, 1, D)
        read = batch.read_slots.view(-1)  # (B·W,)
        w = batch.read_slots.size(1)
        k_all = keys.index_select(0, read).view(b, w, h, d).transpose(1, 2).to(q.dtype)  # (B, H, W, D)
        v_all = values.index_select(0, read).view(b, w, h, d).transpose(1, 2).to(q.dtype)
        return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=batch.row_mask)  # no row lacks a key


class PagedBatch:
    """The cache of one model call over `sequences`, each continuing with T new positions (see the module).

    Each sequence must already hold the blocks of its T new positions (`PagedSequence.grow`); after
    the call, `advance` counts them. `window` is the model's causal radius r (cfg.attn_window) or None.
    """

    def __init__(self, pool: BlockPool, sequences: list[PagedSequence], t: int, n_layers: int,
                 window: int | None = None) -> None:
        device = pool.k.device
        self.pool, self.sequences, self.t = pool, sequences, t
        bt = pool.block_tokens
        self.length = torch.tensor([s.length for s in sequences], device=device)  # (B,) each row's offset
        width = max(len(s.table) for s in sequences)
        table = torch.tensor([s.table + [0] * (width - len(s.table)) for s in sequences], device=device)  # (B, n)
        new = self.length[:, None] + torch.arange(t, device=device)  # (B, T) positions of the new tokens
        self.write_slots = table.gather(1, new // bt) * bt + new % bt  # (B, T)
        # the keys a row's queries may see: positions lo .. end - 1, all of them without a window
        end = self.length + t  # (B,)
        lo = (self.length - window).clamp(min=0) if window is not None else torch.zeros_like(end)
        keys = lo[:, None] + torch.arange(int((end - lo).max()), device=device)  # (B, W) key positions
        real = keys < end[:, None]
        self.widths = (end - lo).tolist()  # each row's number of keys
        blocks = table.gather(1, (keys // bt).clamp(max=width - 1)).clamp(min=0)  # stale or given back: slot 0..
        self.read_slots = torch.where(real, blocks * bt + keys % bt, 0)  # (B, W)
        self.row_mask = None  # a decoding step needs none (`PagedLayer.attend`)
        if t > 1:  # which keys each new position may see: the row's real keys, causal, within the window
            may = real[:, None, :] & (keys[:, None, :] <= new[:, :, None])  # (B, T, W)
            if window is not None:
                may &= new[:, :, None] - keys[:, None, :] <= window
            self.row_mask = may[:, None]  # (B, 1, T, W)
        self.self_attn = [PagedLayer(self, i) for i in range(n_layers)]
        self.cross_attn = [None] * n_layers  # a decoder-only model attends to no memory

    def advance(self) -> None:
        """Count the T positions just written in every sequence."""
        for s in self.sequences:
            s.length += self.t
