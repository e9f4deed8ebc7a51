"""Search for translation: greedy and beam search, batched, with the KV cache.

Greedy and beam search decode a whole batch of sentences together and use the model's
KV cache: the source is encoded once, then each step feeds one token per row (the
cross-attention keys/values are computed on the first step, the self-attention ones
appended). A sentence that is finished is dropped from the batch (the cache, the
memory and every per-row tensor shrink), so it costs nothing further.

Choices the paper leaves open (it gives beam 4, alpha 0.6, max length input + 50):

- Max output length of a sentence: L = floor(a·|source| + b), clamped to
  [1, cfg.max_len], where |source| counts the non-padding tokens of `src`, the EOS that
  `data.collate_source` appends included. L counts generated tokens, EOS included, so a
  translation has at most L tokens (at most L - 1 when it ends with EOS).
- Length penalty lp(n) = ((5 + n) / 6)^alpha (GNMT, Wu et al. 2016), where n counts the
  generated tokens, EOS included. A hypothesis is ranked by log P(Y) / lp(n).
- Beam search: each step takes the top 2K of the K·V extensions of a sentence's K beams.
  Those among the top K that end with EOS become finished hypotheses; the best K that do
  not end with EOS go on (a beam has one EOS extension, so there are always K). A sentence
  stops once it has K finished hypotheses (all of them are kept, even if a step takes it
  past K), or at step L, where its K live beams are finished as they are, without EOS.
  The `n_best` best by score are returned.
- `min_len` forbids EOS until a sentence has that many tokens (the EOS log-probability is
  set to -inf), as Hugging Face's `min_new_tokens` and CTranslate2's `min_decoding_length`;
  the maximum length still wins.
- The pad token is never generated (its logit, or in beam search its log-probability after the
  softmax, is set to -inf), as OPUS-MT's `bad_words_ids` [[pad]] in Hugging Face's generation:
  an imported Marian model starts decoding from its pad token (our BOS there), which it is not
  trained to produce. A model whose pad is its EOS (a GPT-2 captioner) keeps its EOS.

The searches rely only on the small `Seq2Seq` interface below, which `EncoderDecoder`
has (and the captioners of `model/captioner.py`, whose source is a batch of images
(B, C, H, W): with `max_len_a` 0 the maximum length is `max_len_b` whatever the source).
Put the model in eval mode first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from transformer.config import ModelConfig


@dataclass(frozen=True)
class SearchConfig:
    beam: int = 4  # 1 = greedy
    alpha: float = 0.6  # length penalty exponent
    max_len_a: float = 1.0  # max output length = a·|source| + b
    max_len_b: int = 50
    n_best: int = 1  # hypotheses returned per sentence by beam_search
    min_len: int = 0  # no EOS before this many tokens

    def __post_init__(self) -> None:
        if self.beam < 1 or not 1 <= self.n_best <= self.beam:
            raise ValueError(
                f"need beam >= 1 and 1 <= n_best <= beam; got beam={self.beam}, n_best={self.n_best}"
            )
        if self.min_len < 0:
            raise ValueError(f"need min_len >= 0; got {self.min_len}")


@dataclass(frozen=True)
class Hypothesis:
    tokens: list[int]  # without BOS and EOS
    score: float  # log_prob / lp(n), the ranking key
    log_prob: float  # log P(tokens + EOS | source), or of tokens alone when cut at max length


class Cache(Protocol):
    def select(self, index: Tensor) -> None:
        """Keep batch rows `index` (B',), in that order."""

    # Optional: reorder_beams(index), a `select` where every row of `index` is a beam of
    # the sentence it replaces (KVCache then leaves the cross-attention entries alone).


class Seq2Seq(Protocol):
    """What the searches use of a model (`EncoderDecoder` has it)."""

    cfg: ModelConfig  # only pad_id, bos_id, eos_id and max_len are read

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src (B, S) -> memory (B, S, d), memory_mask (B, 1, 1, S)."""

    def decode(self, tgt: Tensor, memory: Tensor, memory_mask: Tensor | None, cache: Cache) -> Tensor:
        """tgt (B, T) continuing `cache` -> (B, T, d); memory_mask None when nothing is padded."""

    def project(self, h: Tensor) -> Tensor:
        """(B, T, d) -> logits (B, T, V)."""

    def new_cache(self) -> Cache: ...

    # Optional: beams_share_memory, a constant of the model (whatever its train/eval mode), True
    # when `decode` takes memory (B, S, d) and its mask with tgt (B·K, 1), the K beams of each
    # sentence attending to its one memory row, and the cache has select_beams(index, sentences).
    # Beam search then keeps the memory once per sentence; without it, one row per beam.


def length_penalty(n: int, alpha: float) -> float:
    """GNMT's lp(n) = ((5 + n) / 6)^alpha for a hypothesis of n generated tokens."""
    return ((5 + n) / 6) ** alpha


def max_lengths(model: Seq2Seq, src: Tensor, cfg: SearchConfig) -> Tensor:
    """(B,) the most tokens (EOS included) each sentence of src (B, S) may generate."""
    n = (src != model.cfg.pad_id).flatten(1).sum(dim=1)  # (B,) real tokens, source EOS included
    return (cfg.max_len_a * n + cfg.max_len_b).floor().long().clamp(1, model.cfg.max_len)


def _masking(memory_mask: Tensor) -> Tensor | None:
    """The memory mask (B, 1, 1, S), or None when it masks nothing (no padding): attention then skips it."""
    return None if bool(memory_mask.all()) else memory_mask


def _rows(x: Tensor | None, index: Tensor) -> Tensor | None:
    """x[index], or None for None (a memory mask that masks nothing)."""
    return None if x is None else x[index]


def _beam_memory(model: Seq2Seq, src: Tensor, k: int) -> tuple[Tensor, Tensor | None, bool]:
    """The memory of src (B, S) for K beams a sentence, its mask (None when nothing is padded), and whether
    it has one row per sentence (`beams_share_memory`: (B, S, d)) rather than one per beam ((B·K, S, d))."""
    memory, memory_mask = model.encode(src)  # (B, S, d), (B, 1, 1, S)
    memory_mask = _masking(memory_mask)
    if getattr(model, "beams_share_memory", False):
        return memory, memory_mask, True
    beam_of_row = torch.arange(src.size(0), device=src.device).repeat_interleave(k)  # (B·K,)
    return memory[beam_of_row], _rows(memory_mask, beam_of_row), False


def _strip_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] == eos else tokens


