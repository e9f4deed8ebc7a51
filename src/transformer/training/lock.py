"""One training command at a time per run directory, and never into someone else's folder.

`locked_run(out)` holds an exclusive `fcntl.flock` on ``out/.lock`` for as long as a run
trains. A second command on the same directory is refused at once with a line naming the
process that holds it; the lock goes with its process, however that ends (a SIGKILL
included), so a stale lock file never blocks a later `--resume`. A directory that holds
files but is no run of this tool (no ``checkpoints/``, no ``log.jsonl``) is refused, so
that a mistyped ``--out`` never overwrites a user's own ``config.json`` or weights. When
the run is interrupted (^C), it says from which step ``--resume`` will continue.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
from pathlib import Path
from typing import Callable, Iterator

from transformer.errors import UserError

LOCK = ".lock"
RUN_MARKERS = ("checkpoints", "log.jsonl", LOCK)


def check_run_dir(out: Path) -> None:
    """`UserError` when `out` exists and is not a folder this tool can train into."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another `out`")
    if out.is_dir() and any(out.iterdir()) and not any((out / name).exists() for name in RUN_MARKERS):
        raise UserError(f"{out}: a folder that holds files but no training run; choose an empty or new `out`")


def _last_step(out: Path) -> int | None:
    from transformer.training.checkpoint import list_checkpoints

    checkpoints = list_checkpoints(out)
    return int(checkpoints[-1].name.removeprefix("step_")) if checkpoints else None


@contextlib.contextmanager
def locked_run(out: Path, say: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the run directory `out` (created if needed) for the duration of the block; see the module docstring."""
    out = Path(out)
    check_run_dir(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"{out}: cannot write ({e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            raise UserError(f"{out}: another training command is using this run ({holder}); wait for it, "
                            "or choose another `out`") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)}\n".encode(), 0)
        try:
            yield
        except KeyboardInterrupt:
            step = _last_step(out)
            say(f"interrupted; `resume` continues from step {step} (the last checkpoint)" if step is not None
                else "interrupted before the first checkpoint; `resume` starts the run again")
            raise
    finally:
        os.close(fd)  # releases the lock


def guard(out: Path, say: Callable[[str], None] = print):
    """`locked_run(out)` in the process that writes the run (rank 0 under torchrun); nothing in the others."""
    from transformer.training.distributed import env_world

    return locked_run(out, say) if env_world().main else contextlib.nullcontext()
