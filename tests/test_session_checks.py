"""The session-wide check of the root conftest: a test session that leaves a process running
fails, names it and stops it; one that stops what it starts passes.

Each case is a separate pytest process (the check acts at the end of a session) in a folder
holding only the root conftest and one test file, so it imports neither package.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

LEAVES_A_DAEMON = """
import subprocess


def test_starts_a_daemon_and_leaves_it():
    # The shell exits at once; its background sleep is reparented away from pytest.
    subprocess.run(["sh", "-c", "sleep 300 & exit 0"], start_new_session=True, check=True)
"""

STOPS_ITS_PROCESS = """
import subprocess


def test_starts_a_process_and_stops_it():
    process = subprocess.Popen(["sleep", "300"])
    process.terminate()
    process.wait()
"""


def _session(folder: Path, test_file: str) -> subprocess.CompletedProcess:
    folder.mkdir()
    (folder / "conftest.py").write_text(CONFTEST.read_text())
    (folder / "test_case.py").write_text(test_file)
    (folder / "pytest.ini").write_text("[pytest]\n")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_case.py"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the check reads /proc (Linux)")
def test_a_session_that_leaves_a_process_running_fails_naming_it_and_stops_it(tmp_path):
    result = _session(tmp_path / "leaves", LEAVES_A_DAEMON)
    assert result.returncode == 1, result.stdout + result.stderr
    named = re.findall(r"pid (\d+): sleep 300", result.stdout)
    assert "the tests left 1 process(es) running, now stopped" in result.stdout
    assert len(named) == 1, result.stdout
    assert not _running(int(named[0]))


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the check reads /proc (Linux)")
def test_a_session_that_stops_what_it_starts_passes(tmp_path):
    result = _session(tmp_path / "stops", STOPS_ITS_PROCESS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "left" not in result.stdout
