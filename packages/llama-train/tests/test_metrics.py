"""Metrics: the JSONL record, rank 0 only, resume truncation, wandb offline, plots."""

from __future__ import annotations

import json
import math

import torch

from llama_train.core.metrics import MetricLogger, system_metrics, truncate_after
from llama_train.rundir import METRICS_FILENAME, WANDB_ID_FILENAME, read_metrics


def test_each_log_call_is_one_json_line_with_its_step(tmp_path):
    with MetricLogger(tmp_path) as logger:
        logger.log({"step": 1, "loss": 2.5, "grad_norm": torch.tensor(0.5)})
        logger.log({"step": 2, "loss": 2.0})
    lines = (tmp_path / METRICS_FILENAME).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "loss": 2.5, "grad_norm": 0.5},
        {"step": 2, "loss": 2.0},
    ]


def test_non_finite_values_are_written_as_null_to_keep_the_file_strict_json(tmp_path):
    with MetricLogger(tmp_path) as logger:
        logger.log({"step": 1, "loss": math.nan, "grad_norm": math.inf})
    assert json.loads((tmp_path / METRICS_FILENAME).read_text()) == {
        "step": 1,
        "loss": None,
        "grad_norm": None,
    }


def test_only_rank_zero_writes(tmp_path):
    with MetricLogger(tmp_path / "rank1", enabled=False) as logger:
        logger.log({"step": 1, "loss": 1.0})
    assert not (tmp_path / "rank1").exists()


def test_a_fresh_run_replaces_an_old_file_and_a_resume_keeps_lines_up_to_its_step(tmp_path):
    with MetricLogger(tmp_path) as logger:
        for step in range(1, 6):
            logger.log({"step": step, "loss": float(step)})
    with (tmp_path / METRICS_FILENAME).open("a") as file:
        file.write('{"step": 6, "loss"')  # torn line of a killed writer
    with MetricLogger(tmp_path, resume_step=3) as logger:
        logger.log({"step": 4, "loss": 40.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
    ]
    with MetricLogger(tmp_path) as logger:
        logger.log({"step": 1, "loss": 9.0})
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 9.0}]


def test_truncating_a_missing_file_is_a_no_op(tmp_path):
    truncate_after(tmp_path / METRICS_FILENAME, 3)
    assert not (tmp_path / METRICS_FILENAME).exists()


def test_system_metrics_name_the_host_and_the_resident_memory():
    figures = system_metrics(torch.device("cpu"))
    assert figures["hostname"] and figures["rss_mb"] > 0
    assert "gpu_mem_mb" not in figures


def test_wandb_offline_logs_locally_and_a_resumed_run_keeps_its_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-home").mkdir()
    run_dir = tmp_path / "run"
    with MetricLogger(run_dir, wandb_mode="offline", wandb_project="tests", run_name="r") as first:
        first.log({"step": 1, "loss": 1.0, "hostname": "h"})
        run_id = first.wandb_run_id
    assert run_id == (run_dir / WANDB_ID_FILENAME).read_text().strip()
    offline_runs = list((tmp_path / "wandb-home" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline_runs) == 1
    with MetricLogger(run_dir, resume_step=1, wandb_mode="offline", wandb_project="tests") as again:
        assert again.wandb_run_id == run_id
    assert read_metrics(run_dir)[0]["loss"] == 1.0
