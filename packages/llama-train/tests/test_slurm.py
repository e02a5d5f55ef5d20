"""Slurm submission: time limits, sbatch parameters, the job wrapper's states and requeue,
and `llama-train submit --local` running a real job through submitit's local executor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from submitit.slurm.slurm import _make_sbatch_string
from typer.testing import CliRunner

from llama_train.cli import app
from llama_train.core.config_files import validate
from llama_train.core.distributed import PREEMPTED_EXIT_CODE
from llama_train.errors import LlamaTrainError
from llama_train.launch.slurm import TrainJob, executor_parameters, parse_time_limit
from llama_train.launch.submit_config import SlurmConfig, SubmitConfig
from llama_train.recipe import train as recipe
from llama_train.rundir import current_job_id, read_state

runner = CliRunner()


@pytest.mark.parametrize(
    ("text", "minutes"),
    [
        ("90", 90),
        ("1:30", 2),  # minutes:seconds, rounded up
        ("1:30:00", 90),
        ("2-00:00:00", 2880),
        ("1-12", 2160),
        ("0-00:10", 10),
    ],
)
def test_slurm_time_limits_become_minutes(text, minutes):
    assert parse_time_limit(text) == minutes


@pytest.mark.parametrize("text", ["", "1h", "0", "1:2:3:4", "-5"])
def test_a_time_limit_slurm_would_not_take_is_a_user_error(text):
    with pytest.raises(LlamaTrainError, match="is not a Slurm time limit"):
        parse_time_limit(text)


def test_a_gpu_node_runs_one_task_per_gpu_and_asks_for_sigusr1_before_the_limit(tmp_path):
    slurm = SlurmConfig(
        partition="gpu",
        timeout_min=240,
        nodes=2,
        gpus_per_node=4,
        cpus_per_task=8,
        mem="256G",
        signal_delay_s=180,
        additional={"exclude": "node3"},
        setup=["module load cuda"],
    )
    parameters = executor_parameters(slurm, job_name="big")
    assert parameters["ntasks_per_node"] == 4 and parameters["gpus_per_node"] == 4
    script = _make_sbatch_string(command="python -m job", folder=tmp_path, **parameters)
    lines = set(script.splitlines())
    expected = {
        "#SBATCH --partition=gpu",
        "#SBATCH --time=240",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=256G",
        "#SBATCH --signal=USR1@180",  # not submitit's USR2: the trainer checkpoints on USR1
        "#SBATCH --requeue",
        "#SBATCH --exclude=node3",
        "#SBATCH --job-name=big",
        "module load cuda",
    }
    assert expected <= lines
    assert not any("USR2" in line for line in lines)


def test_a_cpu_run_is_one_task_and_leaves_unset_resources_to_the_cluster():
    parameters = executor_parameters(SlurmConfig(), job_name="cpu")
    assert parameters["ntasks_per_node"] == 1
    for key in ("partition", "gpus_per_node", "cpus_per_task", "mem", "setup"):
        assert key not in parameters


def test_the_job_id_names_an_array_task_as_scontrol_does():
    assert current_job_id({"SLURM_JOB_ID": "12"}) == "12"
    array = {"SLURM_JOB_ID": "15", "SLURM_ARRAY_JOB_ID": "12", "SLURM_ARRAY_TASK_ID": "2"}
    assert current_job_id(array) == "12_2"
    assert current_job_id({"SUBMITIT_LOCAL_JOB_ID": "4242"}) == "4242"
    assert current_job_id({}) is None


# ---------------------------------------------------------------------------
# The job wrapper (the trainer replaced by stand-ins)


@pytest.fixture()
def job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TrainJob:
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_ARRAY_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    config = validate(
        {
            "data": {"path": "unused.zarr"},
            "run": {"dir": str(tmp_path)},
            "slurm": {"max_requeues": 2},
        },
        SubmitConfig,
    )
    return TrainJob(config)


def _preempt_at(step: int):
    def train(config, progress=None):
        raise recipe.Preempted(step, None if step == 0 else Path(f"checkpoints/step_{step:06d}"))

    return train


@pytest.fixture()
def requeues(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    def fake_requeue(job_id: str) -> str | None:
        calls.append(job_id)
        return None

    monkeypatch.setattr("llama_train.launch.slurm.requeue", fake_requeue)
    return calls


def test_a_finished_run_is_recorded_done(job, monkeypatch):
    monkeypatch.setattr(recipe, "train", lambda config, progress=None: {"step": 7})
    assert job() == {"step": 7}
    state = read_state(job.config.run_dir)
    assert state.state == "done" and state.step == 7 and state.job_id == "42"


def test_a_preempted_run_is_requeued_and_exits_with_the_preempted_code(job, monkeypatch, requeues):
    monkeypatch.setattr(recipe, "train", _preempt_at(12))
    with pytest.raises(SystemExit) as exit_:
        job()
    assert exit_.value.code == PREEMPTED_EXIT_CODE == 3
    assert requeues == ["42"]
    state = read_state(job.config.run_dir)
    assert (state.state, state.step) == ("preempted", 12)
    assert state.message == "checkpoint at step 12; requeued"


def test_a_signal_before_the_first_step_says_nothing_was_saved(job, monkeypatch, requeues):
    monkeypatch.setattr(recipe, "train", _preempt_at(0))
    with pytest.raises(SystemExit):
        job()
    assert read_state(job.config.run_dir).message == "stopped before step 1; requeued"


def test_an_array_task_requeues_itself_not_the_whole_array(job, monkeypatch, requeues):
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "40")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setattr(recipe, "train", _preempt_at(3))
    with pytest.raises(SystemExit):
        job()
    assert requeues == ["40_1"]


def test_after_max_requeues_a_preempted_run_waits_for_a_resubmission(job, monkeypatch, requeues):
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    monkeypatch.setattr(recipe, "train", _preempt_at(5))
    with pytest.raises(SystemExit):
        job()
    assert requeues == []
    state = read_state(job.config.run_dir)
    assert state.state == "preempted" and state.restarts == 2
    assert "not requeued after 2 requeues (slurm.max_requeues)" in state.message


def test_a_failed_requeue_is_recorded_with_what_to_do(job, monkeypatch):
    monkeypatch.setattr("llama_train.launch.slurm.requeue", lambda job_id: "Requeue of job denied")
    monkeypatch.setattr(recipe, "train", _preempt_at(5))
    with pytest.raises(SystemExit):
        job()
    message = read_state(job.config.run_dir).message
    assert message.startswith("checkpoint at step 5; requeue failed (Requeue of job denied);")
    assert message.endswith("submit again to resume")


def test_a_local_preempted_run_is_not_requeued(job, monkeypatch, requeues):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setattr(recipe, "train", _preempt_at(5))
    with pytest.raises(SystemExit):
        job()
    assert requeues == []
    assert read_state(job.config.run_dir).message == "checkpoint at step 5; submit again to resume"


def test_only_rank_zero_records_and_requeues(job, monkeypatch, requeues):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setattr(recipe, "train", _preempt_at(5))
    with pytest.raises(SystemExit) as exit_:
        job()
    assert exit_.value.code == 0
    assert requeues == [] and read_state(job.config.run_dir) is None


def test_an_error_is_recorded_failed_and_raised(job, monkeypatch):
    def broken(config, progress=None):
        raise LlamaTrainError("data.path: no store at unused.zarr")

    monkeypatch.setattr(recipe, "train", broken)
    with pytest.raises(LlamaTrainError):
        job()
    state = read_state(job.config.run_dir)
    assert state.state == "failed" and state.message == "data.path: no store at unused.zarr"


# ---------------------------------------------------------------------------
# The command, run for real through submitit's local executor


@pytest.fixture(scope="module")
def store(make_debug_store) -> Path:
    return make_debug_store(n_train=64, n_test=16, seq_len=9)


@pytest.mark.integration
def test_submit_local_trains_records_done_and_a_second_submit_skips_the_run(store, tmp_path):
    config = tmp_path / "tiny.yaml"
    run_dir = tmp_path / "runs" / "tiny"
    config.write_text(
        json.dumps(
            {
                "data": {"path": str(store), "batch_size": 4},
                "model": {"dim": 16, "n_layers": 1, "n_heads": 2},
                "train": {"steps": 4, "log_every": 2, "threads": 1},
                "eval": {"every": 4},
                "checkpoint": {"every": 4},
                "run": {"dir": str(run_dir)},
            }
        )
    )
    result = runner.invoke(app, ["submit", str(config), "--local"])
    assert result.exit_code == 0, result.output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 4
    assert read_state(run_dir).state == "done"
    manifest = json.loads((run_dir / "sweep.json").read_text())
    assert manifest["kind"] == "single" and manifest["executor"] == "local"
    assert "1 point(s): 1 done" in " ".join(result.output.split())
    again = runner.invoke(app, ["submit", str(config), "--local"])
    assert again.exit_code == 0
    assert "skipped .: done (step 4)" in again.output
    assert "nothing to submit" in " ".join(again.output.split())


def test_submit_with_a_bad_flag_or_key_is_a_one_line_error(store, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps({"data": {"path": str(store)}}))
    bad_time = runner.invoke(app, ["submit", str(config), "--time", "soon"])
    assert bad_time.exit_code == 1 and "--time 'soon' is not a Slurm time limit" in bad_time.output
    bad_key = runner.invoke(app, ["submit", str(config), "sweep.optim.lrr=[1e-3]"])
    assert bad_key.exit_code == 1 and "unknown config key 'optim.lrr'" in bad_key.output
