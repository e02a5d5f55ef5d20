"""The run directory's typed records: every summary layout ever written still reads.

The old layouts are the trainer's own, as they were written before the summary had a
version (git history of `write_summary`): the first trainer's, then with world_size,
with the scale figures, with warmup_steps and profile_seconds, with
unique_tokens_seen, with startup_cpu_seconds. Each must read, with the figures the
current layout adds derived from what the file holds, and a study's table must read
the same rows from it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llama_train import rundir
from llama_train.cli import app
from llama_train.errors import LlamaTrainError
from llama_train.rundir import (
    SUMMARY_VERSION,
    EvalRecord,
    RunSummary,
    drop_evaluations_after,
    evaluation_paths,
    latest_evaluation,
    read_metric_records,
    read_metrics,
    read_progress,
    read_state,
    read_summary,
    read_validation,
    sound_summary,
    write_evaluation,
    write_state,
)
from llama_train.scaling.points import point_rows

runner = CliRunner()

FIRST = {  # f4c85a6: the first trainer
    "step": 40,
    "test_loss": 2.5,
    "test_entropy": 2.0,
    "excess_loss": 0.5,
    "test_loss_bits": 2.5 / math.log(2),
    "test_entropy_bits": 2.0 / math.log(2),
    "excess_loss_bits": 0.5 / math.log(2),
    "entropy_method": "exact",
    "eval_split": "test",
    "eval_sequences": 16,
    "parameters": 5000,
    "tokens": 40 * 128,
    "train_seconds": 2.0,
    "tokens_per_s": 40 * 128 / 2.0,
    "data": "debug.zarr",
    "baselines": {"unigram_bits": 4.0, "zstd_bits": 4.5, "gzip_bits": 4.7},
}
DISTRIBUTED = {**FIRST, "world_size": 1}  # 8ca6f84
SCALE = {  # 7a96210: what a scaling-law fit reads
    **DISTRIBUTED,
    "parameters_total": 5000,
    "parameters_non_embedding": 4000,
    "n_train": 32,
    "tokens_seen": 40 * 128,
    "unique_tokens": 32 * 15,
    "epochs": 40 * 128 / (32 * 15),
    "flops_6nd": 6.0 * 4000 * 40 * 128,
    "flops_attention": 6.0 * 2 * 15 * 16 * 40 * 128,
    "flops": 6.0 * 4000 * 40 * 128 + 6.0 * 2 * 15 * 16 * 40 * 128,
    "store_fingerprint": "0123456789abcdef",
}
PROFILED = {**SCALE, "warmup_steps": 4, "profile_seconds": {"forward_backward": 1.5}}  # bb87701
SEEN = {**PROFILED, "unique_tokens_seen": 32 * 15}  # 39d24fe
STARTUP = {**SEEN, "startup_cpu_seconds": 1.25}  # 80c9612: the last layout without a version
LAYOUTS = {
    "first": FIRST,
    "distributed": DISTRIBUTED,
    "scale": SCALE,
    "profiled": PROFILED,
    "seen": SEEN,
    "startup": STARTUP,
}


def _write(run_dir: Path, name: str, record: object) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / name
    path.write_text(json.dumps(record))
    return path


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_every_old_summary_layout_reads_with_what_it_holds(tmp_path, layout):
    old = LAYOUTS[layout]
    _write(tmp_path, "summary.json", old)
    summary = read_summary(tmp_path)
    assert summary is not None and summary.version == SUMMARY_VERSION
    held = summary.to_dict()
    assert {key: held[key] for key in old} == old  # nothing the file says is changed
    # What the current layout adds is derived from the file, as the trainer derives it.
    assert summary.parameters_total == old.get("parameters_total", old["parameters"])
    assert summary.tokens_seen == old.get("tokens_seen", old["tokens"])
    if "unique_tokens" in old:
        assert summary.unique_tokens_seen == min(old["tokens_seen"], old["unique_tokens"])
    else:
        assert summary.unique_tokens is None and summary.unique_tokens_seen is None
    assert summary.startup_cpu_seconds == old.get("startup_cpu_seconds")


@pytest.mark.parametrize("layout", ["first", "scale"])
def test_a_study_table_reads_an_old_summary(tmp_path, layout):
    point = {"name": "p", "regime": "r", "model": "m", "n_train": 32, "lr": 0.01, "seed": 0}
    record = {"points": [{**point, "steps": 40}]}
    _write(tmp_path / "p", "summary.json", LAYOUTS[layout])
    _write(tmp_path / "p", "validation.json", {"loss": 2.6})
    (row,) = point_rows(tmp_path, record)
    old = LAYOUTS[layout]
    assert row["N"] == row["N_total"] == old["parameters"]
    assert row["tokens"] == old["tokens"]
    assert row["D"] == old.get("unique_tokens")
    assert row["excess"] == old["test_loss"] - old["test_entropy"]
    assert row["val_loss"] == 2.6


def test_the_current_summary_round_trips_with_its_version(tmp_path):
    summary = read_summary(_write(tmp_path, "summary.json", STARTUP).parent)
    assert summary is not None
    again = tmp_path / "written"
    again.mkdir()
    summary.write(again)
    text = json.loads((again / "summary.json").read_text())
    assert text["version"] == SUMMARY_VERSION and read_summary(again) == summary


def test_the_summary_write_into_a_missing_folder_fails_without_a_trace(tmp_path):
    summary = RunSummary.model_validate(FIRST)
    with pytest.raises(OSError):
        summary.write(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("{", "is damaged (not valid JSON"),
        ("[4]", "is damaged (not a JSON object)"),
        ('{"step": 4}', "is damaged (not a run summary: test_loss: Field required)"),
        (
            json.dumps({**FIRST, "lost": 1}),
            "is damaged (not a run summary: lost: Extra inputs are not permitted)",
        ),
        (
            json.dumps({**RunSummary.model_validate(FIRST).to_dict(), "version": 99}),
            "summary version 99 is newer than this llama-train reads (2); upgrade llama-train",
        ),
    ],
)
def test_a_damaged_or_newer_summary_is_one_line_naming_it(tmp_path, content, says):
    path = tmp_path / "summary.json"
    path.write_text(content)
    with pytest.raises(LlamaTrainError) as error:
        read_summary(tmp_path)
    line = str(error.value)
    assert line.startswith(str(path)) and says in line and "\n" not in line
    assert sound_summary(tmp_path) is None


def test_no_summary_is_none(tmp_path):
    assert read_summary(tmp_path) is None and sound_summary(tmp_path) is None


def test_figures_are_the_finite_numbers_of_a_summary():
    summary = RunSummary.model_validate({**FIRST, "test_entropy": float("nan")})
    figures = summary.figures()
    assert figures["test_loss"] == 2.5 and figures["tokens"] == 40 * 128
    assert "test_entropy" not in figures and "version" not in figures
    assert "data" not in figures and "baselines" not in figures


def _evaluation(step: int) -> EvalRecord:
    loss, entropy = [2.0, 1.5], [1.5, 1.25]
    return EvalRecord(
        step=step,
        split="test",
        n_sequences=4,
        loss=1.75,
        entropy=1.375,
        entropy_method="exact",
        loss_per_position=loss,
        entropy_per_position=entropy,
        excess=0.375,
        loss_bits=1.75 / math.log(2),
        entropy_bits=1.375 / math.log(2),
        excess_bits=0.375 / math.log(2),
    )


def test_evaluations_are_written_found_and_dropped_by_step(tmp_path):
    for step in (2, 4, 10):
        write_evaluation(tmp_path, _evaluation(step))
    assert [p.name for p in evaluation_paths(tmp_path)] == [
        "step_000002.json",
        "step_000004.json",
        "step_000010.json",
    ]
    latest = latest_evaluation(tmp_path)
    assert latest == _evaluation(10) and latest.excess_per_position == [0.5, 0.25]
    drop_evaluations_after(tmp_path, 4)
    assert latest_evaluation(tmp_path) == _evaluation(4)


@pytest.mark.parametrize(
    ("record", "says"),
    [
        ({"step": 2}, "not an evaluation record: split: Field required"),
        (
            {**_evaluation(2).model_dump(), "entropy_per_position": [1.0]},
            "its two curves differ in length",
        ),
    ],
)
def test_a_damaged_evaluation_is_one_line_naming_it(tmp_path, record, says):
    path = _write(tmp_path / "eval", "step_000002.json", record)
    with pytest.raises(LlamaTrainError, match="is damaged") as error:
        latest_evaluation(tmp_path)
    assert str(error.value).startswith(str(path)) and says in str(error.value)


def test_typed_metrics_records_hold_the_lines_figures(tmp_path):
    lines = [
        {"step": 1, "loss": 3.0, "tokens": 128, "lr": 0.001},
        {"step": 2, "loss": 2.5, "tokens": 256},
        {"step": 2, "eval/loss": 2.4, "eval/entropy": 2.0, "eval/excess": 0.4, "eval/x": "no"},
        {"step": 3, "loss": True, "tokens": 384},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    records = read_metric_records(tmp_path)
    assert [record.line for record in records] == read_metrics(tmp_path) == lines
    assert [(r.step, r.tokens, r.loss) for r in records] == [
        (1, 128, 3.0),
        (2, 256, 2.5),
        (2, None, None),
        (3, 384, None),  # a boolean is no loss
    ]
    assert (records[2].eval_loss, records[2].eval_entropy, records[2].eval_excess) == (
        2.4,
        2.0,
        0.4,
    )
    assert records[2].evaluation == {"loss": 2.4, "entropy": 2.0, "excess": 0.4}
    progress = read_progress(tmp_path)
    assert progress.step == 3 and (progress.eval_loss, progress.eval_excess) == (2.4, 0.4)
    assert read_progress(tmp_path / "nothing").step is None


def test_the_job_state_round_trips_and_a_foreign_file_is_no_state(tmp_path):
    written = write_state(tmp_path, "preempted", step=5, message="requeued")
    assert read_state(tmp_path) == written
    assert (written.state, written.step, written.message) == ("preempted", 5, "requeued")
    (tmp_path / "job_state.json").write_text(json.dumps({"state": "exploded"}))
    assert read_state(tmp_path) is None


def test_a_damaged_validation_record_is_none(tmp_path):
    _write(tmp_path, "validation.json", {"step": 4, "loss": 2.5})
    assert read_validation(tmp_path).loss == 2.5
    _write(tmp_path, "validation.json", {"step": 4})
    assert read_validation(tmp_path) is None


def test_importing_the_run_directory_loads_no_torch():
    code = "import sys, llama_train.rundir\nprint('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "False"


def test_a_run_directory_with_a_first_layout_summary_still_reads_everywhere(
    make_debug_store, tmp_path
):
    """An old run directory: resuming knows it is finished; best, sweep-status and the plot
    read its summary."""
    store = make_debug_store(n_train=64, n_test=16, seq_len=9)
    run_dir = tmp_path / "old"
    config = tmp_path / "tiny.yaml"
    config.write_text("run: {seed: 0}\n")
    command = [
        "run",
        str(config),
        f"data.path={store}",
        f"run.dir={run_dir}",
        "model.dim=16",
        "model.n_layers=1",
        "model.n_heads=2",
        "data.batch_size=8",
        "train.steps=4",
        "eval.every=4",
        "checkpoint.every=4",
    ]
    first = runner.invoke(app, command)
    assert first.exit_code == 0, first.output
    written = json.loads((run_dir / "summary.json").read_text())
    assert written["version"] == SUMMARY_VERSION
    (run_dir / "summary.json").write_text(json.dumps({key: written[key] for key in FIRST}))
    metrics = (run_dir / "metrics.jsonl").read_text()

    again = runner.invoke(app, command)
    assert again.exit_code == 0, again.output
    assert "is complete (step 4 of 4)" in again.stderr
    assert (run_dir / "metrics.jsonl").read_text() == metrics  # nothing trained again

    best = runner.invoke(app, ["best", str(run_dir), "--by", "tokens", "--json"])
    assert best.exit_code == 0, best.output
    assert json.loads(best.stdout)["best"]["value"] == written["tokens"]
    status = runner.invoke(app, ["sweep-status", str(run_dir), "--json", "--no-queue"])
    assert status.exit_code == 0, status.output
    (point,) = json.loads(status.stdout)
    assert (point["state"], point["step"], point["test_loss"]) == (
        "done",
        4,
        written["test_loss"],
    )
    plot = runner.invoke(app, ["plot", str(run_dir), "--out", str(tmp_path / "loss.png")])
    assert plot.exit_code == 0, plot.output


def test_the_wandb_sync_record_reads_what_earlier_syncs_wrote(tmp_path):
    (tmp_path / "wandb_sync.json").write_text(
        json.dumps({"run_id": "abc", "offline": {"last_step": 8}})
    )
    state = rundir.read_sync_state(tmp_path)
    assert state.sent_before("abc", "offline") == 8
    assert state.sent_before("abc", "online") is None
    assert state.sent_before("other", "offline") is None
    (tmp_path / "wandb_sync.json").write_text('{"run_id": "abc", "offline": 8}')
    with pytest.raises(LlamaTrainError, match=r"wandb_sync.json is damaged \(not a wandb-sync"):
        rundir.read_sync_state(tmp_path)


def test_the_wandb_settings_of_a_config_are_read_typed(tmp_path):
    (tmp_path / "config.yaml").write_text(
        "run:\n  name: lr/optim.lr=0.1\nlogging:\n  wandb:\n    project: p\n    name: null\n"
    )
    settings = rundir.read_wandb_settings(tmp_path)
    assert (settings.run_name, settings.project, settings.name, settings.entity) == (
        "lr/optim.lr=0.1",
        "p",
        None,
        None,
    )
    assert settings.config["logging"]["wandb"]["project"] == "p"
    assert rundir.read_wandb_settings(tmp_path / "none").run_name is None
