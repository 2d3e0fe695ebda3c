"""Whole-file writes that a crash or a full disk cannot leave half done.

The one atomic-write helper: the device runtime, the fleet tools and the server use it (it
lives in the torch-free core so that all of them may import it).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); best effort, the data itself is already on disk."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write a temp file beside `path`, fsync it, rename it over `path`.

    A reader (or a crash) sees the old file or the new one, never half of one. The temp file
    is created 0600 and given `mode` before any byte is written, so a secret is never readable
    by others, even briefly; without `mode` the file stays 0600. Errors are raised as they
    come (OSError), with the temp file removed.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
