"""Stores written by Slurm array tasks through submitit: the sbatch script submitit writes,
submission to a stand-in Slurm (conftest.py), the tasks run in-process and through
submitit's own entry point, `--wait`, scaling recipes, and the one-line errors."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gssm_data.cli import app
from gssm_data.errors import GssmDataError
from gssm_data.generate import GenerateOptions, Shard, generate
from gssm_data.presets import load_preset
from gssm_data.slurm import (
    ShardTask,
    SlurmSettings,
    job_dir,
    run_shard,
    still_queued,
    submit_generate,
    submit_scaling,
    time_limit_minutes,
)
from gssm_data.store import open_store

runner = CliRunner()
DEBUG_STORE = ["--preset", "debug", "--n", "1000", "--n-test", "100", "--seq-len", "9"]


def _options(out: Path, **changes: object) -> GenerateOptions:
    values = {
        "graph": load_preset("debug"),
        "name": "debug",
        "out": out,
        "n_train": 300,
        "n_test": 100,
        "seq_len": 9,
        "block_size": 64,  # 5 + 2 blocks: both tasks have several
        **changes,
    }
    return GenerateOptions(**values)


def _directives(script: str) -> set[str]:
    return {line.removeprefix("#SBATCH ") for line in script.splitlines() if "#SBATCH" in line}


def _one_error_line(result, fragment: str) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0] and "Traceback" not in result.output
    return lines[0]


def _same_store(sharded: Path, local: Path) -> None:
    """Every file of the two stores has the same bytes, but the manifest's created_at."""
    files = sorted(p.relative_to(local) for p in local.rglob("*") if p.is_file())
    assert sorted(p.relative_to(sharded) for p in sharded.rglob("*") if p.is_file()) == files
    different = [
        str(name) for name in files if (sharded / name).read_bytes() != (local / name).read_bytes()
    ]
    assert different == ["zarr.json"]  # the manifest, whose created_at differs:
    manifests = [
        open_store(path).manifest.model_dump(exclude={"created_at"}) for path in (sharded, local)
    ]
    assert manifests[0] == manifests[1]


@pytest.mark.parametrize(
    ("text", "minutes"),
    [
        ("90", 90),
        ("1:30", 2),
        ("1:30:00", 90),
        ("2-00:00:00", 2880),
        ("1-12", 2160),
        ("0-0:10", 10),
    ],
)
def test_slurm_time_limits_become_minutes_for_submitit(text, minutes):
    assert time_limit_minutes(text) == minutes


@pytest.mark.parametrize("text", ["an hour", "", "0", "1:2:3:4", "-5", "1h"])
def test_a_time_limit_slurm_would_not_take_is_a_user_error(text):
    with pytest.raises(GssmDataError, match=re.escape(f"--time {text!r}")):
        time_limit_minutes(text)


def test_the_array_gives_each_task_its_shard_and_the_resources(tmp_path, fake_slurm):
    slurm = fake_slurm()
    settings = SlurmSettings(partition="cpu", time="1:00:00", cpus_per_task=4, mem="8G")
    submitted = submit_generate(_options(tmp_path / "s.zarr"), tasks=8, settings=settings)
    folder = job_dir(tmp_path / "s.zarr")
    [call] = slurm.calls()
    directives = _directives(call["script"])
    for directive in (
        "--array=0-7%8",
        "--job-name=gssm-debug",
        "--cpus-per-task=4",
        "--partition=cpu",
        "--time=60",
        "--mem=8G",
        "--requeue",
        f"--output={folder}/%A_%a_0_log.out",
    ):
        assert directive in directives, directive
    assert "-m submitit.core._submit" in call["script"]
    tasks = [job.submission().function for job in submitted.jobs]
    assert [str(task.shard) for task in tasks] == [f"{k}/8" for k in range(8)]
    assert {task.options_file for task in tasks} == {folder / "options.json"}
    assert submitted.job_id == "101" and [job.job_id for job in submitted.jobs][-1] == "101_7"


def test_without_time_the_cluster_default_applies_and_nothing_else_is_asked(tmp_path, fake_slurm):
    slurm = fake_slurm()
    submit_generate(_options(tmp_path / "s.zarr"), tasks=2, settings=SlurmSettings())
    directives = _directives(slurm.calls()[0]["script"])
    assert not any(
        d.startswith(("--time", "--partition", "--mem", "--account")) for d in directives
    )
    assert "--cpus-per-task=1" in directives


