"""Fault-injection sweep: a tiny training run, killed or failing at any one of its file operations, resumes
exactly and never loses its best model.

The file operations are those of the run directory's writer (training/modeldir.py, training/loop.py,
training/run.py, files.py): os.mkdir, os.rmdir, os.unlink, os.rename, os.replace, os.fsync, shutil.rmtree, and
every open() for writing and write() of a file (torn: half its bytes reach the file first). A dry run
counts them, K in all. Then, for k = 1..K and each mode:

* kill: the process SIGKILLs itself at operation k;
* fail: operation k raises OSError (ENOSPC for writes and fsyncs, EACCES for the others); the command
  must exit with status 2 and one line naming a path and the problem, and leave no temporary files
  (only a written journal's .next files, which are the new checkpoint, and .del-* folders of a prune);

and the same command with --resume must then finish the run as an uninterrupted run does: the same
per-step losses and validations in log.jsonl (no gaps, no duplicates), the same checkpoints (every one
loads; weights and optimiser state equal), nothing else in the run directory, and at its top the true
best model (the weights of the checkpoint of the best validation, taken from a reference run that keeps
every checkpoint).

Two commands are swept: `translation` (the tiny run of the issue; its BLEU stays 0, so the first
validation stays the best and its checkpoint is pruned long before the end) and `lm` (the validation
loss improves every time, so the best model at the top is replaced at every validation).

Each run is a fork of this process (torch imported, nothing computed: no OpenMP pool to inherit), one
thread; fsync is made a no-op, as durability against power loss is not under test.

    python scripts/fault_sweep.py                   # the full sweep (several minutes)
    python scripts/fault_sweep.py --every 5         # every 5th point of each mode and command
    python scripts/fault_sweep.py --every 0 --window lm   # the edges of each copy of the best model

Prints "N kill points and M failure points: all resumed exactly" and exits 0, or lists the points
that did not and exits 1. --json FILE writes the details.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import sys
import sysconfig
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

torch.set_num_threads(1)

# Imported by every run's first validation or optimiser step: importing them once, before the forks,
# saves each run most of a second.
import sacrebleu.tokenizers  # noqa: E402, F401
import torch._dynamo  # noqa: E402, F401

from transformer.cli import main  # noqa: E402 - after the thread setting
from transformer import files  # noqa: E402
from transformer.corpora import multi30k_dir, tinyshakespeare_path  # noqa: E402
from transformer.store import modeldir  # noqa: E402
from transformer.training import checkpoint, loop, run  # noqa: E402

OS_OPS = ("mkdir", "rmdir", "unlink", "rename", "replace", "fsync")
OURS = {os.path.realpath(m.__file__) for m in (checkpoint, modeldir, loop, run, files)}
_LIBS = tuple({sysconfig.get_paths()[k] for k in ("purelib", "platlib")})
_STDLIB = sysconfig.get_paths()["stdlib"]


def _passed_through(filename: str) -> bool:
    """Whether a frame of `filename` is looked through to find who made an operation: the standard library
    (pathlib, shutil, os), and this script's wrappers (the operations inside a wrapped shutil.rmtree)."""
    if filename == __file__:
        return True
    return filename.startswith("<frozen") or (filename.startswith(_STDLIB) and not filename.startswith(_LIBS))


