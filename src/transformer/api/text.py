"""The text models from Python: `Translator`, `LanguageModel`, `MaskedLM`, `TextClassifier` (made by
`transformer.load`)."""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from transformer.config import ModelConfig
from transformer.errors import UserError
from transformer.inference import lm, masked
from transformer.inference.classify_text import encode, probabilities
from transformer.inference.ctranslate2 import CTranslate2Translator
from transformer.inference.search import SearchConfig, beam_search
from transformer.inference.translate import score_pairs, translate_lines
from transformer.report.attention_maps import AttentionMaps, attention_maps
from transformer.tasks.classify import evaluate, examples_of
from transformer.text.data import collate_source
from transformer.text.tokenizer import Tokenizer


def texts_of(texts: str | Sequence[str], name: str = "texts") -> list[str]:
    """`texts` as a list of str: a str alone, or a non-empty list or tuple of str; else `UserError`."""
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)):
        raise UserError(f"`{name}`: give a str or a list of str, not {type(texts).__name__}")
    if not texts:
        raise UserError(f"`{name}`: the list is empty")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise UserError(f"`{name}`[{i}]: not a str ({type(text).__name__})")
    return list(texts)


def search_config(beam: int, alpha: float, max_len_a: float, max_len_b: int, min_len: int) -> SearchConfig:
    try:
        return SearchConfig(beam=beam, alpha=alpha, max_len_a=max_len_a, max_len_b=max_len_b, min_len=min_len)
    except ValueError as e:
        raise UserError(str(e)) from None


