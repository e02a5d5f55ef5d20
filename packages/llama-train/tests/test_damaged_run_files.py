"""Readers of a run directory on damaged files: one line naming the file, or the damage
skipped where the rest is still sound (a metrics line), never a traceback.

Damage here is what a bad copy, a full disk outside our atomic writers, or an editor
leaves: a metrics line that is JSON but not a record, a truncated eval or summary JSON,
and output paths that cannot be written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from llama_train.cli import app
from llama_train.rundir import read_metrics

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(make_debug_store, tmp_path_factory) -> tuple[Path, Path]:
    """A finished 4-step run (evaluated at 2 and 4) and its config."""
    store = make_debug_store(n_train=64, n_test=16, seq_len=9)
    folder = tmp_path_factory.mktemp("trained")
    config = folder / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"path": str(store), "batch_size": 8},
                "model": {"dim": 16, "n_layers": 1, "n_heads": 2},
                "train": {"steps": 4, "progress": False, "threads": 1, "log_every": 1},
                "eval": {"every": 2},
                "checkpoint": {"every": 2},
            }
        )
    )
    run_dir = folder / "run"
    result = runner.invoke(app, ["run", str(config), f"run.dir={run_dir}"])
    assert result.exit_code == 0, result.output
    return run_dir, config


@pytest.fixture
def run_dir(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained[0], copy)
    return copy


def _one_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def _damage_metrics(run_dir: Path) -> list[dict]:
    """Replace the step-2 line with JSON that is not a record, and add records without a
    usable step or with a loss that is not a number; return the records left intact."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines()
    intact = [json.loads(line) for index, line in enumerate(lines) if index != 1]
    lines[1] = "[1, 2]"
    lines.insert(2, '{"step": "x", "loss": 1.0, "tokens": 5}')
    lines.insert(3, '{"loss": 1.0}')
    lines.insert(4, '"just a string"')
    lines.append('{"step": 9, "loss": "nan?", "tokens": 5')  # torn
    path.write_text("\n".join(lines) + "\n")
    return intact


def _fake_wandb(monkeypatch) -> list[SimpleNamespace]:
    import wandb

    runs: list[SimpleNamespace] = []

    def init(**settings):
        run = SimpleNamespace(
            id=settings["id"],
            step=0,
            logged=[],
            summary={},
            log=lambda values, step: run.logged.append(step),
            save=lambda *args, **kwargs: None,
            finish=lambda: None,
        )
        runs.append(run)
        return run

    monkeypatch.setattr(wandb, "init", init)
    return runs


def test_damaged_metrics_lines_are_skipped_by_every_reader(run_dir, trained, tmp_path, monkeypatch):
    intact = _damage_metrics(run_dir)
    assert read_metrics(run_dir) == intact
    for command in (
        ["plot", str(run_dir), "--out", str(tmp_path / "loss.png")],
        ["report", str(run_dir), "--html", str(tmp_path / "report.html")],
    ):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.output
    runs = _fake_wandb(monkeypatch)
    result = runner.invoke(app, ["wandb-sync", str(run_dir), "--mode", "offline"])
    assert result.exit_code == 0, result.output
    assert runs[0].logged == sorted({record["step"] for record in intact})
    # Resuming truncates the file after the checkpoint's step: the damaged lines go.
    more = runner.invoke(app, ["run", str(trained[1]), f"run.dir={run_dir}", "train.steps=6"])
    assert more.exit_code == 0, more.output
    steps = [record["step"] for record in read_metrics(run_dir)]
    assert steps[-1] == 6 and len(read_metrics(run_dir)) == len(
        (run_dir / "metrics.jsonl").read_text().splitlines()
    )


@pytest.mark.parametrize("damaged", ["eval/step_000004.json", "summary.json"])
def test_a_truncated_eval_or_summary_is_one_line_naming_it(run_dir, tmp_path, damaged):
    path = run_dir / damaged
    path.write_text(path.read_text()[:40])
    for command in (
        ["plot", str(run_dir), "--out", str(tmp_path / "loss.png")],
        ["report", str(run_dir), "--html", str(tmp_path / "report.html")],
    ):
        line = _one_error(runner.invoke(app, command))
        assert line.startswith(f"error: {path} is damaged (not valid JSON"), line
    assert not (tmp_path / "loss.png").exists() and not (tmp_path / "report.html").exists()


@pytest.mark.parametrize("summary", ["{", '{"step": 4}', "[4]"])
def test_resume_rewrites_a_damaged_summary(run_dir, trained, summary):
    (run_dir / "summary.json").write_text(summary)
    result = runner.invoke(app, ["run", str(trained[1]), f"run.dir={run_dir}"])
    assert result.exit_code == 0, result.output
    written = json.loads((run_dir / "summary.json").read_text())
    original = json.loads((trained[0] / "summary.json").read_text())
    assert written["step"] == 4 and written["test_loss"] == original["test_loss"]


@pytest.mark.parametrize(
    ("option", "target", "reason"),
    [
        ("--out", "{run}", "Is a directory"),
        ("--out", "/proc/no/such/loss.png", "No such file or directory"),
        ("--html", "{run}", "Is a directory"),
        ("--html", "/proc/no-such.html", "No such file or directory"),
    ],
)
def test_an_unwritable_output_path_is_one_line(run_dir, option, target, reason):
    target = target.format(run=run_dir)
    command = "plot" if option == "--out" else "report"
    line = _one_error(runner.invoke(app, [command, str(run_dir), option, target]))
    assert line.endswith(f": {reason}"), line
    assert run_dir.is_dir() and (run_dir / "summary.json").is_file()  # nothing replaced
