"""Nothing lost, never a traceback: a training run killed or failing at a file operation resumes exactly, with
the true best model at the top of its run directory.

The targeted tests below stage one crash each (in this process); `test_fault_sweep` runs a fixed subset of
scripts/fault_sweep.py, which kills or fails a tiny run at its k-th file operation for k over the whole run
(`python scripts/fault_sweep.py` runs every point).
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from transformer.cli import main
from transformer.corpora import tinyshakespeare_path
from transformer.store import modeldir
from transformer import files
from transformer.training.checkpoint import checkpoint_dir, list_checkpoints
from transformer.store.modeldir import load_model_dir, load_train_state

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

COMMON = ["--preset", "tiny", "--warmup", "4", "--log-every", "1", "--valid-every", "3", "--keep-last", "2",
          "--seed", "3", "--no-progress"]


@pytest.fixture(scope="module")
def data(multi30k_sample) -> Path:
    return multi30k_sample(200, 20)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "input.txt"
    path.write_text(tinyshakespeare_path().read_text(encoding="utf-8")[:20000], encoding="utf-8")
    return path


def translation(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    """The issue's tiny run: its BLEU stays 0, so the first validation (step 3) stays the best."""
    return ["train", "--data", str(data), "--out", str(out), "--vocab-size", "400", "--max-tokens", "400",
            "--valid-bleu-lines", "5", "--max-steps", str(steps), *COMMON, *extra]


def lm(text: Path, out: Path, steps: int, *extra: str) -> list[str]:
    """A tiny LM run whose validation loss improves at every validation (3, 6, 7)."""
    return ["lm", "train", "--text", str(text), "--out", str(out), "--vocab", "char", "--block-size", "32",
            "--batch-size", "8", "--eval-batches", "2", "--max-steps", str(steps), "--decay-steps", "7", *COMMON,
            *extra]


def log(run: Path) -> list[tuple]:
    """The run's log, as (kind, step, loss) in order, for exact comparison."""
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [(r["kind"], r["step"], r["loss"]) for r in records]


def weights(path: Path) -> bytes:
    return (path / "model.safetensors").read_bytes()


def best_step(run: Path) -> int:
    return json.loads((run / "config.json").read_text())["meta"]["best"]["step"]


