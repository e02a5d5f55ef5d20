"""Atomic file writes: a reader sees the old file or the new one, never a part of one.

One helper for both packages (stores' small metadata files, run directories'
records): the content is fsynced before the rename and the folder after it,
so a crash or a full disk never leaves a torn or empty file behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: str | Path, content: str | bytes) -> Path:
    """Replace `path` with `content` so that a reader sees the old file or the new, never a part.

    The content goes to a temporary file in the same folder, is fsynced, and is
    renamed over `path`; the folder is then fsynced so the rename survives a crash.
    A failure (a full disk, a path that is a folder) leaves the old file as it was and
    raises an OSError that names `path`, not the temporary file.
    """
    path = Path(path)
    data = content.encode() if isinstance(content, str) else content
    try:
        descriptor, temporary = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
        )
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(path)) from None
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise OSError(error.errno, error.strerror, str(path)) from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def fsync_directory(path: str | Path) -> None:
    """Make a folder's entries (new files, renames) durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
