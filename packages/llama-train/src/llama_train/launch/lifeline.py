"""Worker processes that die with their parent, however the parent dies.

`study run --parallel K` trains points in spawned worker processes. When the
study process is killed with SIGKILL it cannot tell them to stop, and an
orphaned worker would keep training and writing its run directory while the
user's rerun of the same command starts another writer there. On Linux the
kernel delivers a signal to a process whose parent exits
(``prctl(PR_SET_PDEATHSIG)``), set from the worker's initializer. Elsewhere, and
as a second line on Linux, a daemon thread polls the parent's pid once a second.
The signal is SIGKILL: the run directory's checkpoints are atomic, so the rerun
resumes from the last one, exactly as after a kill -9 of a single run.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1
POLL_SECONDS = 1.0


def die_with_parent(parent_pid: int) -> None:
    """Make this process end when `parent_pid` (the process that started it) ends."""
    if sys.platform.startswith("linux"):
        _set_parent_death_signal(signal.SIGKILL)
    # The parent may have died before the signal was armed (the kernel would not send it):
    # the thread's first look catches that, and it covers systems without prctl.
    watcher = threading.Thread(target=_watch, args=(parent_pid,), name="parent-watch", daemon=True)
    watcher.start()
    if os.getppid() != parent_pid:
        _die()


def _set_parent_death_signal(signum: int) -> None:
    with contextlib.suppress(OSError, AttributeError):  # no libc found: the poll remains
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(POLL_SECONDS)
    _die()


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
