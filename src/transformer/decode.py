"""Search for translation (greedy, beam) and sampling from language models.

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

The searches rely only on the small `Seq2Seq` interface below, which `EncoderDecoder`
has. Put the model in eval mode first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ModelConfig
from .models import DecoderOnly
from .tokenizer import Tokenizer

BOS, EOS = Tokenizer.BOS, Tokenizer.EOS


@dataclass(frozen=True)
class SearchConfig:
    beam: int = 4  # 1 = greedy
    alpha: float = 0.6  # length penalty exponent
    max_len_a: float = 1.0  # max output length = a·|source| + b
    max_len_b: int = 50
    n_best: int = 1  # hypotheses returned per sentence by beam_search

    def __post_init__(self) -> None:
        if self.beam < 1 or not 1 <= self.n_best <= self.beam:
            raise ValueError(
                f"need beam >= 1 and 1 <= n_best <= beam; got beam={self.beam}, n_best={self.n_best}"
            )


@dataclass(frozen=True)
class Hypothesis:
    tokens: list[int]  # without BOS and EOS
    score: float  # log_prob / lp(n), the ranking key
    log_prob: float  # log P(tokens + EOS | source), or of tokens alone when cut at max length


class Cache(Protocol):
    def select(self, index: Tensor) -> None:
        """Keep batch rows `index` (B',), in that order."""


class Seq2Seq(Protocol):
    """What the searches use of a model (`EncoderDecoder` has it)."""

    cfg: ModelConfig  # only pad_id and max_len are read

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src (B, S) -> memory (B, S, d), memory_mask (B, 1, 1, S)."""

    def decode(self, tgt: Tensor, memory: Tensor, memory_mask: Tensor, cache: Cache) -> Tensor:
        """tgt (B, T) continuing `cache` -> (B, T, d)."""

    def project(self, h: Tensor) -> Tensor:
        """(B, T, d) -> logits (B, T, V)."""

    def new_cache(self) -> Cache: ...


def length_penalty(n: int, alpha: float) -> float:
    """GNMT's lp(n) = ((5 + n) / 6)^alpha for a hypothesis of n generated tokens."""
    return ((5 + n) / 6) ** alpha


def max_lengths(model: Seq2Seq, src: Tensor, cfg: SearchConfig) -> Tensor:
    """(B,) the most tokens (EOS included) each sentence of src (B, S) may generate."""
    n = (src != model.cfg.pad_id).sum(dim=1)  # (B,) real tokens, source EOS included
    return (cfg.max_len_a * n + cfg.max_len_b).floor().long().clamp(1, model.cfg.max_len)


def _strip_eos(tokens: list[int]) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] == EOS else tokens


