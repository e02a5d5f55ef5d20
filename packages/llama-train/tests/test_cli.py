"""The `llama-train` command line: exit codes, one-line errors, the four commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llama_train.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def store(make_debug_store) -> Path:
    return make_debug_store(n_train=64, n_test=16, seq_len=9)


@pytest.fixture()
def config_file(store: Path, tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "data": {"path": str(store), "batch_size": 4},
                "model": {"dim": 16, "n_layers": 1, "n_heads": 2},
                "train": {"steps": 3, "progress": False},
                "run": {"dir": str(tmp_path / "run")},
            }
        )
    )
    return path


@pytest.mark.integration
def test_run_then_eval_then_plot_succeed(config_file, tmp_path):
    result = runner.invoke(app, ["run", str(config_file), "optim.lr=1e-3"])
    assert result.exit_code == 0, result.output
    assert "excess loss" in result.output and "exact entropy" in result.output
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 3
    evaluated = runner.invoke(app, ["eval", str(run_dir), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.output)["loss"] == pytest.approx(summary["test_loss"])
    table = runner.invoke(app, ["eval", str(run_dir), "--checkpoint", "3"])
    assert table.exit_code == 0 and "excess loss" in table.output
    plotted = runner.invoke(app, ["plot", str(run_dir), "--out", str(tmp_path / "c.png")])
    assert plotted.exit_code == 0, plotted.output
    assert (tmp_path / "c.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["optim.lrr=1"], "unknown config key 'optim.lrr'; did you mean 'optim.lr'"),
        (["train.steps=0"], "train.steps: 0 must be at least 1"),
        (["model.vocab_size=3"], "model.vocab_size=3 does not match"),
        (["optim.lr"], "not of the form key.sub=value"),
    ],
)
def test_a_bad_config_exits_1_with_a_message_and_no_traceback(config_file, arguments, message):
    result = runner.invoke(app, ["run", str(config_file), *arguments])
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


def test_a_missing_config_or_run_directory_exits_1(tmp_path):
    missing = runner.invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 1 and "nope.yaml not found" in missing.output
    not_a_run = runner.invoke(app, ["eval", str(tmp_path)])
    assert not_a_run.exit_code == 1 and "is not a run directory" in not_a_run.output
    no_metrics = runner.invoke(app, ["plot", str(tmp_path)])
    assert (
        no_metrics.exit_code == 1 and "no run directory (with metrics.jsonl)" in no_metrics.output
    )


def test_config_schema_prints_the_json_schema():
    result = runner.invoke(app, ["config-schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert "optim" in schema["properties"] and "TrainSection" in schema["$defs"]


@pytest.mark.integration
def test_python_dash_m_runs_the_same_command_line():
    result = subprocess.run(
        [sys.executable, "-m", "llama_train", "config-schema"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    assert json.loads(result.stdout)["title"] == "TrainConfig"


def test_run_refuses_a_config_with_a_sweep_and_points_to_submit(config_file):
    result = runner.invoke(app, ["run", str(config_file), "sweep.optim.lr=[1e-3,3e-3]"])

    assert result.exit_code == 1
    assert "llama-train submit" in result.output
    assert "optim.lr" in result.output
    assert "Traceback" not in result.output


def test_run_refuses_a_slurm_section_in_the_file_and_points_to_submit(config_file):
    config_file.write_text(config_file.read_text() + "\nslurm:\n  partition: gpu\n")
    result = runner.invoke(app, ["run", str(config_file)])

    assert result.exit_code == 1
    assert "`slurm` section" in result.output and "llama-train submit" in result.output
    assert "Traceback" not in result.output
