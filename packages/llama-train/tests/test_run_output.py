"""What `llama-train run` shows and prints: progress lines in logs, --json, a finished rerun."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llama_train.cli import app

runner = CliRunner()
TINY = ["model.dim=16", "model.n_layers=1", "model.n_heads=2", "data.batch_size=8"]


@pytest.fixture(scope="module")
def store(make_debug_store) -> Path:
    return make_debug_store(n_train=256, n_test=32, seq_len=17)


def _run(store: Path, run_dir: Path, *extra: str) -> list[str]:
    config = run_dir.parent / "tiny.yaml"
    config.write_text("run: {seed: 0}\n")
    return [
        "run",
        str(config),
        f"data.path={store}",
        f"run.dir={run_dir}",
        *TINY,
        "train.steps=6",
        "train.log_every=3",
        "eval.every=6",
        "checkpoint.every=6",
        *extra,
    ]


def test_off_a_terminal_training_prints_periodic_progress_lines(store, tmp_path) -> None:
    result = runner.invoke(app, _run(store, tmp_path / "run", "train.progress_every=1e-9"))
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if re.match(r"\d\d:\d\d:\d\d step ", line)]
    assert lines, result.stderr
    assert re.search(r"step 6/6 100% loss \d+\.\d{4}", lines[-1]), lines[-1]
    assert "━" not in result.stderr


def test_json_ends_with_the_summary_and_a_finished_run_is_not_resumed(store, tmp_path) -> None:
    run_dir = tmp_path / "run"
    first = runner.invoke(app, [*_run(store, run_dir), "--json"])
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary == {
        **json.loads((run_dir / "summary.json").read_text()),
        "run_dir": str(run_dir),
    }
    assert summary["step"] == 6
    metrics = (run_dir / "metrics.jsonl").read_text()

    again = runner.invoke(app, _run(store, run_dir))
    assert again.exit_code == 0, again.output
    assert "is complete (step 6 of 6)" in again.stderr
    assert "resuming" not in again.output
    assert (run_dir / "metrics.jsonl").read_text() == metrics  # nothing was trained or logged

    longer = runner.invoke(app, [*_run(store, run_dir), "train.steps=9", "--json"])
    assert longer.exit_code == 0, longer.output
    assert "resuming" in longer.stderr and "is complete" not in longer.stderr
    assert json.loads(longer.stdout.strip().splitlines()[-1])["step"] == 9


def test_both_commands_print_their_version() -> None:
    from gssm_data.cli import app as data_app

    trainer = runner.invoke(app, ["--version"])
    assert trainer.exit_code == 0 and re.fullmatch(
        r"llama-train \S+ \(gssm-data \S+\)\n", trainer.stdout
    )
    data = runner.invoke(data_app, ["--version"])
    assert data.exit_code == 0 and re.fullmatch(r"gssm-data \S+\n", data.stdout)


def test_threads_leave_a_cpu_per_loader_worker_and_one_per_rank(monkeypatch) -> None:
    import torch

    from llama_train.core.distributed import RankInfo
    from llama_train.recipe import train as recipe
    from llama_train.recipe.train_config import TrainSection

    before = torch.get_num_threads()
    monkeypatch.setattr(recipe, "default_threads", lambda processes=1: 4)  # 4 idle CPUs
    try:
        said = recipe._set_threads(TrainSection(), RankInfo(), loader_workers=1)
        assert torch.get_num_threads() == 3 and said.startswith("3 threads")
        recipe._set_threads(TrainSection(), RankInfo(world_size=2, launcher="torchrun"), 0)
        assert torch.get_num_threads() == 1
        recipe._set_threads(TrainSection(threads=2), RankInfo(), loader_workers=3)
        assert torch.get_num_threads() == 2  # an explicit train.threads wins
    finally:
        torch.set_num_threads(before)