@torch.no_grad()
def greedy_search(model: Seq2Seq, src: Tensor, cfg: SearchConfig) -> list[list[int]]:
    """src (B, S) right-padded source ids -> B translations (token ids without BOS/EOS)."""
    memory, memory_mask = model.encode(src)  # (B, S, d), (B, 1, 1, S)
    limits = max_lengths(model, src, cfg)  # (B,)
    ids = torch.arange(src.size(0), device=src.device)  # the sentence of each live row
    tokens = src.new_full((src.size(0), 1), BOS)  # (B, 1 + t)
    cache = model.new_cache()
    out: list[list[int]] = [[] for _ in range(src.size(0))]
    while len(ids):
        logits = model.project(model.decode(tokens[:, -1:], memory, memory_mask, cache))  # (B, 1, V)
        tokens = torch.cat([tokens, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
        done = (tokens[:, -1] == EOS) | (limits == tokens.size(1) - 1)  # (B,)
        if done.any():
            for i, seq in zip(ids[done].tolist(), tokens[done, 1:].tolist()):
                out[i] = _strip_eos(seq)
            keep = (~done).nonzero().squeeze(1)  # (B',)
            cache.select(keep)
            memory, memory_mask, tokens, limits, ids = (
                x[keep] for x in (memory, memory_mask, tokens, limits, ids)
            )
    return out


@torch.no_grad()
def beam_search(model: Seq2Seq, src: Tensor, cfg: SearchConfig) -> list[list[Hypothesis]]:
    """src (B, S) right-padded source ids -> per sentence its `cfg.n_best` hypotheses, best first.

    K = cfg.beam beams per sentence are the B·K rows of the decoder batch (sentence-major).
    """
    k, b, device = cfg.beam, src.size(0), src.device
    memory, memory_mask = model.encode(src)
    memory = memory.repeat_interleave(k, dim=0)  # (B·K, S, d)
    memory_mask = memory_mask.repeat_interleave(k, dim=0)  # (B·K, 1, 1, S)
    limits = max_lengths(model, src, cfg)  # (B,)
    ids = torch.arange(b, device=device)  # the sentence of each live sentence slot
    scores = torch.full((b, k), -math.inf, device=device)  # (B, K) log-probs of the live beams
    scores[:, 0] = 0.0  # at first only beam 0 is live, so the first K extensions are distinct
    n_finished = torch.zeros(b, dtype=torch.long, device=device)  # (B,)
    tokens = src.new_full((b * k, 1), BOS)  # (B·K, 1 + t)
    rank = torch.arange(2 * k, device=device)  # (2K,)
    beam_offsets = torch.arange(k, device=device)  # (K,)
    cache = model.new_cache()
    finished: list[list[Hypothesis]] = [[] for _ in range(b)]

    def finish(sentence: int, seq: list[int], log_prob: float, n: int) -> None:
        score = log_prob / length_penalty(n, cfg.alpha)
        finished[sentence].append(Hypothesis(seq, score, log_prob))

    step = 0
    while len(ids):
        step, n = step + 1, len(ids)
        logits = model.project(model.decode(tokens[:, -1:], memory, memory_mask, cache))[:, -1]  # (N·K, V)
        vocab = logits.size(-1)
        candidates = scores.view(-1, 1) + F.log_softmax(logits.float(), dim=-1)  # (N·K, V)
        top, index = candidates.view(n, k * vocab).topk(2 * k, dim=1)  # (N, 2K)
        rows = index // vocab + (torch.arange(n, device=device) * k)[:, None]  # (N, 2K) beam row extended
        words = index % vocab  # (N, 2K)
        is_eos = words == EOS
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
        cache.select(go_on_rows[keep_rows])  # reorder the beams and drop finished sentences at once
        tokens = new_tokens[keep_rows]
        if len(keep) < n:
            memory, memory_mask = memory[keep_rows], memory_mask[keep_rows]
            scores, limits, n_finished, ids = scores[keep], limits[keep], n_finished[keep], ids[keep]
    return [sorted(hyps, key=lambda h: h.score, reverse=True)[: cfg.n_best] for hyps in finished]


def translate_batch(model: Seq2Seq, src: Tensor, cfg: SearchConfig) -> list[list[int]]:
    """src (B, S) -> B translations (without BOS/EOS): greedy when cfg.beam == 1, else beam's best."""
    if cfg.beam == 1:
        return greedy_search(model, src, cfg)
    return [hyps[0].tokens for hyps in beam_search(model, src, cfg)]


def _pick(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
          generator: torch.Generator | None) -> Tensor:
    """logits (B, V) -> next tokens (B,)."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None:  # nucleus: the fewest most likely tokens whose mass reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # the tokens before already reach top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, -math.inf))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


@torch.no_grad()
def sample(
    model: DecoderOnly,
    prompt: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
) -> Tensor:
    """Continue prompt (B, T) (rows of equal length) -> (B, T + n), n <= max_new_tokens.

    Temperature 0 or top_k 1 is greedy (argmax). The prompt goes through the model in
    one call, then one token per step, with the KV cache. With `eos_id`, a row is
    padded with cfg.pad_id after its EOS and sampling stops when every row has one.
    Raises ValueError when T + max_new_tokens exceeds the model's max_len.
    """
    if prompt.size(1) + max_new_tokens > model.cfg.max_len:
        raise ValueError(
            f"prompt of {prompt.size(1)} tokens + max_new_tokens={max_new_tokens} "
            f"exceeds the model's max_len={model.cfg.max_len}"
        )
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(
            f"need temperature >= 0, top_k >= 1, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}"
        )
    cache = model.new_cache()
    tokens, new = prompt, prompt
    ended = torch.zeros(prompt.size(0), dtype=torch.bool, device=prompt.device)  # (B,)
    for _ in range(max_new_tokens):
        logits = model(new, cache)[:, -1]  # (B, V)
        new = _pick(logits, temperature, top_k, top_p, generator)[:, None]  # (B, 1)
        if eos_id is not None:
            new = new.masked_fill(ended[:, None], model.cfg.pad_id)
            ended |= new[:, 0] == eos_id
        tokens = torch.cat([tokens, new], dim=1)
        if ended.all():
            break
    return tokens
