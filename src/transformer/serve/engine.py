"""The engines a server decodes with: a small interface, and our PyTorch translation model behind it.

An engine translates a batch of sentences (`translate_batch`, the method CTranslate2's
translator has too) and counts the source tokens of sentences (`lengths`), which the
batcher groups by and the server checks against the model's limit. The batcher calls an
engine from one thread only (the model worker), so an engine needs no locking.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from torch import nn

from transformer.inference.ctranslate2 import CTranslate2Translator
from transformer.inference.search import SearchConfig
from transformer.inference.translate import translate_lines
from transformer.report.attention_maps import attention_maps
from transformer.text.tokenizer import Tokenizer


@dataclass(frozen=True)
class Heatmap:
    """Cross-attention of one sentence and its translation: `weights` (target pieces × source pieces)."""

    translation: str
    source: list[str]  # source pieces, then </s>
    target: list[str]  # target pieces, then </s>
    weights: list[list[float]]  # (T, S): the last decoder layer's encoder-decoder attention, mean of the heads
    layer: int


class Engine(Protocol):
    """What the server needs of a model."""

    name: str  # shown in every answer ("model")
    kind: str  # "torch" or "ctranslate2"
    max_source_tokens: int  # the longest source the model takes, in tokens (EOS excluded)
    has_heatmap: bool  # whether `heatmap` gives one

    def translate_batch(self, lines: list[str], beam: int, alpha: float) -> list[str]:
        """Translations of `lines`, in their order."""

    def lengths(self, lines: list[str]) -> list[int]:
        """The number of source tokens of each line."""

    def heatmap(self, line: str, beam: int, alpha: float) -> Heatmap | None:
        """Cross-attention of `line` and its translation; None where the engine cannot show it."""


def source_lengths(tokenizer: Tokenizer, lines: list[str]) -> list[int]:
    """The number of tokens of each line as a source (stripped, as `translate_lines` does)."""
    return [len(ids) for ids in tokenizer.encode([line.strip() for line in lines])]


class TorchEngine:
    """Our PyTorch translation model (`EncoderDecoder`): batched beam or greedy search with the KV cache.

    `decoder` is the model the searches run (a `DecodingModel` with int8 weights, bf16 or
    torch.compile; default `model` itself); the attention heatmap reads `model`. `search`
    gives everything of the search but beam and alpha, which come with each call.
    """

    kind = "torch"
    has_heatmap = True

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, search: SearchConfig, name: str,
                 decoder: nn.Module | None = None) -> None:
        self.model, self.tokenizer, self.search, self.name = model.eval(), tokenizer, search, name
        self.decoder = model if decoder is None else decoder
        self.max_source_tokens = model.cfg.max_len - 1  # room for EOS

    def translate_batch(self, lines: list[str], beam: int, alpha: float) -> list[str]:
        search = replace(self.search, beam=beam, alpha=alpha)
        return translate_lines(self.decoder, self.tokenizer, lines, search, batch_size=max(1, len(lines)))

    def lengths(self, lines: list[str]) -> list[int]:
        return source_lengths(self.tokenizer, lines)

    def heatmap(self, line: str, beam: int, alpha: float) -> Heatmap:
        maps = attention_maps(self.model, self.tokenizer, line, search=replace(self.search, beam=beam, alpha=alpha))
        last = maps.weights["cross"][-1].mean(dim=0)  # (H, T, S) -> (T, S)
        return Heatmap(translation=maps.translation, source=maps.src, target=maps.tgt_out,
                       weights=[[round(float(w), 4) for w in row] for row in last],
                       layer=len(maps.weights["cross"]))


class CTranslate2Engine:
    """An exported CTranslate2 model (`transformer export --to ctranslate2`); it shows no attention."""

    kind = "ctranslate2"
    has_heatmap = False

    def __init__(self, translator: CTranslate2Translator, search: SearchConfig, name: str) -> None:
        self.translator, self.search, self.name = translator, search, name
        self.max_source_tokens = translator.cfg.max_len - 1  # room for EOS

    def translate_batch(self, lines: list[str], beam: int, alpha: float) -> list[str]:
        return self.translator.translate(lines, replace(self.search, beam=beam, alpha=alpha))

    def lengths(self, lines: list[str]) -> list[int]:
        return source_lengths(self.translator.tokenizer, lines)

    def heatmap(self, line: str, beam: int, alpha: float) -> None:
        return None
