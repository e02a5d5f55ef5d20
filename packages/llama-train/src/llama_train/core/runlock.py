"""One training process per run directory, enforced with an fcntl lock.

Two `llama-train run` on the same run.dir would interleave metrics, race on
config.yaml and, worse, each checkpoint save removes the hidden temporary
folders it finds, which are the other run's save in progress. The first run
therefore holds an exclusive `flock` on ``<run.dir>/.lock`` until it exits; a
second one fails at once with one line naming the holder (pid and host, from
the file's content). The kernel drops the lock when the process dies, however
it dies, so there is never a stale lock to clean up. The lock file itself is
left in place: deleting it would let a third process lock a new file while a
second still holds the old one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from llama_train.errors import LlamaTrainError

LOCK_FILENAME = ".lock"


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold the run directory's lock for the block (creating the directory); yield its path."""
    with directory_lock(
        run_dir,
        LOCK_FILENAME,
        busy="is in use by another training run",
        advice="wait for it to end or set another run.dir",
    ) as path:
        yield path


@contextlib.contextmanager
def directory_lock(
    directory: str | Path, filename: str, *, busy: str, advice: str
) -> Iterator[Path]:
    """Hold an exclusive flock on ``directory/filename`` for the block, or fail at once
    with one line: ``<directory> <busy> (<holder>); <advice>``."""
    directory = Path(directory)
    path = directory / filename
    try:
        directory.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise LlamaTrainError(f"cannot lock {directory}: {error.strerror or error}") from None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LlamaTrainError(
                    f"cannot lock {directory}: {error.strerror or error}"
                ) from None
            raise LlamaTrainError(f"{directory} {busy} ({_holder(descriptor)}); {advice}") from None
        os.ftruncate(descriptor, 0)
        holder = f"pid {os.getpid()} on {socket.gethostname()} since "
        holder += datetime.now(UTC).isoformat(timespec="seconds")
        os.pwrite(descriptor, holder.encode(), 0)
        yield path
    finally:
        os.close(descriptor)  # releases the lock


def _holder(descriptor: int) -> str:
    """Who holds the lock, as the holder wrote it (best effort: it may be mid-write)."""
    try:
        text = os.pread(descriptor, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "holder unknown"
