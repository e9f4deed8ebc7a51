import errno
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from transformer.store import modeldir
from transformer import files
from transformer.training.checkpoint import average_checkpoints, checkpoint_dir, list_checkpoints, prune_checkpoints, tidy_run, write_average
from transformer.files import atomic_write_bytes
from transformer.store.modeldir import copy_model_dir, load_model_dir, load_train_state, load_weights, save_model_dir, save_weights
from transformer.config import preset
from transformer.errors import UserError
from transformer.model.models import build_model
from transformer.text.tokenizer import Tokenizer

CFG = preset("tiny", vocab_size=64, n_encoder_layers=1, n_decoder_layers=1)


@pytest.fixture(scope="module")
def tok_bytes() -> bytes:
    return Tokenizer.train(["the cat sat on the mat", "a dog ran", "hello world"] * 10, vocab_size=30).to_bytes()


@functools.cache
def model_filled(value: float) -> nn.Module:
    """A tiny model whose every weight equals `value`: a save can be identified by any tensor. Do not modify."""
    model = build_model(CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model


def saved_value(path: Path) -> float:
    """The single value of the model saved in `path`, checking it matches meta and train_state."""
    model, _, _, meta = load_model_dir(path)
    values = torch.cat([p.flatten() for p in model.parameters()]).unique()
    assert len(values) == 1, "weights from two different saves"
    assert meta["value"] == values.item()
    state = load_train_state(path)
    assert state is None or state["value"] == values.item()
    return values.item()


def test_roundtrip(tmp_path: Path, tok_bytes: bytes) -> None:
    torch.manual_seed(0)
    model = build_model(CFG)
    state = {"step": 7, "rng": torch.get_rng_state(), "optimizer": {"lr": [1.0]}, "data": (3, 12)}
    save_model_dir(tmp_path / "m", model, CFG, tok_bytes, train_state=state, meta={"bleu": 1.5})

    loaded, cfg, tok, meta = load_model_dir(tmp_path / "m")
    assert cfg == CFG and meta == {"bleu": 1.5} and tok.to_bytes() == tok_bytes
    assert not loaded.training
    assert loaded.src_embed.tokens.weight is loaded.tgt_embed.tokens.weight  # still tied
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    src, tgt = torch.randint(4, CFG.vocab_size, (2, 5)), torch.randint(4, CFG.vocab_size, (2, 4))
    model.eval()
    torch.testing.assert_close(loaded(src, tgt), model(src, tgt), rtol=0, atol=0)

    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        assert len(list(f.keys())) == len(model.state_dict()) - 1  # the tied matrix is stored once
    got = load_train_state(tmp_path / "m")
    assert got["step"] == 7 and torch.equal(got["rng"], state["rng"]) and got["data"] == (3, 12)

    save_model_dir(tmp_path / "m", model, CFG, tok_bytes)  # overwrite without a train state
    assert load_train_state(tmp_path / "m") is None
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 10, bias=False)
        self.proj.weight = self.embed.weight
        self.register_buffer("counter", torch.tensor(3))


def test_save_load_weights_keeps_ties(tmp_path: Path) -> None:
    a, b = Tied(), Tied()
    save_weights(a, tmp_path / "w.safetensors")
    load_weights(b, tmp_path / "w.safetensors")
    assert b.proj.weight is b.embed.weight
    assert torch.equal(b.embed.weight, a.embed.weight)
    with pytest.raises(UserError, match="w.safetensors"):
        load_weights(nn.Linear(4, 10), tmp_path / "w.safetensors")


class Crash(Exception):
    pass


