"""A full disk while a run or a study writes: one line, nothing half-written left under a
final name, and the same command resumes once space is free.

The disk fills at the system call: `os.fsync` (every atomic writer fsyncs its temporary
file before renaming it into place) or safetensors' writer raises ENOSPC for the files
a test names, exactly as the kernel reports a full disk.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import yaml
from safetensors import SafetensorError
from typer.testing import CliRunner

from llama_train.cli import app
from llama_train.core import weights

runner = CliRunner()
FULL = "No space left on device; free some space and run the same command again"


@pytest.fixture(scope="module")
def store(make_debug_store) -> Path:
    return make_debug_store(n_train=96, n_test=16, seq_len=9, block_size=32)


def _config(tmp_path: Path, store: Path, run_dir: Path) -> Path:
    config = tmp_path / f"{run_dir.name}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"path": str(store), "batch_size": 8},
                "model": {"dim": 16, "n_layers": 1, "n_heads": 2},
                "train": {"steps": 4, "progress": False, "threads": 1, "log_every": 1},
                "eval": {"every": 2},
                "checkpoint": {"every": 2},
                "run": {"dir": str(run_dir)},
            }
        )
    )
    return config


def _one_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def _fill_disk_for(monkeypatch, predicate) -> None:
    """`os.fsync` fails with ENOSPC on files whose path satisfies `predicate`."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if predicate(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.fixture(scope="module")
def uninterrupted(store, tmp_path_factory) -> dict:
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    result = runner.invoke(app, ["run", str(_config(tmp_path, store, tmp_path / "run"))])
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / "run" / "summary.json").read_text())


def _same_result(run_dir: Path, uninterrupted: dict) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == uninterrupted["step"] == 4
    assert summary["test_loss"] == uninterrupted["test_loss"]  # bit for bit on CPU


def test_disk_full_writing_model_safetensors(store, tmp_path, monkeypatch, uninterrupted):
    run_dir = tmp_path / "run"
    config = _config(tmp_path, store, run_dir)
    real = weights.save_file
    calls = []

    def save_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the checkpoint of step 4; step 2's is on disk
            raise SafetensorError(
                f"Error while serializing: I/O error: No space left on device (os error 28) "
                f'at path "{path}"'
            )
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(weights, "save_file", save_file)
    line = _one_error(runner.invoke(app, ["run", str(config)]))
    assert "no space left on the device while writing checkpoint step 4" in line, line
    checkpoints = sorted(path.name for path in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step_000002"]  # no step 4, no hidden temporary folder
    assert not (run_dir / "summary.json").exists()
    monkeypatch.setattr(weights, "save_file", real)  # space is free again
    again = runner.invoke(app, ["run", str(config)])
    assert again.exit_code == 0, again.output
    _same_result(run_dir, uninterrupted)


def test_disk_full_writing_the_summary(store, tmp_path, monkeypatch, uninterrupted):
    run_dir = tmp_path / "run"
    config = _config(tmp_path, store, run_dir)
    with monkeypatch.context() as patch:
        _fill_disk_for(patch, lambda path: ".summary.json." in path)
        line = _one_error(runner.invoke(app, ["run", str(config)]))
    assert line == f"error: {run_dir / 'summary.json'}: {FULL}"
    assert not (run_dir / "summary.json").exists()
    assert not [path for path in run_dir.iterdir() if path.name.endswith(".tmp")]
    again = runner.invoke(app, ["run", str(config)])
    assert again.exit_code == 0, again.output
    _same_result(run_dir, uninterrupted)


def test_disk_full_writing_plots_and_reports_leaves_no_half_file(
    store, tmp_path, monkeypatch, uninterrupted
):
    run_dir = tmp_path / "run"
    assert runner.invoke(app, ["run", str(_config(tmp_path, store, run_dir))]).exit_code == 0
    png, html = tmp_path / "loss.png", tmp_path / "report.html"
    commands = {
        png: ["plot", str(run_dir), "--out", str(png)],
        html: ["report", str(run_dir), "--html", str(html)],
    }
    for target, command in commands.items():
        with monkeypatch.context() as patch:
            _fill_disk_for(patch, lambda path, name=target.name: f".{name}." in path)
            line = _one_error(runner.invoke(app, command))
        assert line == f"error: {target}: {FULL}"
        assert not target.exists()
        assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".")) == []
        assert runner.invoke(app, command).exit_code == 0
        assert target.stat().st_size > 0
