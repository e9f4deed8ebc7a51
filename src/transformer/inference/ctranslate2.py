"""Translating with an exported CTranslate2 folder (`transformer export --to ctranslate2`).

`CTranslate2Translator` runs `ctranslate2.Translator` with our sentencepiece model, and follows
our search where CTranslate2 lets it:

- the maximum output length of a sentence is ours, a·|source| + b tokens (source EOS counted,
  output EOS included; `SearchConfig.max_len_a/b`): CTranslate2 takes one
  `max_decoding_length` per call, so sentences are translated in groups of equal limit;
- `min_len` is CTranslate2's `min_decoding_length` (0 allows an empty translation, as ours);
- the pad token is never generated (`suppress_sequences`), as in our search: an imported Marian
  model's decoder starts from it (the folder's `decoder_start_token`, our BOS);
- greedy (beam 1) is CTranslate2's greedy search: the same tokens as ours in float32;
- beam search: CTranslate2 ranks finished hypotheses by log P / n^length_penalty, ours by
  log P / ((5 + n) / 6)^alpha (GNMT); n counts the EOS in both here (`return_end_token`). The
  two rules differ for every alpha > 0, and at length_penalty 0 CTranslate2 also stops
  differently: it ends a sentence once its best beam has finished, where ours (and
  CTranslate2 with a non-zero length_penalty, patience 1) ends it once `beam` hypotheses have
  finished. So CTranslate2 is asked for its `beam` best with length_penalty max(alpha/2,
  0.001): never 0, which gives our stopping rule, and alpha/2 ranks nearly as GNMT does.
  log P = score · n^length_penalty recovers their log-probabilities, and our rule picks among
  them. The result is our beam search (up to float rounding), except when more than `beam`
  hypotheses finish and the one ours picks is not among CTranslate2's `beam` best by its rule;
- an empty or whitespace-only line gives an empty translation and is not decoded, as with
  ours: both go through `translate.translate_texts`.

int8 on the CPU. CTranslate2's x86 wheels carry two int8 matrix products and pick Intel MKL's
on Intel CPUs, oneDNN's on the others (its `src/cpu/backend.cc`; CT2_USE_MKL overrides, read
when `ctranslate2` is imported). Both take the input as unsigned bytes (the int8 input shifted
by 128: 1..255) times the signed int8 weights. On CPUs without VNNI, oneDNN multiplies them with
AVX2's `vpmaddubsw`, which adds each pair of products in a signed 16-bit lane and saturates
there: 2·255·127 = 64,770 does not fit in 32,767 (oneDNN's guide, "Nuances of int8
computations"). On an AMD EPYC (AVX2) that changed every greedy translation of the test model.
Our export therefore stores int8 weights on the grid [-64, 64] (`export/ctranslate2.py`), where
2·255·64 = 32,640 fits: every backend computes the same exact products. A folder exported
before, or a float32 folder run as int8 (CTranslate2 quantizes it on load to [-127, 127]), is
still inexact there; `backend_line` says so. (MKL's int8 is exact on AMD CPUs but,
measured on the EPYC, 4-6x slower than oneDNN's and about 3x slower than float32: docs/export.md.)
"""

from __future__ import annotations

import json
import os
import platform
from itertools import groupby
from pathlib import Path

import torch

from transformer.config import ModelConfig
from transformer.device import cpu_flags
from transformer.errors import UserError
from transformer.inference.search import SearchConfig, length_penalty
from transformer.inference.translate import check_lengths, translate_texts
from transformer.store.kinds import (
    CT2_CONFIG,
    CT2_MODEL,
    CT2_TOKENIZER,
    is_ctranslate2_dir,
)
from transformer.text.tokenizer import Tokenizer

INTEL = "GenuineIntel"
INT8_MAX = 64  # the export's int8 weights lie in [-INT8_MAX, INT8_MAX] (module docstring)


