"""Settings whose size alone would hang or crash a run: one line instead.

`train.grad_accum=1e9` would make one optimizer step last for ever, and a
preemption signal is acted on between steps only; `train.threads=100000` (or
`--threads`, OMP_NUM_THREADS) made OpenMP crash the process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from gssm_data.common.resources import MAX_THREADS_PER_CPU, available_cpus
from llama_train.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def store(make_debug_store) -> Path:
    return make_debug_store(n_train=64, n_test=16, seq_len=9)


def _run(store: Path, tmp_path: Path, *overrides: str):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"path": str(store), "batch_size": 4},
                "model": {"dim": 16, "n_layers": 1, "n_heads": 2},
                "train": {"steps": 2, "progress": False, "threads": 1},
                "run": {"dir": str(tmp_path / "run")},
            }
        )
    )
    return runner.invoke(app, ["run", str(config), *overrides])


@pytest.mark.parametrize("value", ["1e9", "1025"])
def test_an_endless_accumulation_is_refused_at_validation(store, tmp_path, value):
    result = _run(store, tmp_path, f"train.grad_accum={value}")
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith(
        "error: invalid config: train.grad_accum: at most 1024 micro-batches per optimizer step"
    )
    assert not (tmp_path / "run").exists()


def test_the_largest_accumulation_still_trains(store, tmp_path):
    result = _run(store, tmp_path, "train.grad_accum=1024", "train.steps=1")
    assert result.exit_code == 0, result.output


def test_a_huge_thread_count_is_capped_in_one_line(store, tmp_path):
    before = torch.get_num_threads()
    limit = MAX_THREADS_PER_CPU * available_cpus()
    try:
        result = _run(store, tmp_path, "train.threads=100000")
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if "capped" in line]
    assert notes == [
        f"note: 100,000 threads capped at {limit} ({MAX_THREADS_PER_CPU} per CPU; this process "
        f"may use {available_cpus()})"
    ]
    assert used == limit
