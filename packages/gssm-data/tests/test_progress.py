"""Progress off a terminal: periodic plain lines (Slurm logs, CI), bars in the right units."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
from typer.testing import CliRunner

from gssm_data import generate as generate_module
from gssm_data.cli import app
from gssm_data.common.progress import (
    PeriodicProgress,
    default_every,
    progress_display,
    progress_mode,
)

runner = CliRunner()
SMALL = ["--preset", "debug", "--n", "200", "--n-test", "50", "--seq-len", "17", "--workers", "1"]
LINE = re.compile(r"^\d\d:\d\d:\d\d ")


def test_the_mode_follows_the_stream() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert progress_mode(stream=Terminal()) == "bar"
    assert progress_mode(stream=io.StringIO()) == "lines"
    assert progress_mode(quiet=True, stream=Terminal()) == "off"


def test_lines_are_printed_every_interval_without_a_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("gssm_data.common.progress.time.monotonic", lambda: clock[0])
    out = io.StringIO()
    console = Console(file=out, width=200)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    progress = progress_display(*columns, mode="lines", every=10.0, console=console)
    assert isinstance(progress, PeriodicProgress)
    with progress:
        task = progress.add_task("writing", total=10)
        progress.advance(task, 3)  # t = 0: no line yet
        clock[0] += 10.0
        progress.advance(task, 2)  # t = 10: a line saying 5/10
        clock[0] += 4.0
        progress.advance(task, 5)  # t = 14: too soon
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines  # the periodic line and the closing one
    assert all(LINE.match(line) for line in lines)
    assert lines[0].endswith("writing 5/10") and lines[1].endswith("writing 10/10")
    assert "━" not in out.getvalue()


def test_short_work_prints_nothing() -> None:
    out = io.StringIO()
    with progress_display(
        TextColumn("{task.description}"), mode="lines", every=60, console=Console(file=out)
    ) as progress:
        progress.advance(progress.add_task("quick", total=2), 2)
    assert out.getvalue() == ""


def test_the_interval_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GSSM_PROGRESS_EVERY", "5")
    assert default_every() == 5.0
    monkeypatch.setenv("GSSM_PROGRESS_EVERY", "soon")
    assert default_every() == 30.0


def test_generate_and_verify_log_progress_lines_off_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(generate_module, "TRAIN_ENTROPY_SEQUENCES", 64)
    monkeypatch.setenv("GSSM_PROGRESS_EVERY", "1e-9")  # a line at every update
    out = tmp_path / "debug.zarr"
    generated = runner.invoke(app, ["generate", *SMALL, "--out", str(out)])
    assert generated.exit_code == 0, generated.output
    assert generated.stdout.strip() == str(out.absolute())  # stdout keeps only the path
    log = generated.stderr.splitlines()
    writing = [line for line in log if "writing blocks" in line]
    assert writing and all(LINE.match(line) for line in writing)
    assert "tok/s" in writing[-1]
    checking = [line for line in log if "verifying blocks" in line]
    assert checking and "blocks/s" in checking[-1] and "tok/s" not in checking[-1]
    assert any("entropy of test" in line and "sequences" in line for line in log)
    verified = runner.invoke(app, ["verify", str(out)])
    assert verified.exit_code == 0, verified.output
    assert any(
        line.startswith(tuple("0123456789")) and "blocks" in line
        for line in verified.stderr.splitlines()
    )
