"""Two training processes on one run directory: the second stops in one line, touching nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llama_train.cli import app
from llama_train.core.runlock import LOCK_FILENAME, run_dir_lock
from llama_train.errors import LlamaTrainError

runner = CliRunner()


@pytest.fixture()
def config_file(make_debug_store, tmp_path: Path) -> Path:
    store = make_debug_store(n_train=64, n_test=16, seq_len=9)
    path = tmp_path / "tiny.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "data": {"path": str(store), "batch_size": 4},
                "model": {"dim": 16, "n_layers": 1, "n_heads": 2},
                "train": {"steps": 2, "progress": False, "threads": 1},
                "run": {"dir": str(tmp_path / "run")},
            }
        )
    )
    return path


def _hold_lock(run_dir: Path) -> subprocess.Popen[str]:
    """Another process that holds the run directory's lock (as a running `run` does)."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from llama_train.core.runlock import run_dir_lock
        with run_dir_lock({str(run_dir)!r}):
            print("locked", flush=True)
            sys.stdin.read()
        """
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_on_a_locked_run_dir_exits_1_in_one_line_and_deletes_nothing(
    config_file, tmp_path
):
    run_dir = tmp_path / "run"
    saving = run_dir / "checkpoints" / ".step_000004.tmp"  # the first run's save in progress
    saving.mkdir(parents=True)
    (saving / "state.pt").write_bytes(b"half written")
    holder = _hold_lock(run_dir)
    try:
        result = runner.invoke(app, ["run", str(config_file)])
    finally:
        holder.communicate("")
    assert result.exit_code == 1
    assert result.output.count("\n") == 1, result.output
    assert "is in use by another training run (pid" in result.output
    assert str(holder.pid) in result.output
    assert (saving / "state.pt").read_bytes() == b"half written"
    assert not (run_dir / "config.yaml").exists()
    after = runner.invoke(app, ["run", str(config_file)])  # the lock died with its holder
    assert after.exit_code == 0, after.output


def test_the_lock_is_held_for_the_whole_block_and_released_after(tmp_path):
    with run_dir_lock(tmp_path / "run") as path:
        assert path.name == LOCK_FILENAME
        second = run_dir_lock(tmp_path / "run")
        with pytest.raises(LlamaTrainError, match="in use by another training run"):
            second.__enter__()
    with run_dir_lock(tmp_path / "run"):
        pass