@pytest.fixture(scope="module")
def lm_reference(text, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "lm"
    assert main(lm(text, out, 7)) == 0
    return out


@pytest.fixture(scope="module")
def translation_reference(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "translation"
    assert main(translation(data, out, 7)) == 0
    return out


class Killed(BaseException):
    """A kill, for the code under test: nothing catches it, nothing after it runs."""


def kill_copy_of_best(monkeypatch: pytest.MonkeyPatch, out: Path, nth: int) -> None:
    """Kill the run at its `nth` copy of a new best model to the top of `out`, before anything is written."""
    calls = [0]
    save = modeldir.save_model_dir

    def killed_at_nth(path, *args, **kwargs):
        if Path(path) == out:
            calls[0] += 1
            if calls[0] == nth:
                raise Killed
        return save(path, *args, **kwargs)

    monkeypatch.setattr(modeldir, "save_model_dir", killed_at_nth)


def test_best_model_replaced_on_resume_after_a_kill_before_its_copy(text, lm_reference, tmp_path, capsys):
    """Killed between checkpoint 6 (the new best) and the copy of its model to the top: the top still holds
    step 3's model. --resume puts step 6's there before anything else, even with nothing left to train."""
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        kill_copy_of_best(mp, out, 2)
        with pytest.raises(Killed):
            main(lm(text, out, 7))
    assert best_step(out) == 3 and [p.name for p in list_checkpoints(out)] == ["step_00000003", "step_00000006"]
    capsys.readouterr()

    assert main(lm(text, out, 6, "--resume")) == 0
    assert best_step(out) == 6 and weights(out) == weights(checkpoint_dir(out, 6))
    assert "the best model (step 6) was not in place" in capsys.readouterr().err

    assert main(lm(text, out, 7, "--resume")) == 0  # and the run goes on as if never killed
    assert log(out) == log(lm_reference)
    assert best_step(out) == 7 and weights(out) == weights(lm_reference)


def test_best_model_whose_checkpoint_is_pruned_later(data, translation_reference, tmp_path):
    """Killed at the first copy of a best model (step 3): the top holds no model at all. Resuming copies it from
    checkpoint 3 first, so that pruning it at step 7 (--keep-last 2) loses nothing."""
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        kill_copy_of_best(mp, out, 1)
        with pytest.raises(Killed):
            main(translation(data, out, 7))
    assert not (out / "model.safetensors").exists()
    step3 = weights(checkpoint_dir(out, 3))
    assert main(translation(data, out, 7, "--resume")) == 0
    assert [p.name for p in list_checkpoints(out)] == ["step_00000006", "step_00000007"]
    assert (out / "model.safetensors").exists(), "the best model was lost"
    assert best_step(out) == 3 and weights(out) == step3 == weights(translation_reference)
    assert log(out) == log(translation_reference)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["disk-full", "read-only"])
def test_a_failed_write_is_one_line_and_resume_continues(code, data, translation_reference, tmp_path, capsys,
                                                         monkeypatch):
    """A disk that fills up (a write fails) or turns read-only (a folder cannot be made) while checkpoint 6 is
    written: exit 2 with one line naming the checkpoint and the problem, no temporaries left, and --resume
    continues from checkpoint 3 as if nothing had happened."""
    out = tmp_path / "run"
    target = checkpoint_dir(out, 6).name
    with pytest.MonkeyPatch.context() as mp:
        if code == errno.ENOSPC:
            write = files.write_synced

            def full_disk(path, data):
                if target in str(path):
                    Path(path).write_bytes(data[: len(data) // 2])
                    raise OSError(code, os.strerror(code))
                write(path, data)

            mp.setattr(files, "write_synced", full_disk)
        else:
            mkdir = os.mkdir

            def read_only(path, *args, **kwargs):
                if target in str(path):
                    raise OSError(code, os.strerror(code))
                return mkdir(path, *args, **kwargs)

            mp.setattr(os, "mkdir", read_only)
        capsys.readouterr()
        assert main(translation(data, out, 7)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"transformer translation train: error: {checkpoint_dir(out, 6)}: cannot write: "
                       f"{os.strerror(code)}")
    assert not any("Traceback" in line or "error" in line for line in err[:-1])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000003"]  # nothing of step 6
    assert main(translation(data, out, 7, "--resume")) == 0
    assert log(out) == log(translation_reference)
    assert weights(out) == weights(translation_reference)


def test_resume_cleans_up_what_interrupted_saves_left(data, translation_reference, tmp_path):
    out = tmp_path / "run"
    assert main(translation(data, out, 3)) == 0
    (out / "model.safetensors.next").write_bytes(b"half")  # a copy of the best model never committed
    (out / "..commit.tmp-123").write_text("[")
    (out / ".log.jsonl.tmp-123").write_text("")
    (out / "checkpoints" / ".tmp-step_00000005-123").mkdir()  # a checkpoint never renamed into place
    (out / "checkpoints" / ".del-step_00000001").mkdir()  # a prune cut short
    assert main(translation(data, out, 7, "--resume")) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in translation_reference.iterdir())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000006", "step_00000007"]
    for path in list_checkpoints(out):
        load_model_dir(path)
        assert load_train_state(path)["best_step"] == 3
    assert log(out) == log(translation_reference)


def test_fault_sweep(data, tmp_path):
    """The CI subset of the sweep: every 5th file operation of both tiny runs, killed and (offset by 2) failed,
    and the edges of each copy of a best model to the top: its start, the journal's commit, just after it."""
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fault_sweep.py"), "--every", "5", "--window",
         "--data", str(data), "--work", str(tmp_path / "sweep"), "--json", str(report)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all resumed exactly" in result.stdout
    found = json.loads(report.read_text())
    assert found["failures"] == []
    assert found["points"]["kill"] >= 60 and found["points"]["fail"] >= 60
    for name, best in (("translation", 3), ("lm", 7)):
        command = found["commands"][name]
        assert command["best_step"] == best
        parts = command["by_part"]
        assert {"best", "prune", "log", "checkpoint step_00000003", "checkpoint step_00000007"} <= parts.keys()
        assert command["operations"] > 90
    assert found["commands"]["lm"]["by_part"]["best"] == 3 * found["commands"]["translation"]["by_part"]["best"]
