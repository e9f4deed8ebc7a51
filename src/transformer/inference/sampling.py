"""Sampling from a decoder-only language model with the KV cache: temperature, top-k, nucleus (top-p); a stream of
tokens past the model's block."""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor

from transformer.model.models import DecoderOnly


def pick(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
         generator: torch.Generator | None) -> Tensor:
    """logits (B, V) -> next tokens (B,): greedy at temperature 0 or top_k 1, else sampled with `generator`
    (one uniform number a row, `draw`)."""
    if temperature == 0 or top_k == 1:
        return logits.max(dim=-1).indices  # = argmax (the first maximum), faster on CPU
    probs = distribution(logits, temperature, top_k, top_p)
    return draw(probs, torch.rand(probs.size(0), 1, generator=generator, device=probs.device))


def distribution(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None) -> Tensor:
    """logits (B, V) -> the probabilities (B, V) to sample from: at `temperature` (> 0), among the `top_k` most
    likely, within the nucleus of mass `top_p`."""
    logits = logits.double()  # shifted to a maximum of 0, then divided in float64: no NaN at any T > 0
    logits = ((logits - logits.max(dim=-1, keepdim=True).values) / temperature).float()
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None:  # nucleus: the fewest most likely tokens whose mass reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # the tokens before already reach top_p
        outside[:, 0] = False  # the most likely token always stays, however small top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, -math.inf))
    return logits.softmax(dim=-1)


def draw(probs: Tensor, uniform: Tensor) -> Tensor:
    """Inverse-CDF sampling: probs (B, V), uniform (B, 1) in [0, 1) -> tokens (B,), token i where the cumulative
    mass first passes uniform · total. One number a row, so rows sampled together draw what each draws alone
    (with the same number from its own generator); a token of probability 0 is never drawn. (As fast batched
    as torch.multinomial is for one row.)"""
    cdf = probs.cumsum(dim=-1)  # (B, V)
    return torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).squeeze(1).clamp(max=probs.size(-1) - 1)


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
    Raises ValueError when T + max_new_tokens exceeds the model's max_len. With a window
    (cfg.attn_window = r) the cache keeps only the last r + 1 positions of each layer, so
    its memory does not grow with max_new_tokens.
    """
    if prompt.size(1) + max_new_tokens > model.cfg.max_len:
        raise ValueError(
            f"prompt of {prompt.size(1)} tokens + max_new_tokens={max_new_tokens} "
            f"exceeds the model's max_len={model.cfg.max_len}"
        )
    _check(temperature, top_k, top_p)
    tokens = [prompt]
    ended = torch.zeros(prompt.size(0), dtype=torch.bool, device=prompt.device)  # (B,)
    for new in _steps(model, prompt, max_new_tokens, temperature, top_k, top_p, generator):  # (B, 1)
        if eos_id is not None:
            new = new.masked_fill(ended[:, None], model.cfg.pad_id)
            ended |= new[:, 0] == eos_id
        tokens.append(new)
        if ended.all():
            break
    return torch.cat(tokens, dim=1)


def _check(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """ValueError unless temperature >= 0, top_k >= 1 and 0 < top_p <= 1 (None: not used)."""
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"need temperature >= 0, top_k >= 1, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")


def _steps(model: DecoderOnly, prompt: Tensor, n: int, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator | None) -> Iterator[Tensor]:
    """The next tokens (B, 1) after prompt (B, T), one step at a time, n steps: the prompt through the model in
    one call, then one token a step with the KV cache."""
    cache = model.new_cache()
    new = prompt
    for _ in range(n):
        logits = model(new, cache)[:, -1]  # (B, V)
        new = pick(logits, temperature, top_k, top_p, generator)[:, None]  # (B, 1)
        yield new


@torch.no_grad()
def stream(model: DecoderOnly, ids: list[int], n_tokens: int, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, seed: int = 1) -> Iterator[int]:
    """The ids of `n_tokens` tokens sampled after the prompt `ids`, one at a time, past the model's block.

    While prompt and continuation fit in the block (cfg.max_len), one pass as `sample`; beyond it, the
    last half block of tokens is the context of the next pass (a new cache each pass). The seed
    makes it repeatable. Raises ValueError for settings `sample` refuses or a block of one token.
    """
    block = model.cfg.max_len
    if block < 2 and len(ids) + n_tokens > block:
        raise ValueError(f"the model's block of {block} token(s) leaves no room to continue a prompt")
    _check(temperature, top_k, top_p)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens, remaining = list(ids), n_tokens
    while remaining > 0:
        context = tokens if len(tokens) + remaining <= block else tokens[-min(len(tokens), max(block // 2, 1)):]
        n = min(block - len(context), remaining)
        prompt = torch.tensor([context], dtype=torch.long, device=device)
        for new in _steps(model, prompt, n, temperature, top_k, top_p, generator):
            tokens.append(int(new))
            yield tokens[-1]
        remaining -= n
