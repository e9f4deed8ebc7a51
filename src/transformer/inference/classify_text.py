"""A text classifier (`model.classifier.EncoderClassifier`) as texts in, label probabilities out.

Inputs are built as BERT builds them (Devlin et al., 2019, section 3, Figure 2): a text is
``[CLS] a [SEP]``, a pair ``[CLS] a [SEP] b [SEP]``, segment id 0 up to the first [SEP] and 1 after
it. What is longer than the model takes is cut as BERT's fine-tuning code cuts it: one token at a
time off the end of the longer of the two texts (of the one text), until the whole fits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from transformer.inference.masked import symbols
from transformer.model.classifier import EncoderClassifier
from transformer.text.data import pad
from transformer.text.tokenizer import Tokenizer

Example = tuple[str] | tuple[str, str]  # one text, or a pair
Encoded = tuple[list[int], list[int]]  # token ids, segment ids


def fit_pair(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
    """`a` and `b` cut to at most `budget` tokens together, always off the end of the longer one."""
    n_a, n_b = len(a), len(b)
    while n_a + n_b > budget:
        if n_a >= n_b:
            n_a -= 1
        else:
            n_b -= 1
    return a[:n_a], b[:n_b]


def encode(tokenizer: Tokenizer, examples: list[Example], max_len: int) -> list[Encoded]:
    """(token ids, segment ids) of each example, [CLS] and [SEP]s in place, at most `max_len` long."""
    _, cls, sep = symbols(tokenizer)
    firsts = tokenizer.encode([e[0] for e in examples])
    seconds = tokenizer.encode([e[1] for e in examples if len(e) == 2])
    out, k = [], 0
    for example, a in zip(examples, firsts):
        if len(example) == 1:
            a = a[: max(max_len - 2, 0)]
            out.append(([cls, *a, sep], [0] * (len(a) + 2)))
            continue
        a, b = fit_pair(a, seconds[k], max(max_len - 3, 0))
        k += 1
        out.append(([cls, *a, sep, *b, sep], [0] * (len(a) + 2) + [1] * (len(b) + 1)))
    return out


def collate(seqs: list[Encoded], pad_id: int, segments: bool) -> tuple[Tensor, Tensor | None]:
    """tokens (B, T) right-padded with `pad_id`, and segment ids (B, T) (padding: 0), or None without `segments`."""
    tokens = pad([ids for ids, _ in seqs], pad_id)
    return tokens, pad([s for _, s in seqs], 0) if segments else None


def uses_segments(model: EncoderClassifier) -> bool:
    """Whether the model adds segment embeddings (two or more: A and B), so that a pair's B is told apart."""
    return model.cfg.n_segments >= 2


@torch.no_grad()
def probabilities(model: EncoderClassifier, seqs: list[Encoded], batch_size: int = 64) -> Tensor:
    """The label probabilities (N, n_labels) of N encoded examples (float32, on the CPU); model in eval mode."""
    device, out = next(model.parameters()).device, []
    for i in range(0, len(seqs), batch_size):
        tokens, segments = collate(seqs[i : i + batch_size], model.cfg.pad_id, uses_segments(model))
        logits = model(tokens.to(device), None if segments is None else segments.to(device))
        out.append(logits.float().softmax(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, model.n_labels)