def crash_at(monkeypatch: pytest.MonkeyPatch, k: int) -> None:
    """Make the k-th file-system step (write, fsync, rename, unlink, rmdir) raise Crash, a torn write half done."""
    calls = [0]

    def step() -> bool:
        calls[0] += 1
        return calls[0] == k

    def wrap(fn):
        def crashing(*args, **kwargs):
            if step():
                raise Crash
            return fn(*args, **kwargs)

        return crashing

    for name in ("replace", "rename", "fsync", "unlink", "rmdir"):
        monkeypatch.setattr(os, name, wrap(getattr(os, name)))
    write = files.write_synced

    def torn_write(path: Path, data: bytes) -> None:
        if step():
            Path(path).write_bytes(data[: len(data) // 2])
            raise Crash
        write(path, data)

    monkeypatch.setattr(files, "write_synced", torn_write)


def crash_every_step(setup, save, check) -> int:
    """For k = 1, 2, ...: `setup`, run `save` crashing at step k, `check`; stops when `save` completes.

    Returns the number of crash points covered.
    """
    for k in range(1, 1000):
        setup()
        with pytest.MonkeyPatch.context() as mp:
            crash_at(mp, k)
            try:
                save()
                done = True
            except Crash:
                done = False
        check()
        if done:
            return k - 1
    raise AssertionError("save never completed")


def test_crash_while_replacing_a_directory(tmp_path: Path, tok_bytes: bytes) -> None:
    run = tmp_path / "run"
    seen = set()

    def setup() -> None:
        shutil.rmtree(run, ignore_errors=True)
        save_model_dir(run, model_filled(1.0), CFG, tok_bytes, train_state={"value": 1.0}, meta={"value": 1.0})
        save_model_dir(checkpoint_dir(run, 5), model_filled(1.0), CFG, tok_bytes, meta={"value": 1.0})
        (run / "log.jsonl").write_text("log\n")

    def save() -> None:
        save_model_dir(run, model_filled(2.0), CFG, tok_bytes, train_state={"value": 2.0}, meta={"value": 2.0})

    def check() -> None:
        seen.add(saved_value(run))  # loads, and holds the old or the new save, never a mix
        assert (run / "log.jsonl").read_text() == "log\n"  # the run's other contents are untouched
        assert saved_value(checkpoint_dir(run, 5)) == 1.0
        save_model_dir(run, model_filled(3.0), CFG, tok_bytes, meta={"value": 3.0})  # the next save recovers
        assert saved_value(run) == 3.0
        assert sorted(p.name for p in run.iterdir()) == [
            "checkpoints", "config.json", "log.jsonl", "model.safetensors", "tokenizer.model"
        ]

    assert crash_every_step(setup, save, check) > 20
    assert seen == {1.0, 2.0}


def test_crash_while_creating_a_directory(tmp_path: Path, tok_bytes: bytes) -> None:
    run = tmp_path / "run"
    outcomes = set()

    def setup() -> None:
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir()

    def save() -> None:
        save_model_dir(checkpoint_dir(run, 9), model_filled(2.0), CFG, tok_bytes, meta={"value": 2.0})

    def check() -> None:
        listed = list_checkpoints(run)
        outcomes.add(len(listed))
        if listed:  # the directory appears complete or not at all
            assert listed == [checkpoint_dir(run, 9)] and saved_value(listed[0]) == 2.0
        else:
            with pytest.raises(UserError, match="step_00000009"):
                load_model_dir(checkpoint_dir(run, 9))
        shutil.rmtree(checkpoint_dir(run, 9), ignore_errors=True)
        save()  # the next save cleans up what the crash left
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000009"]

    assert crash_every_step(setup, save, check) > 5
    assert outcomes == {0, 1}


def test_crash_while_pruning(tmp_path: Path, tok_bytes: bytes) -> None:
    run = tmp_path / "run"

    def setup() -> None:
        shutil.rmtree(run, ignore_errors=True)
        for step in (1, 2, 3):
            save_model_dir(checkpoint_dir(run, step), model_filled(step), CFG, tok_bytes, meta={"value": step})

    def check() -> None:
        listed = list_checkpoints(run)
        assert listed[-1] == checkpoint_dir(run, 3)
        for path in listed:
            saved_value(path)
        prune_checkpoints(run, 1)
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000003"]

    assert crash_every_step(setup, lambda: prune_checkpoints(run, 1), check) > 2


# Run in a fresh interpreter, which then forks one child per kill point: the child arms a SIGKILL at
# the k-th file-system step of the save sequence and runs it; the parent waits, and goes on with k+1.
# (Forking a fresh process that has run no parallel torch code avoids forking OpenMP thread pools,
# and costs a few milliseconds per kill point instead of a second to import torch.)
_KILL_AT_EVERY_STEP = r"""
import json, os, signal, sys
from pathlib import Path

import torch

torch.set_num_threads(1)
os.fsync = lambda fd: None  # durability against power loss is not under test here: save the disk time
from transformer import files
from transformer.config import preset
from transformer.model.models import build_model
from transformer.training.checkpoint import checkpoint_dir, prune_checkpoints
from transformer.store.modeldir import save_model_dir

root = Path(sys.argv[1])
toks = {1: Path(sys.argv[2]).read_bytes(), 2: Path(sys.argv[3]).read_bytes()}
cfg = preset("tiny", vocab_size=64, n_encoder_layers=1, n_decoder_layers=1)
models = {}
for value in (0, 1, 2):
    models[value] = build_model(cfg)
    with torch.no_grad():
        for p in models[value].parameters():
            p.fill_(value)


def save_checkpoint(run, step):
    tok = toks[2 if step == 2 else 1]
    save_model_dir(checkpoint_dir(run, step), models[step], cfg, tok, train_state={"value": step}, meta={"value": step})


def setup(run):
    # The old state: RUN/ holds save 1 (with a train state, so that the new save must delete a file),
    # checkpoints 0 and 1.
    save_model_dir(run, models[1], cfg, toks[1], train_state={"value": 1}, meta={"value": 1})
    save_checkpoint(run, 0)
    save_checkpoint(run, 1)
    (run / "log.jsonl").write_text("log\n")


def sequence(run):
    # What the trainer does at a validation that improves: a new checkpoint, prune to the last 2,
    # the new best model at the top of the run (without a train state).
    save_checkpoint(run, 2)
    prune_checkpoints(run, 2)
    save_model_dir(run, models[2], cfg, toks[2], meta={"value": 2})


def arm(k):
    # Count the file-system steps; SIGKILL this process at the k-th: before a directory is made, a file
    # renamed, fsynced or deleted, or in the middle of writing a file (half its bytes on disk).
    calls = [0]

    def reached():
        calls[0] += 1
        return calls[0] == k

    def wrap(fn):
        def step(*args, **kwargs):
            if reached():
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return step

    for name in ("mkdir", "replace", "rename", "fsync", "unlink", "rmdir"):
        setattr(os, name, wrap(getattr(os, name)))
    write = files.write_synced

    def torn_write(path, data):
        if reached():
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        write(path, data)

    files.write_synced = torn_write
    return calls


def in_child(k, run):
    # Runs `sequence` in a forked child armed at step k; returns the number of steps it made, or -signal.
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(reader)
        code = 1
        try:
            calls = arm(k)
            sequence(run)
            os.write(writer, str(calls[0]).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(writer)
    with os.fdopen(reader) as f:
        steps = f.read()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return int(steps) if code == 0 else code


setup(root / "dry")
n = in_child(0, root / "dry")  # never fires: counts the steps
results = []
for k in range(1, n + 2):  # n + 1: the child completes
    run = root / f"k{k:03d}"
    setup(run)
    results.append(in_child(k, run))
print(json.dumps({"steps": n, "results": results}))
"""


def _complete_save(path: Path, toks: dict[int, bytes]) -> tuple[float, dict | None]:
    """(value, train state) of the save in model directory `path`, checking that every file is of that save."""
    model, cfg, tok, meta = load_model_dir(path)
    assert cfg == CFG
    values = torch.cat([p.flatten() for p in model.parameters()]).unique()
    assert len(values) == 1, f"{path}: weights from two different saves"
    value = values.item()
    assert meta == {"value": value}, f"{path}: config.json of another save"
    assert tok.to_bytes() == toks[2 if value == 2 else 1], f"{path}: tokenizer.model of another save"
    return value, load_train_state(path)


def test_sigkill_at_every_step_of_a_save(tmp_path: Path, tok_bytes: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process killed at any step of the trainer's save sequence leaves the old or the new state, whole."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # as in the child: only the kill is under test
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few hundred loads of a tiny model: threads would only wait on each other
    try:
        _kill_at_every_step(tmp_path, tok_bytes)
    finally:
        torch.set_num_threads(threads)


def _kill_at_every_step(tmp_path: Path, tok_bytes: bytes) -> None:
    toks = {1: tok_bytes, 2: Tokenizer.train(["zwei hunde spielen im schnee", "ein mann"] * 10, vocab_size=30).to_bytes()}
    assert toks[1] != toks[2]
    for version, data in toks.items():
        (tmp_path / f"tok{version}.model").write_bytes(data)
    root = tmp_path / "runs"
    root.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", _KILL_AT_EVERY_STEP, str(root), str(tmp_path / "tok1.model"), str(tmp_path / "tok2.model")],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    n = report["steps"]
    assert 30 <= n <= 120  # mkdirs, writes, fsyncs, renames and deletes of the three calls
    assert report["results"] == [-signal.SIGKILL] * n + [n]  # killed at each step 1..n, then not at all

    top_seen, listed_seen = set(), set()
    for k in range(1, n + 2):
        run = root / f"k{k:03d}"
        top = _complete_save(run, toks)  # loads, and holds save 1 or save 2, never a mix
        assert top in [(1.0, {"value": 1}), (2.0, None)], k
        assert (run / "log.jsonl").read_text() == "log\n"
        listed = tuple(int(p.name.removeprefix("step_")) for p in list_checkpoints(run))
        assert listed in {(0, 1), (0, 1, 2), (1, 2)}, (k, listed)  # 2 appears whole; 0 goes once 2 is there
        for step, path in zip(listed, list_checkpoints(run)):
            assert _complete_save(path, toks) == (step, {"value": step}), (k, path)
        if top[0] == 2.0:
            assert listed == (1, 2), k  # the new best comes last in the sequence
        top_seen.add(top[0])
        listed_seen.add(listed)
        # Another try of the same sequence, not killed, finishes what the killed one left.
        save_model_dir(checkpoint_dir(run, 2), model_filled(2.0), CFG, toks[2], train_state={"value": 2}, meta={"value": 2})
        prune_checkpoints(run, 2)
        save_model_dir(run, model_filled(2.0), CFG, toks[2], meta={"value": 2})
        assert _complete_save(run, toks) == (2.0, None)
        assert sorted(p.name for p in run.iterdir()) == [
            "checkpoints", "config.json", "log.jsonl", "model.safetensors", "tokenizer.model"
        ], k
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"], k
        assert sorted(p.name for p in checkpoint_dir(run, 2).iterdir()) == [
            "config.json", "model.safetensors", "tokenizer.model", "train_state.pt"
        ], k
    assert top_seen == {1.0, 2.0}
    assert listed_seen == {(0, 1), (0, 1, 2), (1, 2)}


def test_average(tmp_path: Path, tok_bytes: bytes) -> None:
    torch.manual_seed(0)
    a, b = build_model(CFG), build_model(CFG)
    save_model_dir(tmp_path / "a", a, CFG, tok_bytes, train_state={"step": 1}, meta={"step": 1})
    save_model_dir(tmp_path / "b", b, CFG, tok_bytes, meta={"step": 2})

    mean = average_checkpoints([tmp_path / "a", tmp_path / "b"])
    assert mean.keys() == a.state_dict().keys()
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(mean[name], (x + y) / 2, msg=name)

    write_average([tmp_path / "a", tmp_path / "b"], tmp_path / "avg")
    model, cfg, _, meta = load_model_dir(tmp_path / "avg")
    assert cfg == CFG and meta == {"step": 1, "averaged_from": [str(tmp_path / "a"), str(tmp_path / "b")]}
    assert load_train_state(tmp_path / "avg") is None
    assert model.src_embed.tokens.weight is model.tgt_embed.tokens.weight
    for name, x in model.state_dict().items():
        assert torch.equal(x, mean[name]), name

    other = CFG.replace(d_ff=48)
    save_model_dir(tmp_path / "c", build_model(other), other, tok_bytes)
    with pytest.raises(UserError, match="config differs") as info:
        average_checkpoints([tmp_path / "a", tmp_path / "c"])
    assert str(tmp_path / "a") in str(info.value) and str(tmp_path / "c") in str(info.value)
    save_model_dir(tmp_path / "d", Tied(), CFG, tok_bytes)  # same config, different tensors
    with pytest.raises(UserError, match="names or shapes differ"):
        average_checkpoints([tmp_path / "a", tmp_path / "d"])


def test_list_and_prune(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    names = ["step_00000300", "step_00000020", "step_100000000", "step_00001000", "step_12", ".tmp-step_00000005-9"]
    for name in names:
        (root / name).mkdir(parents=True)
    (root / "step_00000007").write_text("a file, not a checkpoint")
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step_00000020", "step_00000300", "step_00001000", "step_100000000"
    ]
    assert checkpoint_dir(tmp_path, 20) == root / "step_00000020"
    prune_checkpoints(tmp_path, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00001000", "step_100000000"]
    prune_checkpoints(tmp_path, 5)
    assert len(list_checkpoints(tmp_path)) == 2
    prune_checkpoints(tmp_path, 0)
    assert list_checkpoints(tmp_path) == [] and list_checkpoints(tmp_path / "nowhere") == []


def test_bad_model_dirs(tmp_path: Path, tok_bytes: bytes) -> None:
    def fails(path: Path, match: str) -> None:
        with pytest.raises(UserError, match=match) as info:
            load_model_dir(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)

    fails(tmp_path / "missing", "no such directory")
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", r"is not a model directory \(no config.json\)")

    good = tmp_path / "good"
    save_model_dir(good, build_model(CFG), CFG, tok_bytes, train_state={"step": 1})
    for name, content, match in [
        ("config.json", b"{not json", "invalid JSON"),
        ("config.json", b'{"model": {"d_model": 30}}', "bad model config"),
        ("config.json", b'{"meta": {}}', 'no "model" section'),
        ("tokenizer.model", b"junk", "bad tokenizer model"),
        ("model.safetensors", (good / "model.safetensors").read_bytes()[:-10], "not a valid weights file"),
        ("train_state.pt", b"junk", "cannot read training state"),
    ]:
        bad = tmp_path / f"bad-{name}-{len(content)}"
        shutil.copytree(good, bad)
        (bad / name).write_bytes(content)
        if name == "train_state.pt":
            with pytest.raises(UserError, match=match):
                load_train_state(bad)
        else:
            fails(bad, match)

    wrong = tmp_path / "wrong-shapes"
    shutil.copytree(good, wrong)
    save_weights(build_model(CFG.replace(d_ff=48)), wrong / "model.safetensors")
    fails(wrong, "weights do not fit the model")
    (wrong / "model.safetensors").unlink()
    fails(wrong, "has no model.safetensors")


def test_average_never_overwrites_a_checkpoint(tmp_path: Path, tok_bytes: bytes) -> None:
    """--out that is one of the inputs (however spelt), or another training checkpoint, is refused and untouched;
    so are checkpoints of different tokenizers, naming both paths."""
    run = tmp_path / "run"
    for step in (1, 2, 3):
        save_model_dir(checkpoint_dir(run, step), model_filled(step), CFG, tok_bytes, train_state={"value": step},
                       meta={"value": step})
    a, b, c = list_checkpoints(run)
    (tmp_path / "link").symlink_to(b)
    for out in (b, Path(f"{b}/."), tmp_path / "link", run / "checkpoints" / ".." / "checkpoints" / b.name):
        with pytest.raises(UserError, match="`out` is one of the checkpoints to average") as info:
            write_average([a, b], out)
        assert str(out) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UserError, match="`out` is a training checkpoint"):
        write_average([a, b], c)
    for path, value in ((a, 1), (b, 2), (c, 3)):  # untouched, train state included
        assert saved_value(path) == value and load_train_state(path) == {"value": value}

    other = Tokenizer.train(["zwei hunde spielen im schnee", "ein mann"] * 10, vocab_size=30).to_bytes()
    save_model_dir(tmp_path / "other", model_filled(4.0), CFG, other, meta={"value": 4.0})
    with pytest.raises(UserError, match="tokenizer differs") as info:
        write_average([a, tmp_path / "other"], tmp_path / "avg")
    assert str(a) in str(info.value) and str(tmp_path / "other") in str(info.value)
    assert not (tmp_path / "avg").exists()

    write_average([a, b], tmp_path / "avg")  # a model directory without train state may be replaced
    write_average([b, c], tmp_path / "avg")
    model, *_ = load_model_dir(tmp_path / "avg")
    assert torch.cat([p.flatten() for p in model.parameters()]).unique().tolist() == [2.5]


def fail_at(monkeypatch: pytest.MonkeyPatch, k: int, code: int = errno.ENOSPC) -> None:
    """Make the k-th file-system step (write, fsync, rename, unlink, mkdir, rmdir) raise OSError(code);
    a failed write leaves half its bytes, as a full disk does."""
    calls = [0]

    def step() -> bool:
        calls[0] += 1
        return calls[0] == k

    def wrap(fn):
        def failing(*args, **kwargs):
            if step():
                raise OSError(code, os.strerror(code))
            return fn(*args, **kwargs)

        return failing

    for name in ("replace", "rename", "fsync", "unlink", "rmdir", "mkdir"):
        monkeypatch.setattr(os, name, wrap(getattr(os, name)))
    write = files.write_synced

    def torn_write(path: Path, data: bytes) -> None:
        if step():
            Path(path).write_bytes(data[: len(data) // 2])
            raise OSError(code, os.strerror(code))
        write(path, data)

    monkeypatch.setattr(files, "write_synced", torn_write)


def fail_every_step(setup, save, check) -> int:
    """For k = 1, 2, ...: `setup`, run `save` failing at step k, `check(error)`; stops when `save` completes.

    Returns the number of failure points covered.
    """
    for k in range(1, 1000):
        setup()
        with pytest.MonkeyPatch.context() as mp:
            fail_at(mp, k)
            try:
                save()
                error = None
            except UserError as e:
                error = str(e)
        check(error)
        if error is None:
            return k - 1
    raise AssertionError("save never completed")


def litter(folder: Path) -> list[str]:
    """What a failed save must not leave: temporaries anywhere, .next files without a journal."""
    found = []
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            if ".tmp-" in name or (name.endswith(".next") and ".commit" not in names):
                found.append(name)
    return found


def test_failed_saves_leave_nothing_behind_and_say_where(tmp_path: Path, tok_bytes: bytes, one_thread,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A save failing at any step (full disk) raises one line naming the directory and the problem, removes the
    temporaries it made, and leaves the old model in force (or, once its journal is written, the new one)."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # a failing fsync is still a step: only the disk time goes
    run = tmp_path / "run"
    seen, messages = set(), set()

    def setup() -> None:
        shutil.rmtree(run, ignore_errors=True)
        save_model_dir(run, model_filled(1.0), CFG, tok_bytes, train_state={"value": 1.0}, meta={"value": 1.0})
        save_model_dir(checkpoint_dir(run, 5), model_filled(1.0), CFG, tok_bytes, meta={"value": 1.0})

    def save() -> None:  # a new checkpoint directory, then the top of the run replaced
        save_model_dir(checkpoint_dir(run, 6), model_filled(2.0), CFG, tok_bytes, meta={"value": 2.0})
        save_model_dir(run, model_filled(2.0), CFG, tok_bytes, train_state={"value": 2.0}, meta={"value": 2.0})

    def check(error: str | None) -> None:
        if error is not None:
            assert "\n" not in error and error.endswith(": cannot write: No space left on device"), error
            messages.add(error.split(": ")[0])
        assert litter(run) == [], error
        seen.add(saved_value(run))
        listed = list_checkpoints(run)
        assert listed[0] == checkpoint_dir(run, 5) and len(listed) <= 2
        for path in listed:
            saved_value(path)
        save()  # the next save recovers
        assert saved_value(run) == 2.0 and saved_value(checkpoint_dir(run, 6)) == 2.0
        assert sorted(p.name for p in run.iterdir()) == [
            "checkpoints", "config.json", "model.safetensors", "tokenizer.model", "train_state.pt"]

    assert fail_every_step(setup, save, check) > 30
    assert seen == {1.0, 2.0}
    assert messages == {str(checkpoint_dir(run, 6)), str(run)}


def test_failed_prune_and_atomic_write_say_where(tmp_path: Path, tok_bytes: bytes, monkeypatch) -> None:
    run = tmp_path / "run"
    for step in (1, 2):
        save_model_dir(checkpoint_dir(run, step), model_filled(step), CFG, tok_bytes, meta={"value": step})
    with pytest.MonkeyPatch.context() as mp:
        fail_at(mp, 1, errno.EROFS)
        with pytest.raises(UserError) as info:
            prune_checkpoints(run, 1)
    assert str(info.value) == f"{checkpoint_dir(run, 1)}: cannot delete: Read-only file system"
    assert [saved_value(p) for p in list_checkpoints(run)] == [1.0, 2.0]

    file = tmp_path / "log.jsonl"
    file.write_text("old\n")
    for k in (1, 2, 3):  # the write, its fsync, the rename
        with pytest.MonkeyPatch.context() as mp:
            fail_at(mp, k)
            with pytest.raises(UserError, match=rf"^{file}: cannot write: No space left on device$"):
                atomic_write_bytes(file, b"new\n")
        assert file.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl", "run"]


def test_tidy_run_finishes_or_undoes_interrupted_saves(tmp_path: Path, tok_bytes: bytes, monkeypatch) -> None:
    run = tmp_path / "run"
    save_model_dir(run, model_filled(1.0), CFG, tok_bytes, meta={"value": 1.0})
    for step in (1, 2):
        save_model_dir(checkpoint_dir(run, step), model_filled(step), CFG, tok_bytes, meta={"value": step})
    (run / "log.jsonl").write_text("log\n")
    (run / ".lock").write_text("pid 1\n")
    # RUN/: an uncommitted save (.next files, a journal's temporary) and an atomic write's temporary
    (run / "model.safetensors.next").write_bytes(b"half")
    (run / "config.json.next").write_bytes(b"{")
    (run / "..commit.tmp-123").write_text('["config.json"')
    (run / ".log.jsonl.tmp-77").write_text("half a log")
    # checkpoint 2: a committed save whose files were not all put in place yet
    step2 = checkpoint_dir(run, 2)
    (step2 / "model.safetensors.next").write_bytes((checkpoint_dir(run, 1) / "model.safetensors").read_bytes())
    (step2 / "config.json.next").write_bytes((checkpoint_dir(run, 1) / "config.json").read_bytes())
    (step2 / ".commit").write_text(json.dumps(["config.json", "model.safetensors", "tokenizer.model"]))
    # checkpoints/: a checkpoint half built, one half deleted
    (run / "checkpoints" / ".tmp-step_00000003-99").mkdir()
    (run / "checkpoints" / ".tmp-step_00000003-99" / "config.json").write_text("{")
    (run / "checkpoints" / ".del-step_00000000").mkdir()

    tidy_run(run)
    assert sorted(p.name for p in run.iterdir()) == [
        ".lock", "checkpoints", "config.json", "log.jsonl", "model.safetensors", "tokenizer.model"]
    assert saved_value(run) == 1.0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    assert sorted(p.name for p in step2.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert saved_value(step2) == 1.0  # rolled forward to the committed save

    def untouchable(*args, **kwargs):
        raise AssertionError("a tidy run was written to")

    for name in ("replace", "rename", "fsync", "unlink", "rmdir", "mkdir"):
        monkeypatch.setattr(os, name, untouchable)
    tidy_run(run)  # nothing left to do: nothing is written
    tidy_run(tmp_path / "nowhere")


def test_copy_model_dir(tmp_path: Path, tok_bytes: bytes) -> None:
    source = checkpoint_dir(tmp_path / "run", 4)
    save_model_dir(source, model_filled(4.0), CFG, tok_bytes, train_state={"value": 4.0}, meta={"value": 0.0})
    copy_model_dir(source, tmp_path / "run", meta={"value": 4.0})
    assert saved_value(tmp_path / "run") == 4.0 and load_train_state(tmp_path / "run") is None
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    assert modeldir.read_meta(tmp_path / "run") == {"value": 4.0}
    assert modeldir.read_meta(tmp_path / "nowhere") is None and modeldir.read_meta(source.parent) is None