def cpu_vendor() -> str | None:
    """The x86 CPU's vendor ("GenuineIntel", "AuthenticAMD", ...) under Linux; None elsewhere."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id":
                    return value.strip()
    except OSError:
        pass
    return None


def backend_line(vendor: str | None, flags: set[str], use_mkl: str | None, exact_grid: bool) -> str:
    """The line that says which matrix product CTranslate2 runs int8 with on this CPU, with a warning
    where it can saturate. `use_mkl`: CT2_USE_MKL as set (None: unset); `exact_grid`: the int8
    weights lie in [-INT8_MAX, INT8_MAX]. CTranslate2's rule (version 4): MKL where CT2_USE_MKL is
    "1"/"true"/"TRUE", oneDNN where it is set otherwise, MKL on Intel CPUs where it is unset."""
    if vendor is None:
        return "CTranslate2 int8 on this platform's backend"
    mkl = use_mkl in ("1", "true", "TRUE") if use_mkl else vendor == INTEL
    why = f"CT2_USE_MKL={use_mkl}" if use_mkl else f"CTranslate2's choice on {vendor}"
    line = f"CTranslate2 int8 on {'Intel MKL' if mkl else 'oneDNN'} ({why})"
    if mkl or exact_grid or flags & {"avx512_vnni", "avx_vnni"}:
        return line
    return (f"{line}: these int8 weights span [-127, 127], which oneDNN's int8 saturates on a CPU without "
            "VNNI; export with `quantization` int8 (this version keeps them in [-64, 64]), or set "
            "CT2_USE_MKL=1 (exact, several times slower)")


def import_ctranslate2():
    """The `ctranslate2` module; UserError when it is not installed."""
    try:
        import ctranslate2
    except ImportError:
        raise UserError("the ctranslate2 engine needs the ctranslate2 package: "
                        "pip install 'transformer[export]'") from None
    return ctranslate2


def _device(device: str) -> tuple[str, int]:
    """Our `device` (auto, cpu, cuda, cuda:N) as CTranslate2's (device, device_index)."""
    name, _, index = device.partition(":")
    if name not in ("auto", "cpu", "cuda") or (index and not index.isdigit()):
        raise UserError(f"`device` {device}: choose auto, cpu, cuda or cuda:N")
    return name, int(index or 0)


