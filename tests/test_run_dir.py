"""A run directory belongs to one command at a time, and never to someone else's files; over-long pairs are
skipped and counted; an interrupted run says where --resume continues."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from transformer.cli import main
from transformer.corpora import tinyshakespeare_path
from transformer.errors import UserError
from transformer.training.lock import locked_run


@pytest.fixture(scope="module")
def data(multi30k_sample) -> Path:
    return multi30k_sample(200, 20)


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--preset", "tiny", "--vocab-size", "400",
            "--max-tokens", "400", "--log-every", "1", "--valid-every", "3", "--valid-bleu-lines", "5",
            "--no-progress", "--max-steps", "3", *extra]


def test_a_second_command_on_a_locked_run_is_refused(tmp_path):
    """While one process trains into a run directory, another (here: a real second process) is refused at once,
    with a line naming the holder; once the first lets go, the directory is free again."""
    out = tmp_path / "run"
    script = ("import sys, time; from transformer.training.lock import locked_run\n"
              "with locked_run(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"another training command is using this run \(pid {holder.pid} on "):
            with locked_run(out):
                pass
    finally:
        holder.kill()  # SIGKILL: the lock goes with the process, no stale lock file blocks the next command
        holder.wait()
    with locked_run(out):
        assert (out / ".lock").read_text().startswith(f"pid {os.getpid()} ")


def test_two_train_commands_on_one_folder(data, tmp_path, capsys):
    out = tmp_path / "run"
    with locked_run(out):  # as a first `transformer train` would, from another process
        assert main(_args(data, out)) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "another training command is using this run" in err
    assert not (out / "log.jsonl").exists()  # the refused command wrote nothing
    assert main(_args(data, out)) == 0


def test_a_folder_that_is_not_a_run_is_never_written(data, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    (mine / "model.safetensors").write_bytes(b"my weights")
    assert main(_args(data, mine)) == 2
    assert "holds files but no training run" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "model.safetensors"]
    assert (mine / "config.json").read_text() == '{"my": "settings"}'
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(_args(data, a_file)) == 2
    assert "is not a folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(_args(data, empty)) == 0  # an empty folder is fine


def test_over_long_pairs_are_skipped_and_counted(data, tmp_path, capsys):
    long = tmp_path / "long"
    long.mkdir()
    for lang in ("en", "de"):
        for split in ("train", "valid"):
            lines = (data / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()
            if split == "train":
                lines[3] = " ".join(lines[:30])  # far over max_len 64
                lines[7] = " ".join(lines[:30]) if lang == "de" else lines[7]
            (long / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(_args(long, tmp_path / "run", "--max-len", "64", "--max-tokens", "100000")) == 0
    assert "skipped 2 pair(s) too long for the model (max_len 64" in capsys.readouterr().err


def test_an_interrupted_run_says_where_resume_continues(data, tmp_path):
    """^C (SIGINT) during training: exit 130, and one line saying from which step --resume continues."""
    out = tmp_path / "run"
    args = _args(data, out)[:-2] + ["--max-steps", "100000", "--valid-every", "2"]
    # SIGINT's default action in the child: a shell that starts the tests in the background ignores it,
    # the child would inherit that, and Python then installs no KeyboardInterrupt handler.
    job = subprocess.Popen([sys.executable, "-m", "transformer", *args], stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list((out / "checkpoints").glob("step_*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    job.send_signal(signal.SIGINT)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 130
    line = next(line for line in err.splitlines() if line.startswith("interrupted;"))
    step = int(line.split("continues from step ")[1].split()[0])
    assert (out / "checkpoints" / f"step_{step:08d}").is_dir() and step % 2 == 0


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "input.txt"
    path.write_text(tinyshakespeare_path().read_text(encoding="utf-8")[:20000], encoding="utf-8")
    return path


def _task_args(task: str, data: Path, text: Path, out: Path, *extra: str) -> list[str]:
    """A tiny translation run (`_args`) or language-model run (its schedule decays over 6 steps) into `out`,
    3 steps (a checkpoint at 3) unless `extra` says otherwise."""
    if task == "translation":
        return _args(data, out, *extra)
    return ["lm", "train", "--text", str(text), "--out", str(out), "--preset", "tiny", "--vocab", "char",
            "--block-size", "32", "--batch-size", "8", "--eval-batches", "2", "--decay-steps", "6", "--log-every", "1",
            "--valid-every", "3", "--no-progress", "--max-steps", "3", *extra]


def _losses(run: Path) -> list[tuple]:
    """The run's log as (kind, step, loss), in order, for exact comparison."""
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [(r["kind"], r["step"], r["loss"]) for r in records]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("task", ["translation", "lm"])
def test_a_copied_run_resumes_where_it_is(task, data, text, tmp_path, monkeypatch):
    """`cp -a runs/r20 runs/r20copy` mid-way, then `train --out /abs/runs/r20copy --resume` from another working
    directory: the copy resumes as the run it is, and its log is that of an uninterrupted run; the original
    is left as it was."""
    monkeypatch.chdir(tmp_path)
    assert main(_task_args(task, data, text, Path("runs/r20"))) == 0  # recorded with a relative --out
    shutil.copytree("runs/r20", "runs/r20copy", symlinks=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    copy = tmp_path / "runs" / "r20copy"
    assert main(_task_args(task, data, text, copy, "--max-steps", "6", "--resume")) == 0
    assert main(_task_args(task, data, text, tmp_path / "whole", "--max-steps", "6")) == 0
    assert _losses(copy)[-1][1] == 6 and _losses(copy) == _losses(tmp_path / "whole")
    assert _losses(tmp_path / "runs" / "r20")[-1][1] == 3  # the original is left as it was
    assert not list(elsewhere.iterdir())