def test_every_task_of_a_large_array_may_run_at_once(tmp_path, fake_slurm):
    slurm = fake_slurm()
    submitted = submit_generate(_options(tmp_path / "s.zarr"), tasks=300, settings=SlurmSettings())
    assert "--array=0-299%300" in _directives(slurm.calls()[0]["script"])
    assert len(submitted.jobs) == 300


@pytest.mark.parametrize(
    ("settings", "tasks", "message"),
    [
        (SlurmSettings(), 0, "--tasks must be at least 1"),
        (SlurmSettings(cpus_per_task=0), 2, "--cpus-per-task must be at least 1"),
        (SlurmSettings(time="an hour"), 2, "--time 'an hour'"),
    ],
)
def test_bad_array_settings_are_user_errors_and_nothing_is_written(
    tmp_path, fake_slurm, settings, tasks, message
):
    slurm = fake_slurm()
    with pytest.raises(GssmDataError, match=message):
        submit_generate(_options(tmp_path / "a.zarr"), tasks=tasks, settings=settings)
    assert slurm.calls() == [] and not job_dir(tmp_path / "a.zarr").exists()


def test_submitting_saves_the_options_beside_the_store_and_returns_the_job_id(tmp_path, fake_slurm):
    slurm = fake_slurm()
    options = _options(tmp_path / "a.zarr")
    submitted = submit_generate(options, tasks=3, settings=SlurmSettings())
    folder = job_dir(tmp_path / "a.zarr")
    assert (submitted.job_id, submitted.tasks, submitted.job_dir) == ("101", 3, folder)
    assert len(slurm.calls()) == 1 and "--array=0-2%3" in slurm.calls()[0]["script"]
    saved = GenerateOptions.model_validate_json((folder / "options.json").read_text())
    assert saved == options.model_copy(update={"out": (tmp_path / "a.zarr").absolute()})


def test_the_tasks_write_the_bytes_of_one_local_generate(tmp_path, fake_slurm):
    fake_slurm()
    options = _options(tmp_path / "sharded.zarr")
    submitted = submit_generate(options, tasks=2, settings=SlurmSettings())
    task0, task1 = (job.submission().function for job in submitted.jobs)
    # Task 1 first: the task that writes the last block publishes, whichever it is.
    assert task1() == "shard-done" and not options.out.exists()
    assert task0() == "complete"
    generate(_options(tmp_path / "local.zarr"))
    _same_store(options.out, tmp_path / "local.zarr")


def test_a_task_reaching_its_limit_is_requeued_as_the_same_task(tmp_path):
    task = ShardTask(tmp_path / "options.json", Shard(index=1, count=4))
    requeued = task.checkpoint()
    assert requeued.function == task and requeued.args == () and requeued.kwargs == {}


@pytest.mark.parametrize(
    ("limit_known", "executor"), [(False, "slurm"), (True, "slurm"), (False, None)]
)
def test_without_a_time_limit_a_slurm_task_ignores_submitits_warning_signal(
    tmp_path, monkeypatch, limit_known, executor
):
    """submitit's handler needs the limit as a number; without one it would fail."""
    if executor is None:
        monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    else:
        monkeypatch.setenv("SUBMITIT_EXECUTOR", executor)
    before = signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    try:
        task = ShardTask(tmp_path / "missing.json", Shard(index=0, count=1), limit_known)
        with pytest.raises(GssmDataError, match="cannot read"):
            task()
        ignored = signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR2, before)
    assert ignored is (not limit_known and executor == "slurm")


def test_a_complete_store_is_not_submitted_again_and_another_store_is_refused(tmp_path, fake_slurm):
    slurm = fake_slurm()
    options = _options(tmp_path / "done.zarr")
    generate(options)
    assert submit_generate(options, tasks=2, settings=SlurmSettings()).job_id is None
    assert slurm.calls() == []
    with pytest.raises(GssmDataError, match="holds another store"):
        submit_generate(options.model_copy(update={"seed": 5}), tasks=2, settings=SlurmSettings())
    with pytest.raises(GssmDataError, match="--force cannot be combined with Slurm tasks"):
        submit_generate(
            options.model_copy(update={"force": True}), tasks=2, settings=SlurmSettings()
        )


def test_a_task_with_an_unreadable_options_file_fails_with_one_line(tmp_path):
    with pytest.raises(GssmDataError, match=r"^cannot read .*missing\.json"):
        run_shard(tmp_path / "missing.json", Shard(index=0, count=2))


