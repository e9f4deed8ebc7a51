"""`transformer classify`: fine-tuning a tiny masked LM to label texts and text pairs, predict and evaluate,
the frozen-encoder probe, exact resume, and every bad input (one line naming the file and line, exit 2)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch

import transformer
from transformer.cli import main
from transformer.corpora import multi30k_dir
from transformer.inference.classify_text import encode, fit_pair
from transformer.store.modeldir import read_weights
from transformer.tasks.classify import read_tsv, scores
from transformer.training.optim import OptimConfig, lr_factor

N = 120  # sentences of each language


def _lines(lang: str) -> list[str]:
    return (multi30k_dir() / f"train.{lang}").read_text(encoding="utf-8").splitlines()[:N]


def _write(path: Path, rows: list[str]) -> Path:
    path.write_text("".join(row + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory, one_thread) -> Path:
    """A tiny MLM run (2 steps on English and German lines) and the toy tasks' TSV files beside it: which
    language a line is in (single texts, with a header), and which language the second text of an English
    first text is in (pairs)."""
    root = tmp_path_factory.mktemp("classify")
    en, de = _lines("en"), _lines("de")
    _write(root / "lines.txt", en + de)
    assert main(["mlm", "train", "--text", str(root / "lines.txt"), "--out", str(root / "mlm"), "--preset", "tiny",
                 "--vocab-size", "300", "--max-len", "48", "--max-steps", "2", "--no-progress",
                 "--precision", "fp32"]) == 0  # fp32 on every CPU: the toys' 100% must not hang on bf16 rounding
    single = [f"{s}\ten" for s in en] + [f"{s}\tde" for s in de]
    single = [single[i] for i in torch.randperm(len(single), generator=torch.Generator().manual_seed(0)).tolist()]
    _write(root / "train.tsv", ["text\tlabel", *single[:200]])
    _write(root / "valid.tsv", single[200:])
    pairs = [f"{en[i]}\t{(de if i % 2 else en)[(i + 1) % N]}\t{'de' if i % 2 else 'en'}" for i in range(N)]
    _write(root / "pairs.tsv", pairs[:100])
    _write(root / "pairs_valid.tsv", pairs[100:])
    return root


def _train(data: Path, out: str, *flags: str, train: str = "train.tsv", valid: str = "valid.tsv") -> Path:
    argv = ["classify", "train", "--model", str(data / "mlm"), "--train", str(data / train), "--valid",
            str(data / valid), "--out", str(data / out), "--no-progress", "--dropout", "0", "--precision", "fp32",
            *flags]
    assert main(argv) == 0
    return data / out


@pytest.fixture(scope="module")
def single_run(data) -> Path:
    return _train(data, "single", "--max-steps", "60", "--valid-every", "60", "--lr", "2e-3", "--warmup", "5")


@pytest.fixture(scope="module")
def pair_run(data) -> Path:
    return _train(data, "pairs", "--max-steps", "60", "--valid-every", "60", "--lr", "2e-3", "--warmup", "5",
                  train="pairs.tsv", valid="pairs_valid.tsv")


def _evaluate(capsys, run: Path, tsv: Path, *flags: str) -> str:
    capsys.readouterr()
    assert main(["classify", "evaluate", "--model", str(run), "--input", str(tsv), *flags]) == 0
    return capsys.readouterr().out


def _predict(capsys, monkeypatch, run: Path, text: str, *flags: str) -> list[str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    capsys.readouterr()
    assert main(["classify", "predict", "--model", str(run), *flags]) == 0
    return capsys.readouterr().out.splitlines()


def test_single_texts_learned_to_100_percent_and_evaluate_writes_json_and_png(data, single_run, capsys):
    out = json.loads(_evaluate(capsys, single_run, data / "valid.tsv", "--json", "--confusion",
                               str(data / "c" / "confusion.png")))
    assert out["accuracy"] == 1.0 and out["macro_f1"] == 1.0 and out["examples"] == 2 * N - 200
    assert set(out) == {"file", "accuracy", "macro_f1", "examples", "labels", "per_label", "confusion"}
    assert out["labels"] == ["de", "en"] and sum(map(sum, out["confusion"])) == out["examples"]
    assert (data / "c" / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = _evaluate(capsys, single_run, data / "valid.tsv").splitlines()
    assert text[0].startswith("accuracy 1.0000 (40/40)") and text[1] == "macro-F1 1.0000"
    meta = json.loads((single_run / "config.json").read_text())["meta"]["classify"]
    assert meta["labels"] == ["de", "en"] and meta["pairs"] is False and meta["pool"] == "cls"


def test_predict_prints_what_load_predicts(data, single_run, capsys, monkeypatch):
    classifier = transformer.load(single_run)
    assert type(classifier).__name__ == "TextClassifier" and classifier.labels == ["de", "en"]
    texts = ["A dog runs through the grass .", "Ein Hund läuft über die Wiese ."]
    assert _predict(capsys, monkeypatch, single_run, "\n".join(texts) + "\n") == ["en", "de"]
    assert [label for label, _ in classifier.predict(texts)] == ["en", "de"]
    label, p = classifier.predict(texts[0])
    assert label == "en" and 0.5 < p <= 1
    with_probs = _predict(capsys, monkeypatch, single_run, texts[0] + "\n", "--probs")[0].split("\t")
    probs = classifier.probabilities(texts[0])
    assert with_probs == ["en", *(f"{k} {v:.4f}" for k, v in probs.items())]
    assert math.isclose(sum(probs.values()), 1.0, rel_tol=1e-5) and probs["en"] == pytest.approx(p)
    assert classifier.evaluate(data / "valid.tsv")["accuracy"] == 1.0


def test_pairs_learned_to_100_percent(data, pair_run, capsys, monkeypatch):
    assert json.loads(_evaluate(capsys, pair_run, data / "pairs_valid.tsv", "--json"))["accuracy"] == 1.0
    classifier = transformer.load(pair_run)
    assert classifier.pairs and classifier.pool == "cls"
    en, de = "A man rides a horse .", "Ein Mann reitet ein Pferd ."
    assert [label for label, _ in classifier.predict([(en, de), (en, "Two dogs play in the snow .")])] == ["de", "en"]
    assert _predict(capsys, monkeypatch, pair_run, f"{en}\t{de}\n") == ["de"]


def test_inputs_are_berts_and_cut_to_the_models_length(data):
    tokenizer = transformer.load(data / "mlm").tokenizer
    (ids, segments), = encode(tokenizer, [("a dog", "ein hund")], 48)
    a, b = tokenizer.encode(["a dog", "ein hund"])
    assert ids == [5, *a, 6, *b, 6] and segments == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    (ids, segments), = encode(tokenizer, [("word " * 100,)], 48)
    assert len(ids) == 48 and ids[0] == 5 and ids[-1] == 6 and set(segments) == {0}
    assert fit_pair(list(range(10)), list(range(3)), 8) == (list(range(5)), list(range(3)))
    assert fit_pair(list(range(5)), list(range(6)), 6) == (list(range(3)), list(range(3)))


def test_freeze_encoder_trains_the_head_only(data, capsys):
    run = _train(data, "probe", "--freeze-encoder", "--pool", "mean", "--max-steps", "5", "--valid-every", "5")
    assert "(66 trained)" in capsys.readouterr().err  # 2 labels x 32 + 2
    pretrained, _ = read_weights(data / "mlm" / "model.safetensors")
    tuned, _ = read_weights(run / "model.safetensors")
    shared = [k for k in tuned if not k.startswith("head.")]
    assert shared and all(torch.equal(tuned[k], pretrained[k]) for k in shared)
    probe = transformer.load(run)
    assert probe.pool == "mean" and not probe.model.frozen  # frozen is a training state, not stored
    tokens = torch.tensor([[5, 40, 41, 6, 0, 0]])
    with torch.no_grad():  # mean pooling: over the real tokens only
        h = probe.model.encoder(probe.model.embed(tokens[:, :4]), torch.ones(1, 1, 1, 4, dtype=torch.bool))
        assert torch.allclose(probe.model.features(tokens), h.mean(1), atol=1e-5)


def test_a_fine_tuning_run_resumes_exactly(data):
    flags = ["--valid-every", "3", "--log-every", "1", "--warmup", "2", "--decay-steps", "6", "--batch-size", "8"]
    _train(data, "straight", "--max-steps", "6", *flags)
    _train(data, "resumed", "--max-steps", "3", *flags)
    _train(data, "resumed", "--max-steps", "6", "--resume", *flags)

    def losses(run: str) -> list[float]:
        records = [json.loads(line) for line in (data / run / "log.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if r["kind"] == "train"]

    assert len(losses("straight")) == 6 and losses("straight") == losses("resumed")
    a = read_weights(data / "straight" / "checkpoints" / "step_00000006" / "model.safetensors")[0]
    b = read_weights(data / "resumed" / "checkpoints" / "step_00000006" / "model.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_linear_schedule_decays_to_zero_after_warm_up():
    cfg = OptimConfig(lr=1e-3, schedule="linear", warmup=2).resolve(32, 10)
    assert cfg.min_lr == 0 and cfg.decay_steps == 10
    assert [round(lr_factor(s, cfg), 4) for s in (1, 2, 6, 10, 11)] == [0.5, 1.0, 0.5, 0.0, 0.0]


def test_tsv_header_and_scores(tmp_path):
    data = read_tsv(_write(tmp_path / "a.tsv", ["sentence\tLabel", "", "a b\tx", "c\ty"]))
    assert data.texts == [("a b",), ("c",)] and data.labels == ["x", "y"] and data.lines == [3, 4]
    assert read_tsv(_write(tmp_path / "b.tsv", ["a\tb\tlabel2"])).pairs  # no header: its last field is not "label"
    s = scores([0, 0, 1, 1], [0, 1, 1, 1], ["p", "q", "r"])  # r in neither: left out of the macro-F1
    assert s["accuracy"] == 0.75 and s["confusion"] == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    assert s["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


BAD_TRAIN = {
    "wrong columns": (["a\tx", "b\tc\ty"], "bad.tsv:2: 3 tab-separated fields, expected 2"),
    "one column": (["just text"], "bad.tsv:1: 1 tab-separated fields"),
    "empty label": (["a\tx", "b\t "], "bad.tsv:2: empty label"),
    "empty file": ([], "bad.tsv: no examples (an empty file)"),
    "only a header": (["text\tlabel"], "bad.tsv: no examples (only a header line)"),
}


@pytest.mark.parametrize("case", sorted(BAD_TRAIN))
def test_bad_training_files_are_one_line_naming_file_and_line(data, capsys, case):
    rows, message = BAD_TRAIN[case]
    _write(data / "bad.tsv", rows)
    capsys.readouterr()
    assert main(["classify", "train", "--model", str(data / "mlm"), "--train", str(data / "bad.tsv"), "--out",
                 str(data / "never"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (data / "never").exists()


def test_bad_evaluate_and_predict_inputs(data, single_run, pair_run, capsys, monkeypatch):
    _write(data / "unseen.tsv", ["a dog\ten", "ein hund\tfr"])
    _write(data / "pair_input.tsv", ["a dog\tein hund\ten"])
    _write(data / "single_input.tsv", ["a dog\ten"])
    cases = [
        (["evaluate", "--model", single_run, "--input", data / "unseen.tsv"], "unseen.tsv:2: label 'fr' is not one"),
        (["evaluate", "--model", single_run, "--input", data / "pair_input.tsv"],
         "pair_input.tsv:1: text pairs, but the model classifies single texts"),
        (["evaluate", "--model", pair_run, "--input", data / "single_input.tsv"],
         "single_input.tsv:1: single texts, but the model classifies text pairs"),
        (["train", "--model", single_run, "--train", data / "train.tsv", "--out", data / "never"],
         "not a BERT-style masked LM to fine-tune"),
        (["train", "--model", data / "mlm", "--train", data / "pairs.tsv", "--valid", data / "valid.tsv", "--out",
          data / "never"], "valid.tsv:1: single texts, but the model classifies text pairs"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(["classify", *map(str, argv)]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
    for run, text, message in ((single_run, "a dog\nA dog\tein Hund\n", "<stdin>:2: a text pair, but the model "
                                "classifies single texts"),
                               (pair_run, "a dog\n", "<stdin>:1: a single text, but the model classifies text pairs")):
        monkeypatch.setattr("sys.stdin", io.StringIO(text))
        capsys.readouterr()
        assert main(["classify", "predict", "--model", str(run)]) == 2
        captured = capsys.readouterr()
        assert message in captured.err and captured.out == ""
    with pytest.raises(transformer.UserError, match="texts:1: a text pair"):
        transformer.load(single_run).predict(("a", "b"))
