"""Atomic file operations: every part of the package that writes files writes them through here.

A file is replaced atomically (`atomic_write_bytes`, `atomic_write_blocks`): written and fsynced
as a temporary sibling ``.<name>.tmp-<pid>``, renamed over the file, and the folder fsynced, so
that after a crash the path holds the old content or the new, never a mix. A folder is created
atomically (`write_folder`): filled as the sibling ``.tmp-<name>-<pid>`` and renamed into place.
A failure removes the temporaries and raises a one-line `UserError` naming the path and the
problem (``runs/x/log.jsonl: cannot write: No space left on device``).
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

from transformer.errors import UserError


def cannot(path: Path, doing: str, error: OSError) -> UserError:
    """The one-line error of a failed file operation: ``PATH: cannot DOING: reason``."""
    return UserError(f"{path}: cannot {doing}: {error.strerror or error}")


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (creations, renames, deletions) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it (not atomic on its own)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def discard(paths: Iterable[Path]) -> None:
    """Delete what a failed write left, as far as possible: the write's own error is the one to report."""
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass


def tmp_name(path: Path) -> Path:
    """The temporary sibling an atomic write of `path` goes through."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def is_tmp_file(name: str) -> bool:
    """Whether `name` is the temporary of an atomic write (``.<file>.tmp-<pid>``)."""
    return name.startswith(".") and ".tmp-" in name[1:]


def tmp_target(name: str) -> str:
    """The name of the file that the temporary `name` (``.<file>.tmp-<pid>``) was to replace."""
    return name[1:].rsplit(".tmp-", 1)[0]


def _replace_with(path: Path, write: Callable[[Path], None]) -> None:
    """Replace `path` with what `write(tmp)` writes (and fsyncs) into its temporary sibling: the temporaries of
    killed earlier writes removed first, then the rename and the folder's fsync. Raises OSError, and leaves
    no temporary file, when it fails."""
    for stale in path.parent.glob(glob.escape(f".{path.name}.tmp-") + "*"):
        stale.unlink(missing_ok=True)
    tmp = tmp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        discard([tmp])
        raise
    fsync_dir(path.parent)


def replace_file(path: Path, data: bytes) -> None:
    """`atomic_write_bytes` raising OSError, and leaving no temporary file when it fails."""
    _replace_with(path, lambda tmp: write_synced(tmp, data))  # looked up at call time: the fault tests tear it


def atomic_write_blocks(path: Path, blocks: Iterable[bytes]) -> tuple[int, str]:
    """Replace `path` with the concatenated `blocks`, written as they come, old or new even after a crash;
    (size, sha256 hex). `UserError` ("PATH: cannot write: reason") when it fails; the old content stays."""
    digest, size = hashlib.sha256(), 0

    def write(tmp: Path) -> None:
        nonlocal size
        with open(tmp, "wb") as f:
            for block in blocks:
                f.write(block)
                digest.update(block)
                size += len(block)
            f.flush()
            os.fsync(f.fileno())

    path = Path(path)
    try:
        _replace_with(path, write)
    except OSError as e:
        raise cannot(path, "write", e) from None
    return size, digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that it holds either the old or the new content, even after a crash.

    `UserError` ("PATH: cannot write: reason") when it fails; the old content then stays.
    """
    path = Path(path)
    try:
        replace_file(path, data)
    except OSError as e:
        raise cannot(path, "write", e) from None


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 `text`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def append_text(path: Path, text: str) -> None:
    """Append `text` to the file `path` (a log); `UserError` naming it when that fails.

    Not atomic: a crash may leave the last line cut short, which readers of a log skip.
    """
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise cannot(path, "write", e) from None


def check_new_folder(out: Path) -> None:
    """`UserError` unless `out` is absent or an empty folder (a new folder never writes over files)."""
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out}: folder is not empty; give a new folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file, not a folder")


def write_folder(out: Path, fill: Callable[[Path], None]) -> None:
    """Create the folder `out` (absent or empty) holding what `fill(tmp)` writes into an empty folder `tmp`.

    `tmp` is the sibling ``.tmp-<name>-<pid>``; once filled, its files are fsynced and it is
    renamed to `out`, so a crash leaves `out` complete or absent. On failure `tmp` is removed.
    """
    out = Path(out)
    check_new_folder(out)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        fill(tmp)
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        if out.is_dir():
            out.rmdir()  # empty (checked above): rename needs the name free or an empty folder
        os.rename(tmp, out)
        fsync_dir(out.parent)  # the rename itself survives a crash
    except OSError as e:
        raise cannot(out, "write", e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
