"""Translating with an exported CTranslate2 folder (`transformer export --to ctranslate2`).

`CTranslate2Translator` runs `ctranslate2.Translator` with our sentencepiece model, and follows
our search where CTranslate2 lets it:

- the maximum output length of a sentence is ours, a·|source| + b tokens (source EOS counted,
  output EOS included; `SearchConfig.max_len_a/b`): CTranslate2 takes one
  `max_decoding_length` per call, so sentences are translated in groups of equal limit;
- `min_len` is CTranslate2's `min_decoding_length` (0 allows an empty translation, as ours);
- greedy (beam 1) is CTranslate2's greedy search: the same tokens as ours in float32;
- beam search: CTranslate2 ranks finished hypotheses by log P / n^length_penalty (n: the
  generated tokens), ours by log P / ((5 + n) / 6)^alpha (GNMT; n counts the EOS). The two
  rules coincide only at alpha = length_penalty = 0. So CTranslate2 is asked for its `beam`
  best hypotheses with length_penalty 0 (their raw log-probabilities), and we pick among them
  with our rule. Its search keeps and finishes beams by its own criteria, so with alpha > 0
  the result can still differ from ours on a few sentences; at alpha 0 it is ours;
- an empty line gives an empty translation: CTranslate2 does not decode an empty source
  (ours translates the lone EOS).
"""

from __future__ import annotations

import json
from dataclasses import replace
from itertools import groupby
from pathlib import Path

import torch

from transformer.config import ModelConfig
from transformer.errors import UserError
from transformer.inference.search import SearchConfig, length_penalty
from transformer.inference.translate import check_lengths
from transformer.text.tokenizer import Tokenizer

MODEL_FILE, TOKENIZER_FILE, CONFIG_FILE = "model.bin", "tokenizer.model", "transformer.json"


def is_ctranslate2_dir(path: str | Path) -> bool:
    """Whether `path` is a folder written by `transformer export --to ctranslate2`."""
    path = Path(path)
    return (path / MODEL_FILE).is_file() and (path / CONFIG_FILE).is_file()


def _device(device: str) -> tuple[str, int]:
    """Our --device (auto, cpu, cuda, cuda:N) as CTranslate2's (device, device_index)."""
    name, _, index = device.partition(":")
    if name not in ("auto", "cpu", "cuda") or (index and not index.isdigit()):
        raise UserError(f"--device {device}: choose auto, cpu, cuda or cuda:N")
    return name, int(index or 0)


class CTranslate2Translator:
    """An exported CTranslate2 translation model: text in, text out.

    `compute_type` is CTranslate2's ("default": the type the weights were exported in; "int8",
    "float32", "bfloat16", ...); `threads` its intra_threads (None: as many as PyTorch uses,
    `torch.get_num_threads()`, which follows OMP_NUM_THREADS; 0: CTranslate2's default). `search` holds
    everything of the search but beam and alpha, which `translate_batch` takes per call.
    """

    def __init__(self, path: str | Path, device: str = "cpu", compute_type: str = "default",
                 threads: int | None = None, search: SearchConfig | None = None) -> None:
        try:
            import ctranslate2
        except ImportError:
            raise UserError("the ctranslate2 engine needs the ctranslate2 package: "
                            "pip install 'transformer[export]'") from None
        path = Path(path)
        if not is_ctranslate2_dir(path):
            raise UserError(f"{path}: not an exported CTranslate2 folder (no {MODEL_FILE} and {CONFIG_FILE})")
        try:
            self.cfg = ModelConfig.from_dict(json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))["model"])
        except (OSError, ValueError, KeyError, TypeError, UserError) as e:
            raise UserError(f"{path / CONFIG_FILE}: not a model config ({e})") from None
        if self.cfg.arch != "encoder-decoder":
            raise UserError(f"{path}: not a translation model (arch {self.cfg.arch!r})")
        self.tokenizer = Tokenizer.load(path / TOKENIZER_FILE)
        self.search = search or SearchConfig()
        device_name, index = _device(device)
        threads = torch.get_num_threads() if threads is None else threads
        try:
            self.translator = ctranslate2.Translator(str(path), device=device_name, device_index=index,
                                                     compute_type=compute_type, intra_threads=threads)
        except (RuntimeError, ValueError) as e:
            raise UserError(f"{path}: CTranslate2 cannot load it: {e}") from None
        self._pieces = [self.tokenizer.id_to_piece(i) for i in range(self.tokenizer.vocab_size)]
        self._ids = {piece: i for i, piece in enumerate(self._pieces)}

    def translate_batch(self, lines: list[str], beam: int, alpha: float) -> list[str]:
        """Translations of `lines` (detokenized, in their order), beam 1 = greedy, alpha: our length penalty."""
        return self.translate(lines, replace(self.search, beam=beam, alpha=alpha))

    def translate(self, lines: list[str], search: SearchConfig, batch_size: int = 64,
                  source_name: str = "input") -> list[str]:
        """Translations of `lines` with `search`, at most `batch_size` sentences per CTranslate2 batch.

        An empty line gives an empty translation (CTranslate2 does not decode an empty source).
        """
        if not lines:
            return []
        ids = self.tokenizer.encode([line.strip() for line in lines])
        check_lengths(self, ids, source_name)  # reads self.cfg.max_len
        return self.tokenizer.decode(self.translate_ids(ids, search, batch_size))

    def _limit(self, n_source: int, search: SearchConfig) -> int:
        """Our maximum output length (EOS included) for a source of n_source tokens + EOS."""
        return max(1, min(int(search.max_len_a * (n_source + 1) + search.max_len_b), self.cfg.max_len))

    def translate_ids(self, ids: list[list[int]], search: SearchConfig, batch_size: int = 64) -> list[list[int]]:
        """Token ids of the translations (no BOS/EOS) of the sources `ids` (no EOS), in their order."""
        out: list[list[int]] = [[] for _ in ids]
        order = sorted(range(len(ids)), key=lambda i: self._limit(len(ids[i]), search))
        for limit, group in groupby(order, key=lambda i: self._limit(len(ids[i]), search)):
            group = list(group)
            results = self.translator.translate_batch(
                [[self._pieces[t] for t in ids[i]] for i in group], max_batch_size=batch_size,
                beam_size=search.beam, num_hypotheses=search.beam, length_penalty=0.0, return_scores=True,
                max_decoding_length=limit, min_decoding_length=min(search.min_len, limit), max_input_length=0,
            )
            for i, result in zip(group, results):
                out[i] = self._best(result, search.alpha, limit)
        return out

    def _best(self, result, alpha: float, limit: int) -> list[int]:
        """The hypothesis of `result` that our length penalty ranks first, as our ids."""
        def ours(h: int) -> float:
            n = len(result.hypotheses[h])
            return result.scores[h] / length_penalty(n + 1 if n < limit else n, alpha)  # n + 1: its EOS

        best = max(range(len(result.hypotheses)), key=ours)
        return [self._ids[p] for p in result.hypotheses[best]]