class Translator:
    """A translation model: ours in PyTorch, or an exported CTranslate2 folder (`engine` "ctranslate2").

    Made by `transformer.load`. `config` is its `ModelConfig`, `tokenizer` its sentencepiece
    `Tokenizer`, `model` the `nn.Module` (for CTranslate2, the `ctranslate2.Translator`), `engine`
    "torch" or "ctranslate2", `backend` the line saying which int8 matrix product CTranslate2 runs
    (None when it runs none on the CPU). Search settings as in the paper: beam 4, length penalty
    alpha 0.6, at most max_len_a·|source| + max_len_b tokens.
    """

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer, model: nn.Module | None = None,
                 decoder: nn.Module | None = None, ctranslate2: CTranslate2Translator | None = None) -> None:
        self.config, self.tokenizer = config, tokenizer
        self._torch, self._decoder, self._ct2 = model, decoder or model, ctranslate2
        self.model = ctranslate2.translator if ctranslate2 is not None else model
        self.engine = "ctranslate2" if ctranslate2 is not None else "torch"
        self.backend = ctranslate2.backend if ctranslate2 is not None else None

    def translate(self, texts: str | Sequence[str], beam: int = 4, alpha: float = 0.6, max_len_a: float = 1.0,
                  max_len_b: int = 50, min_len: int = 0, batch_size: int = 64, progress: bool = False,
                  source_name: str = "texts") -> str | list[str]:
        """The translation of a str, or the translations of a list of str (in its order). beam 1 is greedy.

        An empty or whitespace-only text translates to "" without decoding. `UserError` for a text too long
        for the model (``texts:3: ...``: `source_name` and the text's number, from 1) or bad settings.
        `progress`: a progress bar on stderr (our engine).
        """
        lines = texts_of(texts)
        search = search_config(beam, alpha, max_len_a, max_len_b, min_len)
        if self._ct2 is not None:
            out = self._ct2.translate(lines, search, batch_size, source_name=source_name)
        else:
            out = translate_lines(self._decoder, self.tokenizer, lines, search, batch_size, progress, source_name)
        return out[0] if isinstance(texts, str) else out

    def translate_iter(self, texts: Iterable[str], batch_size: int = 64, **search) -> Iterator[str]:
        """Translations of an iterable of str (a file's lines, a generator), one at a time in its order, read
        and translated `batch_size` at a time, so that a large input never sits in memory whole. `search`:
        the keywords of `translate` (beam, alpha, max_len_a, max_len_b, min_len)."""
        batch: list[str] = []
        for text in texts:
            batch.append(text)
            if len(batch) == batch_size:
                yield from self.translate(batch, batch_size=batch_size, **search)
                batch = []
        if batch:
            yield from self.translate(batch, batch_size=batch_size, **search)

    def score(self, sources: Sequence[str], targets: Sequence[str], batch_size: int = 64) -> list[float]:
        """log P(target | source) of each pair: the total natural-log probability of the target's tokens and
        its end of sentence, teacher-forced."""
        sources, targets = texts_of(sources, "sources"), texts_of(targets, "targets")
        if len(sources) != len(targets):
            raise UserError(f"`sources` has {len(sources)} texts, `targets` {len(targets)}")
        if self._ct2 is not None:
            return self._ct2.score(sources, targets, batch_size)
        return score_pairs(self._torch, self.tokenizer, sources, targets, batch_size)

    def n_best(self, text: str, n: int = 4, alpha: float = 0.6, max_len_a: float = 1.0,
               max_len_b: int = 50) -> list[tuple[str, float]]:
        """The `n` best translations of `text` by beam search of beam `n`, best first, each with its
        log-probability (natural log, end of sentence included); ranked by the length penalty `alpha`.
        An empty or whitespace-only text has the one translation `translate` gives it, without decoding:
        ``[("", 0.0)]``."""
        self._torch_only("n_best")
        search = replace(search_config(n, alpha, max_len_a, max_len_b, 0), n_best=n)
        ids = self.tokenizer.encode([texts_of(text, "text")[0].strip()])
        if not ids[0]:
            return [("", 0.0)]
        src = collate_source(ids, self.config.pad_id, self.config.eos_id).to(next(self._torch.parameters()).device)
        hyps = beam_search(self._decoder, src, search)[0]
        return [(self.tokenizer.decode([h.tokens])[0], h.log_prob) for h in hyps[:n]]

    def attention(self, sentence: str, target: str | None = None, beam: int = 4, alpha: float = 0.6) -> AttentionMaps:
        """Every layer's and head's attention weights for `sentence` and `target` (default: its translation),
        as tensors (`AttentionMaps.weights`: "encoder", "decoder", "cross", one (H, queries, keys) a layer)."""
        self._torch_only("attention")
        return attention_maps(self._torch, self.tokenizer, texts_of(sentence, "sentence")[0], target,
                              replace(SearchConfig(), beam=beam, alpha=alpha))

    def _torch_only(self, what: str) -> None:
        if self._ct2 is not None:
            raise UserError(f"`{what}` needs our PyTorch model; a CTranslate2 export shows no scores of its "
                            "beam or attention weights (load the model directory it was exported from)")


class LanguageModel:
    """A decoder-only (GPT-style) language model. Made by `transformer.load`; `config`, `tokenizer`, `model`."""

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer, model: nn.Module) -> None:
        self.config, self.tokenizer, self.model = config, tokenizer, model

    def generate(self, prompt: str, max_new_tokens: int = 200, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 1, stream: bool = False,
                 include_prompt: bool = False) -> str | Iterator[str]:
        """The continuation of `prompt`: `max_new_tokens` tokens sampled at `temperature` (0: greedy), among the
        `top_k` most likely or the nucleus of mass `top_p`; the same `seed` gives the same text. Past the
        model's block of `config.max_len` tokens, the last half block is the context. With `stream`, an
        iterator of text pieces as they are sampled (they join to the text without `stream`);
        `include_prompt`: the detokenized prompt first (what `transformer lm sample` prints)."""
        if not isinstance(prompt, str):
            raise UserError(f"`prompt`: not a str ({type(prompt).__name__})")
        args = (self.model, self.tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, seed)
        if stream:
            pieces = lm.stream_text(*args)
            return _prefixed(self.tokenizer.decode([lm.prompt_ids(self.tokenizer, prompt)])[0], pieces) \
                if include_prompt else pieces
        return lm.generate(*args) if include_prompt else lm.continuation(*args)

    def perplexity(self, text: str) -> float:
        """exp of the mean negative log-likelihood (nats) of the text's tokens after the first."""
        if not isinstance(text, str):
            raise UserError(f"`text`: not a str ({type(text).__name__})")
        return lm.perplexity(self.model, self.tokenizer, text)


