"""Fine-tuning: `train --init MODEL` starts from a model directory's weights and vocabulary with a fresh
optimiser, records where it started, resumes exactly, and `--freeze` keeps parts of the model fixed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from transformer.cli import main
from transformer.store.modeldir import load_model_dir, read_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--src-lang", "en", "--tgt-lang", "de", "--out", str(out),
            "--preset", "tiny", "--vocab-size", "500", "--max-tokens", "600", "--warmup", "4", "--log-every", "1",
            "--valid-every", "3", "--valid-bleu-lines", "4", "--no-progress", "--seed", "5",
            "--precision", "fp32", *extra]  # the same learning on every CPU (auto is bf16 on AMX)


@pytest.fixture(scope="module")
def data(multi30k_sample) -> Path:
    return multi30k_sample(200, 20)


@pytest.fixture(scope="module")
def base(data, tmp_path_factory) -> Path:
    """A tiny model trained 6 steps: the one the fine-tuning runs start from."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert main(_args(data, out, "--max-steps", "6")) == 0
    return out


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_model_dir(run)[0].state_dict().items()}


def test_init_starts_from_the_model_and_records_it(data, base, tmp_path, capsys):
    out = tmp_path / "ft"
    # Model flags that differ from the model's are ignored: the shape is the starting model's.
    assert main(_args(data, out, "--max-steps", "3", "--init", str(base), "--d-model", "64")) == 0
    assert f"starting from the weights of {base}" in capsys.readouterr().err
    model, meta = read_config(out)
    assert model == read_config(base)[0]
    assert meta["loop"]["init"] == str(base)
    assert (out / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    # The first loss is the starting model's on its first batch: far below a new model's.
    assert _losses(out)[1] < _losses(base)[1] - 0.5


def test_a_fine_tuning_run_resumes_exactly(data, base, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(_args(data, full, "--max-steps", "6", "--init", str(base))) == 0
    assert main(_args(data, part, "--max-steps", "3", "--init", str(base))) == 0
    assert main(_args(data, part, "--max-steps", "6", "--init", str(base), "--resume")) == 0
    expected, got = _losses(full), _losses(part)
    assert sorted(got) == list(range(1, 7))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step


def test_resume_refuses_another_starting_model(data, base, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(_args(data, out, "--max-steps", "3", "--init", str(base))) == 0
    capsys.readouterr()
    assert main(_args(data, out, "--max-steps", "6", "--init", str(tmp_path / "other"), "--resume")) == 2
    assert "--init" in capsys.readouterr().err


@pytest.mark.parametrize("freeze", ["embeddings", "1"])
def test_freeze_keeps_the_embeddings_and_lower_layers(data, base, tmp_path, freeze):
    out = tmp_path / "ft"
    assert main(_args(data, out, "--max-steps", "3", "--init", str(base), "--freeze", freeze)) == 0
    before, after = _weights(base), _weights(out)
    frozen = ("src_embed.", "tgt_embed.") + (("encoder.layers.0.", "decoder.layers.0.") if freeze == "1" else ())
    for name in before:
        same = torch.equal(before[name], after[name])
        assert same == name.startswith(frozen), name


@pytest.mark.parametrize("extra, message", [
    (("--freeze", "some"), "--freeze 'some': give embeddings, or a number of lower layers"),
    (("--freeze", "7"), "--freeze 7: more layers than a stack of the model has (2)"),
])
def test_bad_fine_tuning_settings(data, base, tmp_path, capsys, extra, message):
    assert main(_args(data, tmp_path / "ft", "--max-steps", "3", "--init", str(base), *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_init_refuses_a_model_of_another_task(tmp_path, capsys):
    from transformer.corpora import tinyshakespeare_path

    lm = tmp_path / "lm"
    assert main(["lm", "train", "--text", str(tinyshakespeare_path()), "--out", str(lm), "--vocab", "char",
                 "--preset", "tiny", "--block-size", "16", "--batch-size", "2", "--max-steps", "1",
                 "--no-progress"]) == 0
    capsys.readouterr()
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "valid"):
        for lang, text in (("en", "A man."), ("de", "Ein Mann.")):
            (data / f"{split}.{lang}").write_text(text + "\n")
    assert main(_args(data, tmp_path / "ft", "--max-steps", "1", "--init", str(lm))) == 2
    assert f"{lm}: this task trains an encoder-decoder model, not arch 'decoder'" in capsys.readouterr().err


def test_a_vit_fine_tunes_with_a_new_head_for_other_classes(tmp_path, capsys):
    """A ViT trained on two classes of the digits starts another run on all ten: a new head, the rest kept."""
    from transformer.store.kinds import load_vit

    pytest.importorskip("sklearn")
    base = tmp_path / "base"
    common = ["--bundled", "digits", "--preset", "tiny", "--batch-size", "16", "--valid-every", "2",
              "--no-progress", "--seed", "2"]
    assert main(["vit", "train", "--out", str(base), "--max-steps", "2", *common]) == 0
    model, _, _ = load_vit(base)
    head = torch.nn.Linear(model.cfg.d_model, 3)  # pretend the base had 3 classes: the run must replace it
    model.head, model.cfg = head, model.cfg.replace(n_classes=3)
    from transformer.store.modeldir import save_model_dir
    save_model_dir(tmp_path / "three", model, model.cfg, b"", meta={"vit": {}, "classes": ["a", "b", "c"]})
    capsys.readouterr()
    out = tmp_path / "ft"
    assert main(["vit", "train", "--out", str(out), "--max-steps", "2", "--init", str(tmp_path / "three"),
                 "--freeze", "1", *common]) == 0
    assert "a new classifier head for 10 classes" in capsys.readouterr().err
    tuned, cfg, meta = load_vit(out)
    assert cfg.n_classes == 10 and meta["loop"]["init"] == str(tmp_path / "three")
    kept = dict(model.state_dict())
    for name, value in tuned.state_dict().items():
        if name.startswith(("encoder.patch_embed", "encoder.cls", "encoder.positions", "encoder.encoder.layers.0.")):
            assert torch.equal(value, kept[name]), name
        elif not name.startswith("head."):
            assert not torch.equal(value, kept[name]), name