def _forbid(scores: Tensor, step: int, min_len: int, eos: int, pad: int) -> None:
    """In place, scores (N, V) of the token at `step` (1-based): -inf for EOS while `step` <= `min_len`, and
    for the pad token always (unless it is also the EOS)."""
    if step <= min_len:
        scores[:, eos] = -math.inf
    if pad != eos:
        scores[:, pad] = -math.inf


@torch.no_grad()
def greedy_search(model: Seq2Seq, src: Tensor, cfg: SearchConfig) -> list[list[int]]:
    """src (B, S) right-padded source ids -> B translations (token ids without BOS/EOS)."""
    bos, eos, pad = model.cfg.bos_id, model.cfg.eos_id, model.cfg.pad_id
    memory, memory_mask = model.encode(src)  # (B, S, d), (B, 1, 1, S)
    memory_mask = _masking(memory_mask)
    limits = max_lengths(model, src, cfg)  # (B,)
    longest = int(limits.max())
    ids = torch.arange(src.size(0), device=src.device)  # the sentence of each live row
    tokens = torch.full((src.size(0), longest + 1), bos, device=src.device)  # (B, 1 + L): BOS, then the output
    cache = model.new_cache()
    _reserve(cache, longest)
    out: list[list[int]] = [[] for _ in range(src.size(0))]
    for t in range(1, longest + 1):
        logits = model.project(model.decode(tokens[:, t - 1 : t], memory, memory_mask, cache))[:, -1]  # (B, V)
        _forbid(logits, t, cfg.min_len, eos, pad)
        word = logits.max(dim=-1).indices  # (B,) the first maximum, as argmax, but 3-4x faster on CPU
        tokens[:, t] = word
        done = (word == eos) | (limits == t)  # (B,)
        if done.any():
            for i, seq in zip(ids[done].tolist(), tokens[done, 1 : t + 1].tolist()):
                out[i] = _strip_eos(seq, eos)
            keep = (~done).nonzero().squeeze(1)  # (B',)
            if not len(keep):
                break
            cache.select(keep)
            memory, memory_mask = memory[keep], _rows(memory_mask, keep)
            tokens, limits, ids = tokens[keep], limits[keep], ids[keep]
    return out


def _reserve(cache: Cache, positions: int) -> None:
    """Preallocate the self-attention cache when the cache can (KVCache.reserve)."""
    reserve = getattr(cache, "reserve", None)
    if reserve is not None:
        reserve(positions)