def _prefixed(first: str, pieces: Iterator[str]) -> Iterator[str]:
    yield first
    yield from pieces


class MaskedLM:
    """A BERT-style encoder trained to fill in [MASK]. Made by `transformer.load`; `config`, `tokenizer`, `model`."""

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer, model: nn.Module) -> None:
        self.config, self.tokenizer, self.model = config, tokenizer, model

    def fill(self, text: str, n_best: int = 5) -> list[list[tuple[str, float]]]:
        """For each [MASK] in `text`, in order, the `n_best` most likely fillers and their probabilities."""
        if n_best < 1:
            raise UserError(f"`n_best` {n_best}: must be >= 1")
        return masked.fill(self.model, self.tokenizer, texts_of(text, "text")[0], n_best)

    def embed(self, texts: str | Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Sentence vectors, (N, d_model) for a list of N texts or (d_model,) for one: the mean of the encoder's
        last hidden states over the sentence's tokens ([CLS] and [SEP] included)."""
        vectors = masked.embed(self.model, self.tokenizer, texts_of(texts), batch_size)
        return vectors[0] if isinstance(texts, str) else vectors

    def next_sentence(self, a: str, b: str) -> float:
        """P(IsNext): the probability that text `b` follows text `a`, by the next-sentence head of a model trained
        with `mlm train --nsp` (or an imported BERT with its head); `UserError` for a model without one."""
        return masked.next_sentence(self.model, self.tokenizer, texts_of(a, "a")[0], texts_of(b, "b")[0])


class TextClassifier:
    """A BERT-style encoder fine-tuned to label texts or text pairs (`transformer classify train`). Made by
    `transformer.load`; `config` (the encoder's `ModelConfig`), `tokenizer`, `model`, `labels` (the label
    names, index = class id), `pairs` (whether it classifies text pairs), `pool` ("cls" or "mean")."""

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer, model: nn.Module, meta: dict) -> None:
        self.config, self.tokenizer, self.model = config, tokenizer, model
        task = meta["classify"]
        self.labels, self.pairs, self.pool, self._meta = list(task["labels"]), bool(task["pairs"]), task["pool"], meta

    def _probs(self, texts, batch_size: int) -> tuple[torch.Tensor, bool]:
        """(probabilities (N, labels), whether one example was given) of a str, a (a, b) tuple, or a list."""
        one = isinstance(texts, (str, tuple))
        items = [texts] if one else texts
        if not isinstance(items, list) or not items:
            raise UserError("`texts`: give a str, a (str, str) pair, or a non-empty list of them")
        seqs = encode(self.tokenizer, examples_of(items, self.pairs, "texts"), self.config.max_len)
        return probabilities(self.model, seqs, batch_size), one

    def predict(self, texts, batch_size: int = 64) -> tuple[str, float] | list[tuple[str, float]]:
        """(label, its probability) of a text (a str; for a pair model an (a, b) tuple), or of each of a list."""
        probs, one = self._probs(texts, batch_size)
        best = probs.max(-1)
        out = [(self.labels[i], p) for i, p in zip(best.indices.tolist(), best.values.tolist())]
        return out[0] if one else out

    def probabilities(self, texts, batch_size: int = 64) -> dict[str, float] | list[dict[str, float]]:
        """{label: probability} of a text (or pair), or of each of a list, in the order of `labels`."""
        probs, one = self._probs(texts, batch_size)
        out = [dict(zip(self.labels, row)) for row in probs.tolist()]
        return out[0] if one else out

    def evaluate(self, path, batch_size: int = 64) -> dict:
        """Accuracy, macro-F1, each label's precision, recall and F1, and the confusion matrix (rows: the true
        label) on a labelled TSV file (`text<TAB>label`, or `text_a<TAB>text_b<TAB>label`), as
        `transformer classify evaluate --json` prints them."""
        return evaluate(self.model, self.tokenizer, self._meta, path, batch_size)
