"""A decoder-only language model as text in, text out: continue a prompt (at once or as a stream of text
pieces), and the perplexity of a text."""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F

from transformer.errors import UserError
from transformer.inference.sampling import stream
from transformer.model.models import DecoderOnly
from transformer.text.pretrained import HubTokenizer
from transformer.text.tokenizer import Tokenizer

NEWLINE = "\n"


def encode_text(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids: our sentencepiece's line by line (newlines are pieces
    anyway), an imported tokenizer's at once (GPT-2's byte-level BPE merges across lines, as "\\n\\n")."""
    if isinstance(tokenizer, HubTokenizer):
        return torch.tensor(tokenizer.encode([text])[0], dtype=torch.long)
    lines = text.split(NEWLINE)
    pieces = tokenizer.encode([line + NEWLINE for line in lines[:-1]] + ([lines[-1]] if lines[-1] else []))
    return torch.tensor([i for ids in pieces for i in ids], dtype=torch.long)


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids; `UserError` for an empty prompt (there is nothing to continue)."""
    ids = tokenizer.encode([prompt])[0] if prompt else []
    if not ids:
        raise UserError("the prompt is empty (give at least one character, e.g. a newline)")
    return ids


def continuation_ids(model: DecoderOnly, ids: list[int], n_tokens: int, temperature: float = 1.0,
                     top_k: int | None = None, top_p: float | None = None, seed: int = 1) -> Iterator[int]:
    """`inference.sampling.stream` with its refusals as `UserError`s."""
    try:
        yield from stream(model, ids, n_tokens, temperature, top_k, top_p, seed)
    except ValueError as e:
        raise UserError(str(e)) from None


def generate_ids(model: DecoderOnly, ids: list[int], n_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 1) -> torch.Tensor:
    """(1, len(ids) + n_tokens): the prompt ids and `n_tokens` sampled after them, sliding past the block."""
    new = list(continuation_ids(model, ids, n_tokens, temperature, top_k, top_p, seed))
    return torch.tensor([list(ids) + new], dtype=torch.long)


def stream_text(model: DecoderOnly, tokenizer: Tokenizer, prompt: str, n_tokens: int, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None, seed: int = 1) -> Iterator[str]:
    """The continuation of `prompt` (without it) as text pieces, each as soon as its tokens are sampled.

    A piece is what the detokenized prompt and continuation gained since the last piece; it waits
    while the text ends in an incomplete UTF-8 character (byte-fallback tokens). The pieces join to
    `continuation(...)` with the same arguments.
    """
    ids = prompt_ids(tokenizer, prompt)
    tokens, shown = list(ids), tokenizer.decode([ids])[0]
    for token in continuation_ids(model, ids, n_tokens, temperature, top_k, top_p, seed):
        tokens.append(token)
        text = tokenizer.decode([tokens])[0]
        if len(text) > len(shown) and text.startswith(shown) and not text.endswith("\ufffd"):
            yield text[len(shown):]
            shown = text
    text = tokenizer.decode([tokens])[0]
    if text != shown and text.startswith(shown):  # a last incomplete character
        yield text[len(shown):]


def continuation(model: DecoderOnly, tokenizer: Tokenizer, prompt: str, n_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 1) -> str:
    """The text that `n_tokens` sampled tokens add to the prompt: the detokenized whole, less the prompt's text."""
    ids = prompt_ids(tokenizer, prompt)
    new = list(continuation_ids(model, ids, n_tokens, temperature, top_k, top_p, seed))
    base, whole = tokenizer.decode([ids, ids + new])
    return whole[len(base):] if whole.startswith(base) else tokenizer.decode([new])[0]


def generate(model: DecoderOnly, tokenizer: Tokenizer, prompt: str, n_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 1) -> str:
    """The prompt and `n_tokens` sampled tokens after it, detokenized together (`transformer lm sample`)."""
    ids = prompt_ids(tokenizer, prompt)
    return tokenizer.decode([ids + list(continuation_ids(model, ids, n_tokens, temperature, top_k, top_p, seed))])[0]


@torch.no_grad()
def perplexity(model: DecoderOnly, tokenizer: Tokenizer, text: str) -> float:
    """exp of the mean negative log-likelihood of the text's tokens after the first (tokenized as in training).

    A text longer than the model's block is read in windows of a block, each scoring the tokens the
    one before did not, with up to half a block of context before them.
    """
    ids = encode_text(tokenizer, text)
    if len(ids) < 2:
        raise UserError(f"the text has {len(ids)} token(s): perplexity needs at least 2")
    device, block = next(model.parameters()).device, model.cfg.max_len
    if block < 2:
        raise UserError(f"the model's block of {block} token(s) predicts nothing")
    total, scored = 0.0, 1  # the first token is never predicted
    while scored < len(ids):
        start = 0 if scored == 1 else scored - block // 2  # half a block of context for a later window
        end = min(len(ids), start + block)
        window = ids[start:end].to(device)[None]  # (1, T)
        logits = model(window[:, :-1]).float()[0]  # (T-1, V): position j predicts token j+1
        nll = F.cross_entropy(logits, window[0, 1:], reduction="none")  # (T-1,)
        total += float(nll[scored - start - 1:].sum())  # the tokens scored..end-1
        scored = end
    return math.exp(total / (len(ids) - 1))
