"""Sweeps: grid validation, expansion, point names, planning, manifest, states, the winner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llama_train.analysis.status import point_status, rank_points, read_manifest, sweep_status
from llama_train.cli import app
from llama_train.core.config_files import validate
from llama_train.errors import LlamaTrainError
from llama_train.launch.submit_config import SubmitConfig, format_value, normalise_grid
from llama_train.launch.sweep import expand_grid, plan, point_name, write_manifest
from llama_train.rundir import write_state

runner = CliRunner()


@pytest.fixture(scope="module")
def store(make_debug_store) -> Path:
    return make_debug_store(n_train=64, n_test=16, seq_len=9)


def _grid_error(grid: object) -> str:
    with pytest.raises(LlamaTrainError) as caught:
        validate({"data": {"path": "unused.zarr"}, "sweep": grid}, SubmitConfig)
    return str(caught.value)


# ---------------------------------------------------------------------------
# The grid


def test_nested_and_dotted_keys_make_the_same_grid_and_an_override_keeps_the_position():
    nested = normalise_grid({"optim": {"lr": [1e-4, 3e-4]}, "model.dim": [32, 64]})
    dotted = normalise_grid({"optim.lr": [1e-4, 3e-4], "model": {"dim": [32, 64]}})
    assert nested == dotted == {"optim.lr": [1e-4, 3e-4], "model.dim": [32, 64]}
    # What `sweep.optim.lr=[1e-3]` after a YAML `optim.lr:` list builds: the override wins.
    overridden = normalise_grid({"optim.lr": [1e-4], "model.dim": [32], "optim": {"lr": [1e-3]}})
    assert list(overridden) == ["optim.lr", "model.dim"] and overridden["optim.lr"] == [1e-3]


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"optim.lrr": [1e-3]}, "unknown config key 'optim.lrr'; did you mean 'optim.lr'"),
        ({"optim": [1]}, "optim is a section"),
        ({"optim.lr": []}, "optim.lr: the list of values is empty"),
        ({"optim.lr": 3e-4}, "optim.lr: give a list of values"),
        ({"run.dir": ["a", "b"]}, "run.dir cannot be swept"),
        ({"slurm.nodes": [1, 2]}, "slurm.nodes cannot be swept"),
        ({"optim.lr": [1e-3, 0.001]}, "0.001 listed twice"),
        ([1, 2], "expected a mapping of config keys to lists"),
    ],
)
def test_a_bad_grid_is_a_one_line_config_error_naming_the_key(grid, message):
    error = _grid_error(grid)
    assert error.startswith("invalid config: sweep: ") and "\n" not in error
    assert message in error


def test_the_grid_expands_to_the_product_with_the_first_key_slowest():
    points = expand_grid({"optim.lr": [1, 2, 3], "model.dim": [32, 64]})
    assert points == [{"optim.lr": lr, "model.dim": dim} for lr in (1, 2, 3) for dim in (32, 64)]
    assert expand_grid({}) == [{}]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (3e-4, "0.0003"),
        (1e-5, "1e-05"),
        (100000.0, "100000"),  # `n_train: 1e5` arrives as a float
        (64, "64"),
        (True, "true"),
        (None, "null"),
        ([0.9, 0.95], "0.9_0.95"),
        ("datasets/a b.zarr", "datasets_a_b.zarr"),
    ],
)
def test_values_are_spelled_exactly_and_safely_in_point_names(value, text):
    assert format_value(value) == text


def test_point_names_list_the_overrides_in_grid_order_and_long_ones_are_hashed_stably():
    assert point_name({"optim.lr": 3e-4, "model.dim": 64}) == "optim.lr=0.0003,model.dim=64"
    assert point_name({}) == "."
    long = {"data.path": "x" * 300}
    name = point_name(long)
    assert len(name) == 200 and name == point_name(dict(long)) and "/" not in name
    assert name != point_name({"data.path": "x" * 299 + "y"})


# ---------------------------------------------------------------------------
# Planning


def _write_config(tmp_path: Path, store: Path, sweep: dict | None = None) -> Path:
    config = {
        "data": {"path": str(store), "batch_size": 4},
        "model": {"dim": 16, "n_layers": 1, "n_heads": 2},
        "train": {"steps": 5},
        "run": {"dir": str(tmp_path / "sweep")},
    }
    if sweep is not None:
        config["sweep"] = sweep
    path = tmp_path / "lr.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def test_a_plan_gives_each_point_its_overrides_and_run_directory(store, tmp_path):
    path = _write_config(tmp_path, store, {"optim.lr": [1e-3, 3e-3], "model.dim": [16, 32]})
    sweep = plan(path, ["train.steps=7"], {"partition": "debug"})
    assert sweep.is_sweep and sweep.directory == tmp_path / "sweep"
    assert [point.name for point in sweep.points] == [
        "optim.lr=0.001,model.dim=16",
        "optim.lr=0.001,model.dim=32",
        "optim.lr=0.003,model.dim=16",
        "optim.lr=0.003,model.dim=32",
    ]
    last = sweep.points[-1].config
    assert last.optim.lr == 3e-3 and last.model.dim == 32 and last.train.steps == 7
    assert last.run_dir == tmp_path / "sweep" / "optim.lr=0.003,model.dim=32"
    assert last.run.name == "lr/optim.lr=0.003,model.dim=32"
    assert last.sweep == {} and last.slurm.partition == "debug"
    assert last.model.vocab_size == sweep.base.model.vocab_size  # linked to the store


def test_a_config_without_a_grid_is_one_point_in_its_own_run_directory(store, tmp_path):
    sweep = plan(_write_config(tmp_path, store), [])
    assert not sweep.is_sweep
    assert [(point.name, point.config.run_dir) for point in sweep.points] == [
        (".", tmp_path / "sweep")
    ]


def test_a_bad_value_fails_before_submission_naming_its_point(store, tmp_path):
    path = _write_config(tmp_path, store, {"model.n_heads": [2, 3]})
    with pytest.raises(LlamaTrainError, match=r"^sweep point model.n_heads=3: invalid config"):
        plan(path, [])


def test_the_manifest_merges_resubmissions_and_keeps_every_job_id(store, tmp_path):
    path = _write_config(tmp_path, store, {"optim.lr": [1e-3, 3e-3]})
    sweep = plan(path, [])
    names = [point.name for point in sweep.points]
    common = {"executor": "slurm", "log_dir": tmp_path, "config_path": path, "overrides": []}
    write_manifest(sweep, {names[0]: "10_0", names[1]: "10_1"}, **common)
    write_manifest(sweep, {names[1]: "11"}, **common)
    manifest = read_manifest(sweep.directory)
    assert manifest["kind"] == "sweep" and manifest["grid"] == {"optim.lr": [1e-3, 3e-3]}
    points = {point["name"]: point for point in manifest["points"]}
    assert points[names[0]]["job_id"] == "10_0" and points[names[0]]["job_ids"] == ["10_0"]
    assert points[names[1]]["job_id"] == "11" and points[names[1]]["job_ids"] == ["10_1", "11"]
    assert points[names[1]]["overrides"] == {"optim.lr": 3e-3} and points[names[1]]["steps"] == 5
    assert [len(item["jobs"]) for item in manifest["submissions"]] == [2, 1]


# ---------------------------------------------------------------------------
# States


def _summary(run_dir: Path, *, loss: float, entropy: float = 1.0, step: int = 5) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "step": step,
        "test_loss": loss,
        "test_entropy": entropy,
        "excess_loss": loss - entropy,
        "tokens_per_s": 1000.0 / loss,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    _metrics(run_dir, [{"step": step, "loss": loss}, {"step": step, "eval/excess": loss - entropy}])


def _metrics(run_dir: Path, records: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "a") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")


def test_a_point_with_nothing_written_is_pending_until_it_leaves_the_queue(tmp_path):
    assert point_status(tmp_path, job_id="5_0", queue={"5_0"}).state == "pending"
    assert point_status(tmp_path, job_id="5_0", queue=None).state == "pending"
    gone = point_status(tmp_path, job_id="5_0", queue=set())
    assert gone.state == "failed" and "left the queue" in gone.message


def test_a_running_point_shows_its_step_and_latest_excess_and_fails_if_its_job_vanished(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    write_state(tmp_path, "running")
    _metrics(tmp_path, [{"step": 10, "loss": 2.0}, {"step": 10, "eval/excess": 0.5}, "torn"])
    (tmp_path / "metrics.jsonl").open("a").write('{"step": 20, "lo')  # a torn last line
    status = point_status(tmp_path, steps=50, queue={"7"})
    assert (status.state, status.step, status.steps, status.excess) == ("running", 10, 50, 0.5)
    assert status.job_id == "7"
    assert point_status(tmp_path, queue=set()).state == "failed"  # killed without a word


def test_done_failed_and_preempted_come_from_the_wrapper_record(tmp_path):
    done, failed, preempted, unmanaged = (tmp_path / name for name in ("d", "f", "p", "u"))
    _summary(done, loss=1.5)
    write_state(done, "done", step=5)
    write_state(failed, "failed", message="out of memory")
    write_state(preempted, "preempted", step=3, message="checkpoint at step 3; requeued")
    _summary(unmanaged, loss=1.2)  # `llama-train run` into the directory: no record
    status = point_status(done, queue=set())
    assert (status.state, status.test_loss, status.excess) == ("done", 1.5, 0.5)
    assert point_status(failed).state == "failed"
    assert point_status(failed).message == "out of memory"
    assert point_status(preempted, queue=set()).state == "preempted"
    assert point_status(preempted).step == 3  # the step it resumes from
    assert point_status(unmanaged).state == "done"
    (done / "summary.json").unlink()
    assert point_status(done).state == "failed"  # "done" without its result is not a result


def _finished_sweep(store: Path, tmp_path: Path) -> Path:
    path = _write_config(tmp_path, store, {"optim.lr": [1e-3, 3e-3, 1e-2]})
    sweep = plan(path, [])
    write_manifest(
        sweep,
        {point.name: f"9_{point.index}" for point in sweep.points},
        executor="local",
        log_dir=tmp_path,
        config_path=path,
        overrides=[],
    )
    for point, loss in zip(sweep.points, (1.4, 1.1, 1.3), strict=True):
        _summary(point.config.run_dir, loss=loss)
        write_state(point.config.run_dir, "done", step=5)
    return sweep.directory


def test_the_best_point_has_the_lowest_figure_or_the_highest_with_max(store, tmp_path):
    directory = _finished_sweep(store, tmp_path)
    statuses = sweep_status(directory)
    assert [status.state for status in statuses] == ["done"] * 3
    ranked = rank_points(statuses, "eval.excess")
    assert [(status.name, round(value, 9)) for status, value in ranked] == [
        ("optim.lr=0.003", 0.1),
        ("optim.lr=0.01", 0.3),
        ("optim.lr=0.001", 0.4),
    ]
    assert rank_points(statuses, "test_loss")[0][0].name == "optim.lr=0.003"
    assert rank_points(statuses, "tokens_per_s", maximize=True)[0][0].name == "optim.lr=0.003"
    with pytest.raises(LlamaTrainError, match=r"no finished point has 'nope'; choose one of: "):
        rank_points(statuses, "nope")


def test_best_needs_a_finished_point(tmp_path):
    write_state(tmp_path, "running")
    with pytest.raises(LlamaTrainError, match=r"no finished point to compare yet \(states: "):
        rank_points([point_status(tmp_path)], "test_loss")


def test_sweep_status_and_best_commands_print_the_table_json_and_winner(store, tmp_path):
    directory = _finished_sweep(store, tmp_path)
    table = runner.invoke(app, ["sweep-status", str(directory)])
    assert table.exit_code == 0, table.output
    words = " ".join(table.output.split())
    assert "3 point(s): 3 done" in words and words.count("│ done │") == 3
    rows = json.loads(runner.invoke(app, ["sweep-status", str(directory), "--json"]).output)
    assert [(row["name"], row["state"], row["job_id"]) for row in rows] == [
        ("optim.lr=0.001", "done", "9_0"),
        ("optim.lr=0.003", "done", "9_1"),
        ("optim.lr=0.01", "done", "9_2"),
    ]
    assert [round(row["excess"], 9) for row in rows] == [0.4, 0.1, 0.3]
    best = runner.invoke(app, ["best", str(directory), "--by", "test_loss"])
    assert best.exit_code == 0, best.output
    assert "best by test_loss: optim.lr=0.003 (1.1)" in best.output
    assert "overrides: optim.lr=0.003" in best.output
    winner = json.loads(runner.invoke(app, ["best", str(directory), "--json"]).output)
    assert winner["best"]["name"] == "optim.lr=0.003" and winner["by"] == "eval.excess"


def test_status_of_a_directory_that_is_no_run_is_a_one_line_error(tmp_path):
    result = runner.invoke(app, ["sweep-status", str(tmp_path)])
    assert result.exit_code == 1
    assert "is neither a sweep nor a run directory" in result.output


def test_a_folder_of_separate_runs_is_listed_and_ranked_like_a_sweep(tmp_path):
    folder = tmp_path / "runs"
    for name, loss in (("small", 1.4), ("large", 1.1)):
        _summary(folder / name, loss=loss)
        write_state(folder / name, "done", step=5)
    (folder / "notes").mkdir()  # not a run: ignored
    statuses = sweep_status(folder)
    assert [(status.name, status.state) for status in statuses] == [
        ("large", "done"),
        ("small", "done"),
    ]
    best = runner.invoke(app, ["best", str(folder), "--by", "test_loss"])
    assert best.exit_code == 0, best.output
    assert "best by test_loss: large (1.1)" in best.output