class CTranslate2Translator:
    """An exported CTranslate2 translation model: text in, text out.

    `compute_type` is CTranslate2's ("default": the type the weights were exported in; "int8",
    "float32", "bfloat16", ...); `threads` its intra_threads (None: as many as PyTorch uses,
    `torch.get_num_threads()`, which follows OMP_NUM_THREADS; 0: CTranslate2's default).
    `backend` says which int8 matrix product runs (`backend_line`), or is None when the model
    does not run int8 on the CPU.
    """

    def __init__(self, path: str | Path, device: str = "cpu", compute_type: str = "default",
                 threads: int | None = None) -> None:
        ctranslate2 = import_ctranslate2()
        path = Path(path)
        if not is_ctranslate2_dir(path):
            raise UserError(f"{path}: not an exported CTranslate2 folder (no {CT2_MODEL} and {CT2_CONFIG})")
        try:
            meta = json.loads((path / CT2_CONFIG).read_text(encoding="utf-8"))
            self.cfg = ModelConfig.from_dict(meta["model"])
        except (OSError, ValueError, KeyError, TypeError, UserError) as e:
            raise UserError(f"{path / CT2_CONFIG}: not a model config ({e})") from None
        if self.cfg.arch != "encoder-decoder":
            raise UserError(f"{path}: not a translation model (arch {self.cfg.arch!r})")
        self.tokenizer = Tokenizer.load(path / CT2_TOKENIZER)
        device_name, index = _device(device)
        threads = torch.get_num_threads() if threads is None else threads
        try:
            self.translator = ctranslate2.Translator(str(path), device=device_name, device_index=index,
                                                     compute_type=compute_type, intra_threads=threads)
        except (RuntimeError, ValueError) as e:
            raise UserError(f"{path}: CTranslate2 cannot load it: {e}") from None
        self.backend = None
        if self.translator.device == "cpu" and self.translator.compute_type.startswith("int8"):
            stored_int8 = str(meta.get("quantization", "")).startswith("int8")  # else quantized on load
            exact = stored_int8 and meta.get("int8_max", 127) <= INT8_MAX
            self.backend = backend_line(cpu_vendor(), cpu_flags(), os.environ.get("CT2_USE_MKL") or None, exact)
        self._pieces = [self.tokenizer.id_to_piece(i) for i in range(self.tokenizer.vocab_size)]
        self._ids = {piece: i for i, piece in enumerate(self._pieces)}
        pad, eos = self.cfg.pad_id, self.cfg.eos_id
        self._suppressed = [[self._pieces[pad]]] if pad != eos else None  # never generated (search.py)

    def translate(self, lines: list[str], search: SearchConfig, batch_size: int = 64,
                  source_name: str = "input") -> list[str]:
        """Translations of `lines` with `search`, at most `batch_size` sentences per CTranslate2 batch.

        An empty or whitespace-only line gives "" without being decoded (`translate_texts`, as ours).
        """
        return translate_texts(self, self.tokenizer, lines, lambda ids: self.translate_ids(ids, search, batch_size),
                               source_name)

    def score(self, sources: list[str], targets: list[str], batch_size: int = 64) -> list[float]:
        """log P(target + EOS | source) of each pair, in nats (CTranslate2's `score_batch`, summed)."""
        src, tgt = self.tokenizer.encode([x.strip() for x in sources]), self.tokenizer.encode_target([y.strip() for y in targets])
        check_lengths(self, src, "sources")
        check_lengths(self, tgt, "targets")
        results = self.translator.score_batch([[self._pieces[t] for t in x] for x in src],
                                              [[self._pieces[t] for t in y] for y in tgt], max_batch_size=batch_size)
        return [sum(r.log_probs) for r in results]

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
                beam_size=search.beam, num_hypotheses=search.beam, length_penalty=self._penalty(search.alpha),
                return_end_token=True, return_scores=True, suppress_sequences=self._suppressed,
                max_decoding_length=limit, min_decoding_length=min(search.min_len, limit), max_input_length=0,
            )
            for i, result in zip(group, results):
                out[i] = self._best(result, search.alpha)
        return out

    @staticmethod
    def _penalty(alpha: float) -> float:
        """CTranslate2's length_penalty for our alpha: n^(alpha/2) is the power of n nearest to GNMT's
        ((5 + n) / 6)^alpha for n = 2..40 (least squares of the logarithms); never 0, where
        CTranslate2 stops its search otherwise."""
        return max(alpha / 2, 1e-3)

    def _best(self, result, alpha: float) -> list[int]:
        """The hypothesis of `result` that our length penalty ranks first, as our ids without EOS.

        CTranslate2's score of a hypothesis of n tokens (its EOS included) is log P / n^penalty."""
        def ours(h: int) -> float:
            n = len(result.hypotheses[h])
            return result.scores[h] * n ** self._penalty(alpha) / length_penalty(n, alpha)

        best = [self._ids[p] for p in result.hypotheses[max(range(len(result.hypotheses)), key=ours)]]
        return best[:-1] if best and best[-1] == self.cfg.eos_id else best


def compute_type(precision: str, quantize: str | None) -> str:
    """CTranslate2's compute type for our settings: int8 when quantized, else the precision's type
    ("auto": the type the weights were exported in)."""
    if quantize == "int8":
        return "int8"
    types = {"auto": "default", "fp32": "float32", "bf16": "bfloat16"}
    if precision not in types:
        raise UserError(f"`precision` {precision}: choose fp32, bf16 or auto")
    return types[precision]