@torch.no_grad()
def beam_search(model: Seq2Seq, src: Tensor, cfg: SearchConfig) -> list[list[Hypothesis]]:
    """src (B, S) right-padded source ids -> per sentence its `cfg.n_best` hypotheses, best first.

    K = cfg.beam beams per sentence are the B·K rows of the decoder batch (sentence-major).
    The memory has one row per sentence when the model allows (`beams_share_memory`), else
    one per beam.
    """
    k, b, device = cfg.beam, src.size(0), src.device
    bos, eos, pad = model.cfg.bos_id, model.cfg.eos_id, model.cfg.pad_id
    memory, memory_mask, shared = _beam_memory(model, src, k)  # (B or B·K, S, d)
    limits = max_lengths(model, src, cfg)  # (B,)
    ids = torch.arange(b, device=device)  # the sentence of each live sentence slot
    scores = torch.full((b, k), -math.inf, device=device)  # (B, K) log-probs of the live beams
    scores[:, 0] = 0.0  # at first only beam 0 is live, so the first K extensions are distinct
    n_finished = torch.zeros(b, dtype=torch.long, device=device)  # (B,)
    tokens = torch.full((b * k, 1), bos, device=device)  # (B·K, 1 + t)
    rank = torch.arange(2 * k, device=device)  # (2K,)
    beam_offsets = torch.arange(k, device=device)  # (K,)
    cache = model.new_cache()
    _reserve(cache, int(limits.max()))
    finished: list[list[Hypothesis]] = [[] for _ in range(b)]

    def finish(sentence: int, seq: list[int], log_prob: float, n: int) -> None:
        score = log_prob / length_penalty(n, cfg.alpha)
        finished[sentence].append(Hypothesis(seq, score, log_prob))

    step = 0
    while len(ids):
        step, n = step + 1, len(ids)
        logits = model.project(model.decode(tokens[:, -1:], memory, memory_mask, cache))[:, -1]  # (N·K, V)
        vocab = logits.size(-1)
        log_probs = F.log_softmax(logits.float(), dim=-1)  # (N·K, V)
        _forbid(log_probs, step, cfg.min_len, eos, pad)
        candidates = scores.view(-1, 1) + log_probs  # (N·K, V)
        top, index = candidates.view(n, k * vocab).topk(2 * k, dim=1)  # (N, 2K)
        rows = index // vocab + (torch.arange(n, device=device) * k)[:, None]  # (N, 2K) beam row extended
        words = index % vocab  # (N, 2K)
        is_eos = words == eos
        ended = is_eos & (rank < k)  # (N, 2K) new finished hypotheses
        go_on = is_eos.int().argsort(dim=1, stable=True)[:, :k]  # (N, K) the best K not ending with EOS
        scores = top.gather(1, go_on)  # (N, K)
        go_on_rows = rows.gather(1, go_on).view(-1)  # (N·K,)
        new_tokens = torch.cat([tokens[go_on_rows], words.gather(1, go_on).view(-1, 1)], dim=1)
        n_finished += ended.sum(dim=1)
        at_limit = limits == step  # (N,)
        done = at_limit | (n_finished >= k)  # (N,)

        for s, j in ended.nonzero().tolist():
            finish(ids[s].item(), tokens[rows[s, j], 1:].tolist(), top[s, j].item(), step)
        for s in at_limit.nonzero().flatten().tolist():
            for r in range(k):
                finish(ids[s].item(), new_tokens[s * k + r, 1:].tolist(), scores[s, r].item(), step)

        keep = (~done).nonzero().squeeze(1)  # (N',) live sentences
        keep_rows = (keep[:, None] * k + beam_offsets).view(-1)  # (N'·K,)
        tokens = new_tokens[keep_rows]
        if len(keep) == n:  # reorder the beams: the cross-attention cache is the same for all beams
            getattr(cache, "reorder_beams", cache.select)(go_on_rows)
        else:  # reorder the beams and drop finished sentences at once
            if shared:  # the memory and the cross-attention entries hold one row per sentence
                cache.select_beams(go_on_rows[keep_rows], keep)
            else:
                cache.select(go_on_rows[keep_rows])
            memory_rows = keep if shared else keep_rows
            memory, memory_mask = memory[memory_rows], _rows(memory_mask, memory_rows)
            scores, limits, n_finished, ids = scores[keep], limits[keep], n_finished[keep], ids[keep]
    return [sorted(hyps, key=lambda h: h.score, reverse=True)[: cfg.n_best] for hyps in finished]


def translate_batch(model: Seq2Seq, src: Tensor, cfg: SearchConfig) -> list[list[int]]:
    """src (B, S) -> B translations (without BOS/EOS): greedy when cfg.beam == 1, else beam's best."""
    if cfg.beam == 1:
        return greedy_search(model, src, cfg)
    return [hyps[0].tokens for hyps in beam_search(model, src, cfg)]
