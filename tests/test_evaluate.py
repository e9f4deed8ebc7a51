"""Scoring with sacrebleu, and the vendored Multi30k corpus."""

import pytest
import sacrebleu

from transformer.corpora import multi30k_dir
from transformer.text.data import read_lines
from transformer.errors import UserError
from transformer.report.metrics import score, score_files

HYPS = ["The cat sat on the mat.", "A dog runs in the park.", "Two men are playing chess."]
REFS = ["The cat is sitting on the mat.", "A dog is running in a park.", "Two men play chess."]


def test_identical_text_scores_100():
    scores = score(REFS, REFS)
    assert scores.bleu == pytest.approx(100.0)
    assert scores.chrf == pytest.approx(100.0)
    assert scores.n == 3


def test_agrees_with_sacrebleu_and_reports_signatures():
    scores = score(HYPS, REFS)
    assert scores.bleu == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert scores.chrf == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)
    assert 0 < scores.bleu < 100
    for signature in (scores.bleu_signature, scores.chrf_signature):
        assert "nrefs:1" in signature and "case:mixed" in signature
    assert scores.bleu_signature.startswith("BLEU|") and "tok:13a" in scores.bleu_signature
    assert scores.chrf_signature.startswith("chrF2|")
    bleu_line, chrf_line = str(scores).splitlines()
    assert bleu_line.startswith(f"{scores.bleu_signature} = {scores.bleu:.2f} ")
    assert "BP = " in bleu_line
    assert chrf_line == f"{scores.chrf_signature} = {scores.chrf:.2f}"
    assert scores.to_json() == {
        "bleu": round(scores.bleu, 2),
        "chrf": round(scores.chrf, 2),
        "signature": {"bleu": scores.bleu_signature, "chrf": scores.chrf_signature},
        "n": 3,
    }


def test_mismatched_or_empty_input_is_a_user_error():
    with pytest.raises(UserError, match="hypotheses have 2 lines but references have 3"):
        score(HYPS[:2], REFS)
    with pytest.raises(UserError, match="nothing to score"):
        score([], [])


def test_score_files(tmp_path):
    hyp, ref, short = tmp_path / "hyp.txt", tmp_path / "ref.txt", tmp_path / "short.txt"
    hyp.write_text("\n".join(HYPS) + "\n", encoding="utf-8")
    ref.write_text("\n".join(REFS) + "\n", encoding="utf-8")
    short.write_text(REFS[0] + "\n", encoding="utf-8")
    assert score_files(hyp, ref) == score(HYPS, REFS)
    with pytest.raises(UserError, match=f"{hyp} has 3 lines but {short} has 1"):
        score_files(hyp, short)
    missing = tmp_path / "missing.txt"
    with pytest.raises(UserError, match=f"{missing}: no such file"):
        score_files(missing, ref)


def test_vendored_multi30k_is_complete_and_aligned():
    folder = multi30k_dir()
    for split, count in (("train", 29000), ("valid", 1014), ("test2016", 1000)):
        en, de = read_lines(folder / f"{split}.en"), read_lines(folder / f"{split}.de")
        assert len(en) == len(de) == count
        assert all(en) and all(de)
