"""What every test session checks, whatever it selects: it leaves no process running.

Tests stop every process they start (a launcher, a rank, a store writer, a daemon). The
session sets a marker in its environment, which every process started from it inherits
unless a test clears the environment; a process still carrying the marker when the session
ends (besides pytest and the helpers Python's multiprocessing keeps until exit) fails the
session, is named, and is then stopped. wandb's service, which an in-process run starts and
wandb keeps until the interpreter exits, is stopped through wandb first. Linux only (it
reads /proc); elsewhere it checks nothing.

Every test also leaves the process's signal handlers as it found them. A run preempted
in-process leaves SIGTERM and SIGUSR1 ignored on purpose (its process is on its way out,
`PreemptionWatch`), and an ignored signal is inherited by every process started later:
a later test's `terminate()` of its own child would then wait forever.
"""

from __future__ import annotations

import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

MARKER = "GSSM_TEST_SESSION"
# How long a process that is already stopping gets before it counts as left running.
GRACE_S = 5.0
PROC = Path("/proc")


# The signals a test may redirect: preemption (SIGTERM, SIGUSR1), submitit's warning
# (SIGUSR2), Ctrl-C (SIGINT).
RESTORED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)


@pytest.fixture(autouse=True)
def _signal_handlers_restored() -> Iterator[None]:
    """The signal handlers each test found, given back after it."""
    found = {sig: signal.getsignal(sig) for sig in RESTORED_SIGNALS}
    yield
    for sig, handler in found.items():
        if handler is not None and signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)


def pytest_sessionstart(session: pytest.Session) -> None:
    os.environ[MARKER] = f"{os.getpid()}-{time.time_ns()}"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    marker = os.environ.pop(MARKER, None)
    if marker is None or not PROC.is_dir():
        return
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        wandb.teardown()
    left = _wait_gone(marker, GRACE_S)
    if not left:
        return
    named = "; ".join(f"pid {pid}: {command}" for pid, command in sorted(left.items()))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line(
            f"error: the tests left {len(left)} process(es) running, now stopped: {named}",
            red=True,
        )
    _stop(left)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _wait_gone(marker: str, grace_s: float) -> dict[int, str]:
    """The processes carrying `marker` still running after at most `grace_s` seconds."""
    deadline = time.monotonic() + grace_s
    while True:
        left = _carrying(marker)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def _carrying(marker: str) -> dict[int, str]:
    """pid -> command line of the live processes whose environment holds `marker`."""
    needle = f"{MARKER}={marker}".encode()
    spared = {os.getpid(), *_multiprocessing_helpers()}
    found = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) in spared:
            continue
        try:
            # A zombie (already exited, not yet reaped) has an empty environment.
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or another user's
            continue
        found[int(entry.name)] = command.strip()[:200]
    return found


def _multiprocessing_helpers() -> set[int]:
    """The resource tracker and fork server of this process: they end when pytest does."""
    pids = {
        getattr(multiprocessing.resource_tracker._resource_tracker, "_pid", None),
        getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None),
    }
    return {pid for pid in pids if pid is not None}


def _stop(processes: dict[int, str]) -> None:
    """SIGTERM, then SIGKILL for what is still there after the grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes:
            try:
                os.kill(pid, sig)
            except OSError:
                continue
        deadline = time.monotonic() + GRACE_S
        while time.monotonic() < deadline and any(_alive(pid) for pid in processes):
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        state = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
