"""Corpus BLEU and chrF of translations against one reference each, with sacrebleu.

Scores use sacrebleu's defaults (BLEU: the ``13a`` tokenizer, cased; chrF: character
6-grams, beta 2) on detokenized text, the setting that makes numbers comparable across
papers (Post, 2018, "A Call for Clarity in Reporting BLEU Scores"). Each score comes with
its sacrebleu signature, which records that setting and should be reported with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sacrebleu.metrics import BLEU, CHRF

from transformer.text.data import read_lines
from transformer.errors import UserError


@dataclass(frozen=True)
class Scores:
    """Corpus-level scores of ``n`` sentences, with the signatures that define them.

    ``bleu_details`` holds BLEU's n-gram precisions, brevity penalty and length ratio
    as sacrebleu prints them, e.g. ``"64.2/40.1/26.0/17.3 (BP = 1.000 ratio = 1.013
    hyp_len = 12100 ref_len = 11945)"``.
    """

    bleu: float
    chrf: float
    bleu_signature: str
    chrf_signature: str
    bleu_details: str
    n: int

    def to_json(self) -> dict:
        """A JSON-ready dict: ``bleu``, ``chrf`` (to 2 decimals), ``signature`` and ``n``."""
        return {
            "bleu": round(self.bleu, 2),
            "chrf": round(self.chrf, 2),
            "signature": {"bleu": self.bleu_signature, "chrf": self.chrf_signature},
            "n": self.n,
        }

    def __str__(self) -> str:
        """Two lines in sacrebleu's own format: ``SIGNATURE = SCORE DETAILS``."""
        return (
            f"{self.bleu_signature} = {self.bleu:.2f} {self.bleu_details}\n"
            f"{self.chrf_signature} = {self.chrf:.2f}"
        )


def score(hyps: list[str], refs: list[str]) -> Scores:
    """Corpus BLEU and chrF of the hypotheses ``hyps``, line by line against ``refs``."""
    if len(hyps) != len(refs):
        raise UserError(f"hypotheses have {len(hyps)} lines but references have {len(refs)}")
    if not hyps:
        raise UserError("nothing to score: no hypotheses and no references")
    bleu_metric, chrf_metric = BLEU(), CHRF()
    bleu = bleu_metric.corpus_score(hyps, [refs])
    chrf = chrf_metric.corpus_score(hyps, [refs])
    precisions = "/".join(f"{p:.1f}" for p in bleu.precisions)
    details = (
        f"{precisions} (BP = {bleu.bp:.3f} ratio = {bleu.ratio:.3f} "
        f"hyp_len = {bleu.sys_len} ref_len = {bleu.ref_len})"
    )
    return Scores(
        bleu=bleu.score,
        chrf=chrf.score,
        bleu_signature=f"{bleu.name}|{bleu_metric.get_signature()}",
        chrf_signature=f"{chrf.name}|{chrf_metric.get_signature()}",
        bleu_details=details,
        n=len(hyps),
    )


def score_files(hyp_path: str | Path, ref_path: str | Path) -> Scores:
    """Scores of a file of translations against a line-aligned file of references.

    Surrounding whitespace on each line is ignored; it does not change either metric.
    """
    hyps, refs = read_lines(hyp_path), read_lines(ref_path)
    if len(hyps) != len(refs):
        raise UserError(f"{hyp_path} has {len(hyps)} lines but {ref_path} has {len(refs)}")
    if not refs:
        raise UserError(f"{ref_path}: empty file, nothing to score")
    return score(hyps, refs)
