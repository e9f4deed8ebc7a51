"""Two file-system helpers that every part writing files shares (checkpoints, data folders)."""

from __future__ import annotations

import os
from pathlib import Path

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