class Faults:
    """Counts the run directory's file operations in this process and faults the `at`-th (1-based).

    mode: "count" (no fault), "kill" (SIGKILL) or "fail" (OSError). With `trace`, records for each
    operation what it was and which part of the run made it.
    """

    def __init__(self, mode: str = "count", at: int = 0, out: Path | None = None, trace: bool = False) -> None:
        self.mode, self.at, self.out, self.trace = mode, at, out, trace
        self.count = 0
        self.ops: list[list] = []

    # -- which operations count
    def _ours(self, depth: int) -> bool:
        """Whether the caller `depth` frames up (through the standard library) is the run directory's writer."""
        frame = sys._getframe(depth)
        while frame is not None and _passed_through(frame.f_code.co_filename):
            frame = frame.f_back
        return frame is not None and os.path.realpath(frame.f_code.co_filename) in OURS

    def _label(self) -> str:
        """The part of the run that makes the current operation: best, checkpoint step_N, prune, log, ..."""
        frame = sys._getframe(3)
        while frame is not None:
            name, where = frame.f_code.co_name, frame.f_locals
            if name in ("save_model_dir", "copy_model_dir"):
                path = Path(where.get("path", where.get("dst", "")))
                return "best" if self.out is not None and path == self.out else f"checkpoint {path.name}"
            if name in ("prune_checkpoints", "tidy_run", "append_text", "atomic_write_bytes", "_trim_log"):
                return {"append_text": "log", "atomic_write_bytes": "atomic write", "_trim_log": "trim log",
                        "prune_checkpoints": "prune", "tidy_run": "tidy"}[name]
            frame = frame.f_back
        frame = sys._getframe(3)
        while frame is not None and os.path.realpath(frame.f_code.co_filename) not in OURS:
            frame = frame.f_back
        return frame.f_code.co_name if frame is not None else "?"

    def hit(self, op: str) -> bool:
        """Count an operation; True when it is the one to fault."""
        self.count += 1
        if self.trace:
            self.ops.append([op, self._label()])
        return self.count == self.at and self.mode != "count"

    def fire(self, op: str) -> None:
        if self.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        code = errno.ENOSPC if op in ("write", "fsync") else errno.EACCES
        raise OSError(code, os.strerror(code))

    # -- the wrappers
    def _wrap_os(self, op: str, fn: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            if self._ours(2) and self.hit(op):
                self.fire(op)
            if op == "fsync":
                return None  # durability is not under test: save the disk time
            return fn(*args, **kwargs)

        return wrapped

    def _open(self, file, mode="r", *args, **kwargs):
        if not any(c in mode for c in "wax+"):
            return open(file, mode, *args, **kwargs)
        if self.hit("open"):
            self.fire("open")
        return _TornFile(open(file, mode, *args, **kwargs), self)

    def install(self) -> "Faults":
        for op in OS_OPS:
            setattr(os, op, self._wrap_os(op, getattr(os, op)))
        shutil.rmtree = self._wrap_os("rmtree", shutil.rmtree)
        files.open = self._open  # files.py's own open(): every write of a file and of the log
        return self


class _TornFile:
    """A file opened for writing whose write() is a counted operation; a faulted write leaves half its data."""

    def __init__(self, file, faults: Faults) -> None:
        self._file, self._faults = file, faults

    def write(self, data):
        if self._faults.hit("write"):
            self._file.write(data[: len(data) // 2])
            self._file.flush()
            self._faults.fire("write")
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._file.__exit__(*exc)


def in_child(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Run `fn` in a forked child; (its exit status, or -signal; what it returned, or None)."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(reader)
        code = 70
        try:
            result = fn()
            with os.fdopen(writer, "w") as f:
                json.dump(result, f)
            code = 0
        except BaseException:  # noqa: B036 - reported to the parent, whatever it is
            with contextlib.suppress(Exception), os.fdopen(writer, "w") as f:
                json.dump({"crash": traceback.format_exc()}, f)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(writer)
    with os.fdopen(reader) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), (json.loads(text) if text else None)


def _command(argv: list[str]) -> tuple[int, str]:
    """main(argv) with stdout dropped and stderr captured: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def _digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(name.encode())
        if isinstance(t, torch.Tensor):
            h.update(repr((t.dtype, tuple(t.shape))).encode())
            h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(t).encode())
    return h.hexdigest()


def _flat_tensors(obj, prefix="") -> dict:
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flat_tensors(val, f"{prefix}{key}.").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in _flat_tensors(val, f"{prefix}{i}.").items()}
    return {prefix: obj}


def summary(out: Path, metric: str) -> dict:
    """What a finished run left: its log, its checkpoints (every one loaded) and the model at its top."""
    records = [json.loads(line) for line in (out / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    result: dict[str, Any] = {
        "train": [[r["step"], r["loss"], r["lr"]] for r in records if r["kind"] == "train"],
        "valid": [{k: v for k, v in r.items() if k not in ("kind", "elapsed_s")}
                  for r in records if r["kind"] == "valid"],
        "files": sorted(os.listdir(out)),
        "checkpoints": {},
    }
    for path in checkpoint.list_checkpoints(out):
        model, *_ = modeldir.load_model_dir(path)
        state = modeldir.load_train_state(path)
        result["checkpoints"][path.name] = {
            "weights": _digest(model.state_dict()),
            "optimizer": _digest(_flat_tensors(state["optimizer"])),
            "state": [state["step"], state["best"], state.get("best_step")],
            "files": sorted(os.listdir(path)),
        }
    model, _, _, meta = modeldir.load_model_dir(out)
    result["top"] = {"weights": _digest(model.state_dict()), "best_step": meta["best"]["step"]}
    return result


def _leftovers(out: Path) -> list[str]:
    """Temporaries a failed command must not leave: *.tmp-* anywhere, .next files without a journal."""
    found = []
    for folder, dirs, names in os.walk(out):
        for name in dirs + names:
            if ".tmp-" in name or (name.endswith(".next") and ".commit" not in names):
                found.append(os.path.relpath(os.path.join(folder, name), out))
    return found


class Command:
    """One swept command: its arguments, best-metric rule, and reference results."""

    def __init__(self, name: str, argv: Callable[[Path], list[str]], metric: str, higher: bool) -> None:
        self.name, self.argv, self.metric, self.higher = name, argv, metric, higher
        self.tolerated = 0  # failure points that the command got past without an error

    def prepare(self, work: Path) -> None:
        """Reference runs: the command as swept (with a trace of its operations) and one keeping every checkpoint."""
        self.work = work / self.name
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        out = self.work / "reference"

        def reference():
            faults = Faults(out=out, trace=True).install()
            code, err = _command(self.argv(out))
            assert code == 0, err
            return {"ops": faults.ops, "summary": summary(out, self.metric)}

        def keep_all():
            Faults().install()
            every = self.work / "every-checkpoint"
            code, err = _command(self.argv(every) + ["--keep-last", "1000"])
            assert code == 0, err
            return summary(every, self.metric)

        for fn in (reference, keep_all):
            status, result = in_child(fn)
            if status != 0:
                raise SystemExit(f"{self.name}: reference run failed: {result}")
            if fn is reference:
                self.ops, self.reference = result["ops"], result["summary"]
            else:
                self.all = result
        valid = self.reference["valid"]
        best = valid[0]
        for record in valid[1:]:
            if (record[self.metric] > best[self.metric]) if self.higher else (record[self.metric] < best[self.metric]):
                best = record
        self.best_step = best["step"]
        self.best_weights = self.all["checkpoints"][f"step_{self.best_step:08d}"]["weights"]
        problems = []
        if self.reference["top"] != {"weights": self.best_weights, "best_step": self.best_step}:
            problems.append("the reference run's top model is not its best checkpoint")
        for name, saved in self.reference["checkpoints"].items():
            if saved["weights"] != self.all["checkpoints"][name]["weights"]:
                problems.append(f"{name} differs between the reference runs")
        if problems:
            raise SystemExit(f"{self.name}: " + "; ".join(problems))

    def _failed(self, out: Path, k: int, status: int, result: dict | None) -> str | None:
        """What is wrong with how a command that failed at operation k ended, or None."""
        if status != 0 or result is None or "crash" in result:
            return f"the command crashed: {result}"
        if result["code"] == 0:  # an error the code expects and gets past (mkdir of an existing folder):
            self.tolerated += 1  # the run must be whole all the same
            return None
        # stderr holds the run's progress lines, then the error: one line, and nothing after it
        lines = result["stderr"].strip().splitlines()
        errors = [line for line in lines if ": error: " in line]
        if result["code"] != 2 or errors != lines[-1:] or "Traceback" in result["stderr"]:
            return f"exit {result['code']}, stderr {result['stderr']!r}"
        reason = os.strerror(errno.ENOSPC if self.ops[k - 1][0] in ("write", "fsync") else errno.EACCES)
        if ": cannot " not in errors[0] or not errors[0].endswith(reason) or str(out) not in errors[0]:
            return f"the error does not name a path and the problem: {errors[0]!r}"
        left = _leftovers(out)
        return f"left {left} after: {errors[0]}" if left else None

    def point(self, mode: str, k: int) -> str | None:
        """Fault operation k in `mode`, resume, compare; None when all is well, else what went wrong."""
        out = self.work / f"{mode}-{k:04d}"
        shutil.rmtree(out, ignore_errors=True)

        def faulted():
            faults = Faults(mode, k).install()
            code, err = _command(self.argv(out))
            return {"code": code, "stderr": err, "count": faults.count}

        status, result = in_child(faulted)
        where = f"{self.name} {mode} at operation {k} ({'/'.join(self.ops[k - 1])})"
        if mode == "kill" and status != -signal.SIGKILL:
            return f"{where}: not killed (status {status}): {result}"
        if mode == "fail":
            problem = self._failed(out, k, status, result)
            if problem:
                return f"{where}: {problem}"

        def resumed():
            Faults().install()
            code, err = _command(self.argv(out) + ["--resume"])
            if code != 0:
                return {"error": err}
            return summary(out, self.metric)

        status, got = in_child(resumed)
        if status != 0 or got is None or "crash" in got or "error" in got:
            return f"{where}: resuming failed: {got}"
        problems = []
        for key in ("train", "valid", "files"):
            if got[key] != self.reference[key]:
                problems.append(f"{key}: {got[key]} instead of {self.reference[key]}")
        if got["checkpoints"].keys() != self.reference["checkpoints"].keys():
            problems.append(f"checkpoints {sorted(got['checkpoints'])} instead of "
                            f"{sorted(self.reference['checkpoints'])}")
        else:
            for name, saved in got["checkpoints"].items():
                want = self.reference["checkpoints"][name]
                for key in ("weights", "optimizer", "files", "state"):
                    if saved[key] != want[key]:
                        problems.append(f"{name}: its {key} differs")
        if got["top"] != {"weights": self.best_weights, "best_step": self.best_step}:
            problems.append(f"the top model is not the best (step {self.best_step}): its best_step is "
                            f"{got['top']['best_step']}"
                            + ("" if got["top"]["weights"] == self.best_weights else ", other weights"))
        if problems:
            return f"{where}: " + "; ".join(problems)
        shutil.rmtree(out)
        return None


def commands(data: Path, text: Path) -> dict[str, Command]:
    common = ["--preset", "tiny", "--warmup", "4", "--log-every", "1", "--valid-every", "3", "--max-steps", "7",
              "--keep-last", "2", "--seed", "3", "--no-progress"]
    return {
        "translation": Command("translation", lambda out: [
            "train", "--data", str(data), "--out", str(out), "--vocab-size", "400", "--max-tokens", "400",
            "--valid-bleu-lines", "5", *common], "bleu", True),
        "lm": Command("lm", lambda out: [
            "lm", "train", "--text", str(text), "--out", str(out), "--vocab", "char", "--block-size", "32",
            "--batch-size", "8", "--eval-batches", "2", *common], "loss", False),
    }


def select(ops: list[list], every: int, offset: int, window: bool) -> list[int]:
    """Operation numbers (1-based) to fault: every `every`-th from `offset`, and with `window` the edges of
    each copy of the best model to the top: its first operation (the checkpoint is written, the top still
    holds the old best), the journal's commit (its os.replace) and the operation after it (committed, the
    files not yet in place)."""
    chosen = set(range(offset, len(ops) + 1, every)) if every else set()
    if window:
        k = 1
        while k <= len(ops):
            if ops[k - 1][1] != "best":
                k += 1
                continue
            end = k
            while end + 1 <= len(ops) and ops[end][1] == "best":
                end += 1
            commits = [j for j in range(k, end + 1) if ops[j - 1][0] == "replace"]
            chosen |= {k} | ({commits[0], commits[0] + 1} if commits else set())
            k = end + 1
    return sorted(chosen)


def _make_data(work: Path) -> Path:
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 200), ("valid", 20)):
        for lang in ("en", "de"):
            lines = (multi30k_dir() / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()[:n]
            (data / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return data


def sweep(args: argparse.Namespace) -> dict:
    if args.work is None:
        with tempfile.TemporaryDirectory(prefix="fault-sweep-") as work:
            return sweep(argparse.Namespace(**{**vars(args), "work": work}))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else _make_data(work)
    text = work / "lm.txt"
    text.write_text(tinyshakespeare_path().read_text(encoding="utf-8")[:20000], encoding="utf-8")
    start = time.perf_counter()
    report: dict[str, Any] = {"points": {"kill": 0, "fail": 0}, "failures": [], "commands": {}}
    for name in args.commands:
        cmd = commands(data, text)[name]
        cmd.prepare(work)
        counts: dict[str, int] = {}
        for op, label in cmd.ops:
            counts[label] = counts.get(label, 0) + 1
        report["commands"][name] = entry = {"operations": len(cmd.ops), "by_part": counts, "best_step": cmd.best_step}
        for mode in args.modes:
            offset = args.offset if mode == "kill" else args.offset + args.every // 2
            window = args.window is not None and (not args.window or name in args.window)
            for k in select(cmd.ops, args.every, max(offset, 1), window):
                problem = cmd.point(mode, k)
                report["points"][mode] += 1
                if problem:
                    report["failures"].append(problem)
                    print(problem, file=sys.stderr, flush=True)
        entry["tolerated_failures"] = cmd.tolerated
        print(f"{name}: {len(cmd.ops)} file operations {counts}; best validation at step {cmd.best_step}; "
              f"{cmd.tolerated} failure(s) got past without an error", file=sys.stderr, flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    return report


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--every", type=int, default=1, help="fault every N-th operation (0: none but --window's)")
    p.add_argument("--offset", type=int, default=1, help="the first operation to fault (failures: + every/2)")
    p.add_argument("--window", nargs="*", choices=["translation", "lm"],
                   help="also the edges of each copy of the best model (of these commands; default all)")
    p.add_argument("--modes", nargs="+", choices=["kill", "fail"], default=["kill", "fail"])
    p.add_argument("--commands", nargs="+", choices=["translation", "lm"], default=["translation", "lm"])
    p.add_argument("--data", help="a folder of train/valid .en/.de files (default: Multi30k's first 200/20 lines)")
    p.add_argument("--work", help="scratch folder, where the runs of points that fail are kept (default: a "
                                  "temporary folder, removed at the end)")
    p.add_argument("--json", help="write the report to this file")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse()
    report = sweep(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    kills, fails = report["points"]["kill"], report["points"]["fail"]
    if report["failures"]:
        print(f"{len(report['failures'])} of {kills + fails} points did not resume exactly", flush=True)
        sys.exit(1)
    print(f"{kills} kill points and {fails} failure points: all resumed exactly ({report['seconds']} s)", flush=True)