def test_submit_command_prints_the_job_and_the_store_path(tmp_path, fake_slurm, monkeypatch):
    slurm = fake_slurm()
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(
        app, ["submit", "--tasks", "2", *DEBUG_STORE, "--out", "s.zarr", "--partition", "debug"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == f"job 101 (2 tasks): {tmp_path / 's.zarr'}\n"
    assert f"logs: {tmp_path / 's.zarr.slurm'}/101_*_log.out" in result.stderr
    assert "--partition=debug" in _directives(slurm.calls()[0]["script"])


# ---------------------------------------------------------------------------
# One-line errors


def test_without_submitit_submit_names_the_extra(tmp_path, fake_slurm, monkeypatch):
    slurm = fake_slurm()
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit raises ImportError
    result = runner.invoke(app, ["submit", *DEBUG_STORE, "--out", str(tmp_path / "s.zarr")])
    _one_error_line(result, "submitting needs submitit: pip install 'gssm-data[slurm]'")
    assert slurm.calls() == [] and not (tmp_path / "s.zarr.slurm").exists()


def test_without_srun_on_path_submit_is_one_line(tmp_path, fake_slurm):
    slurm = fake_slurm(srun=False)  # submitit itself would raise `Could not detect "srun"`
    result = runner.invoke(app, ["submit", *DEBUG_STORE, "--out", str(tmp_path / "s.zarr")])
    _one_error_line(result, "srun not found: submit from a Slurm login node")
    assert slurm.calls() == [] and not (tmp_path / "s.zarr.slurm").exists()


def test_when_sbatch_fails_submit_is_one_line_with_its_message(tmp_path, fake_slurm):
    slurm = fake_slurm(refuse="sbatch: error: Batch job submission failed: Invalid partition name")
    result = runner.invoke(
        app, ["submit", *DEBUG_STORE, "--out", str(tmp_path / "s.zarr"), "--partition", "nope"]
    )
    _one_error_line(
        result, "sbatch refused the job: sbatch: error: Batch job submission failed: Invalid"
    )
    assert len(slurm.calls()) == 1  # it did run


@pytest.mark.parametrize(
    ("returncode", "stdout", "stderr", "queued"),
    [
        (0, "41_[2-3] PENDING\n41_0 RUNNING\n", "", True),
        (0, "41_0 COMPLETED\n41_1 REQUEUED\n", "", True),
        (0, "41_0 COMPLETED\n41_1 OUT_OF_MEMORY\n", "", False),
        (0, "", "", False),
        (1, "", "slurm_load_jobs error: Invalid job id specified", False),
        (1, "", "slurm_load_jobs error: Socket timed out on send/recv operation", True),
    ],
)
def test_a_job_is_waited_for_until_slurm_lists_none_of_its_tasks_as_running(
    monkeypatch, returncode, stdout, stderr, queued
):
    answer = subprocess.CompletedProcess([], returncode, stdout, stderr)
    monkeypatch.setattr("gssm_data.slurm.subprocess.run", lambda *args, **kwargs: answer)
    assert still_queued("41") is queued


def test_wait_names_the_tasks_that_ended_without_a_result(tmp_path, fake_slurm):
    fake_slurm()  # squeue lists the job as COMPLETED at once, and no task ever ran
    result = runner.invoke(
        app, ["submit", "--tasks", "2", *DEBUG_STORE, "--out", str(tmp_path / "s.zarr"), "--wait"]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    said, error = result.stderr.strip().splitlines()
    assert said == "submitted job 101; waiting for its tasks to end"
    assert error.startswith("error: job 101 ended with a failed task (task 0: ended without")
    assert "and 1 more" in error and error.endswith("then submit again to finish the store")
    assert result.stdout == ""


# ---------------------------------------------------------------------------
# Through submitit's own entry point, as on a cluster


@pytest.mark.integration
def test_submit_wait_writes_through_submitit_the_bytes_of_a_local_generate(
    tmp_path, fake_slurm, monkeypatch
):
    slurm = fake_slurm(run=True)
    monkeypatch.chdir(tmp_path)
    submit = ["submit", "--tasks", "2", *DEBUG_STORE, "--out", "sharded.zarr"]
    result = runner.invoke(app, [*submit, "--wait"])
    slurm.wait_until_done("101")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"job 101 (2 tasks): {tmp_path / 'sharded.zarr'}\n"
    local = runner.invoke(app, ["generate", *DEBUG_STORE, "--out", "local.zarr", "--quiet"])
    assert local.exit_code == 0, local.output
    _same_store(tmp_path / "sharded.zarr", tmp_path / "local.zarr")
    logs = [path.read_text() for path in sorted((tmp_path / "sharded.zarr.slurm").glob("*.out"))]
    assert len(logs) == 2
    assert sorted(re.findall(r"^shard (\d/2): (\S+)$", "".join(logs), re.M)) == [
        ("0/2", "shard-done"),
        ("1/2", "complete"),
    ]
    # Submitting again leaves the complete store alone.
    again = runner.invoke(app, submit)
    assert again.stdout == f"complete: {tmp_path / 'sharded.zarr'}\n"
    assert len(slurm.calls()) == 1


@pytest.mark.integration
def test_wait_reports_a_task_that_raised_in_one_line(tmp_path, fake_slurm, monkeypatch):
    slurm = fake_slurm(run=True)
    options = _options(tmp_path / "s.zarr")
    monkeypatch.setattr("gssm_data.slurm.write_options", lambda options, folder: folder / "gone")
    with pytest.raises(GssmDataError) as error:
        submit_generate(options, tasks=1, settings=SlurmSettings(), wait=True)
    slurm.wait_until_done("101")
    message = str(error.value)
    assert message.startswith("job 101 ended with a failed task (task 0: ")
    assert "GssmDataError: cannot read" in message and "\n" not in message


# ---------------------------------------------------------------------------
# Scaling recipes


def _two_regime_recipe(folder: Path, *, train_sizes: list[int]) -> Path:
    """A recipe of two debug regimes with explicit alphas (no calibration)."""
    recipe = {
        "seed": 1,
        "seq_len": 9,
        "regimes": [
            {"name": "a", "preset": "debug", "alpha": 0.5},
            {"name": "b", "preset": "debug", "alpha": 2.0, "target": "observed"},
        ],
        "scales": {"small": {"train_sizes": train_sizes, "n_test": 40}},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _run_all(submitted) -> None:
    """What the cluster would run: every task of every array, then the index job."""
    for store in submitted.stores:
        for job in store.jobs:
            job.submission().result()
    submitted.index_job.submission().result()


@pytest.mark.integration
def test_a_scaling_recipe_is_one_array_per_regime_then_an_index_job_after_them(
    tmp_path, fake_slurm
):
    slurm = fake_slurm()
    recipe_path = _two_regime_recipe(tmp_path, train_sizes=[30, 100])
    out = tmp_path / "out"
    submitted = submit_scaling(
        recipe_path, scale="small", out_dir=out, tasks=2, settings=SlurmSettings()
    )
    assert [store.job_id for store in submitted.stores] == ["101", "102"]
    assert submitted.index_job_id == "103"
    index_call = _directives(slurm.calls()[-1]["script"])
    assert {"--dependency=afterok:101:102", "--kill-on-invalid-dep=yes"} <= index_call
    assert "--job-name=gssm-index-small" in index_call and "--cpus-per-task=1" in index_call

    _run_all(submitted)
    index = json.loads((out / "recipe" / "index-small.json").read_text())
    assert [item["store"] for item in index["regimes"]] == [
        str(store.path) for store in submitted.stores
    ]


def test_named_regimes_alone_are_submitted_and_indexed(tmp_path, fake_slurm):
    fake_slurm()
    recipe_path = _two_regime_recipe(tmp_path, train_sizes=[30])
    out = tmp_path / "out"
    submitted = submit_scaling(
        recipe_path, scale="small", out_dir=out, tasks=1, settings=SlurmSettings(), regimes=["b"]
    )
    assert len(submitted.stores) == 1 and submitted.index_job_id == "102"
    assert submitted.index_job.submission().function.regimes == ("b",)
    _run_all(submitted)
    index = json.loads((out / "recipe" / "index-small.json").read_text())
    assert [item["name"] for item in index["regimes"]] == ["b"]


def test_without_srun_submit_scaling_fails_before_calibrating_anything(tmp_path, fake_slurm):
    fake_slurm(srun=False)
    recipe_path = _two_regime_recipe(tmp_path, train_sizes=[30])
    with pytest.raises(GssmDataError, match="srun not found"):
        submit_scaling(
            recipe_path, scale="small", out_dir=tmp_path / "out", tasks=1, settings=SlurmSettings()
        )
    assert not (tmp_path / "out").exists()
