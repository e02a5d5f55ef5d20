"""Studies train through stacks by default: the same points, the same collect table."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llama_train.cli import app
from llama_train.core.checkpoint import CheckpointManager
from llama_train.launch.stacks import stack_groups
from llama_train.launch.study import plan_study
from llama_train.recipe.train_config import resolve_config
from llama_train.rundir import CHECKPOINT_DIR, read_state

runner = CliRunner()
TRAIN_ROWS, SEQ_LEN = 192, 17
# Columns that depend on the arithmetic only (not on time, host or directory).
NUMERIC = ("loss", "entropy", "excess", "val_loss", "N", "D", "C", "epochs")


@pytest.fixture(scope="module")
def store(make_debug_store) -> Path:
    return make_debug_store(n_train=TRAIN_ROWS, n_test=32, seq_len=SEQ_LEN, block_size=32)


def _study(tmp_path: Path, store: Path, name: str, **extra: object) -> Path:
    base = tmp_path / "base.yaml"
    base.write_text(
        yaml.safe_dump(
            {
                "data": {"path": str(store), "batch_size": 8},
                "model": {"dim": 8, "n_layers": 1, "n_heads": 2},
                "optim": {"warmup_steps": 1, "grad_clip": 0.5},
                "train": {"threads": 1, "log_every": 1, "progress": False},
                "eval": {"batch_size": 16},
            }
        )
    )
    study = {
        "dir": str(tmp_path / name),
        "base": str(base),
        "regimes": [{"name": "debug", "store": str(store)}],
        "models": [
            {"name": "small", "model": {"dim": 8, "n_heads": 2}},
            {"name": "large", "model": {"dim": 16, "n_heads": 2}},
        ],
        "data": [32, 64],
        "steps": {"steps": 4},
        "lr": [1e-2, 3e-2],
        "seeds": [0, 1],
        "validation_sequences": 64,
        **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _collect(directory: Path) -> list[dict[str, str]]:
    result = runner.invoke(app, ["study", "collect", str(directory), "--every-lr"])
    assert result.exit_code == 0, result.output
    with (directory / "points.csv").open() as handle:
        return sorted(csv.DictReader(handle), key=lambda row: sorted(row.items()))


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_points_that_differ_in_lr_and_seed_share_a_stack(tmp_path, store):
    points = plan_study(_study(tmp_path, store, "study")).plan.points
    groups = stack_groups([p.config.train_config() for p in points])
    assert sorted(len(group) for group in groups) == [4, 4, 4, 4]  # 2 lr x 2 seeds each
    for group in groups:
        shapes = {(points[i].config.model.dim, points[i].config.data.n_train) for i in group}
        assert len(shapes) == 1
    assert len(stack_groups([p.config.train_config() for p in points], enabled=False)) == 16


@pytest.mark.integration
def test_a_study_trained_in_stacks_collects_the_table_of_one_by_one(tmp_path, store):
    stacked = runner.invoke(app, ["study", "run", str(_study(tmp_path, store, "stacked"))])
    assert stacked.exit_code == 0, stacked.output
    assert "in 4 stacks" in _flat(stacked.output) and "16 trained" in _flat(stacked.output)
    alone = runner.invoke(
        app, ["study", "run", str(_study(tmp_path, store, "alone")), "--no-stack"]
    )
    assert alone.exit_code == 0, alone.output
    assert "in 4 stacks" not in _flat(alone.output)
    rows_stacked, rows_alone = _collect(tmp_path / "stacked"), _collect(tmp_path / "alone")
    assert len(rows_stacked) == len(rows_alone) == 16
    for one, other in zip(rows_stacked, rows_alone, strict=True):
        for column in NUMERIC:
            if column in one:
                assert float(one[column]) == pytest.approx(float(other[column]), rel=1e-6), column
    status = runner.invoke(app, ["study", "status", str(tmp_path / "stacked"), "--json"])
    assert {point["state"] for point in json.loads(status.output)} == {"done"}
    again = runner.invoke(app, ["study", "run", str(_study(tmp_path, store, "stacked"))])
    assert "all 16 points are done" in _flat(again.output)


@pytest.mark.integration
def test_trunks_trained_in_stacks_fork_the_branches_of_trunks_trained_alone(tmp_path, store):
    """wsd trunks with cooldown branches and the warmup rule: stacked trunks checkpoint at
    their fork steps with the rule's warmup, and their branches, trained as stacks (one per
    model: 2 lr x 2 seeds), equal those of trunks trained one by one (a branch resumes from
    its trunk's fork checkpoint). The rule's warmup (2 steps for the small model, 3 for the
    large) puts the 4-step branches' forks at steps 2 and 3: both train steps of their own."""
    extra = {
        "branches": True,
        "steps": {"epochs": 1},
        "overrides": {
            "optim.schedule": "wsd",
            "optim.decay_fraction": 0.5,
            "optim.warmup_tokens_per_parameter": 0.08,
        },
    }
    stacked = runner.invoke(app, ["study", "run", str(_study(tmp_path, store, "s", **extra))])
    assert stacked.exit_code == 0, stacked.output
    alone = runner.invoke(
        app, ["study", "run", str(_study(tmp_path, store, "a", **extra)), "--no-stack"]
    )
    assert alone.exit_code == 0, alone.output
    rows_stacked, rows_alone = _collect(tmp_path / "s"), _collect(tmp_path / "a")
    assert len(rows_stacked) == len(rows_alone) == 16
    assert sum("/branches/" in row["run_dir"] for row in rows_stacked) == 8
    for one, other in zip(rows_stacked, rows_alone, strict=True):
        for column in NUMERIC:
            if column in one:
                assert float(one[column]) == pytest.approx(float(other[column]), rel=1e-6), column
    forks = {}
    for branch in (tmp_path / "s").glob("*/branches/*"):
        steps = CheckpointManager(branch / CHECKPOINT_DIR).steps()
        forks[branch.parent.parent.name.split("_")[1]] = steps[0]
        assert steps[-1] == 4
    assert forks == {"small": 2, "large": 3}


def test_a_trunk_whose_stacked_branch_diverges_fails_and_the_next_run_finishes_it(
    tmp_path, store, monkeypatch
):
    """Two trunks (lr) of one stack, one branch each (4 steps, forked at step 2), their
    branches stacked: the branch of the second diverges. Its trunk is recorded failed with
    the branch's reason, as a trunk trained alone is; the first is done; the same command
    then trains only the failed branch (it resumes from its fork)."""
    from llama_train.recipe.train_stack import StackTrainer

    extra = {
        "branches": True,
        "models": [{"name": "small", "model": {"dim": 8, "n_heads": 2}}],
        "seeds": [0],
        "steps": {"epochs": 1},
        "overrides": {"optim.schedule": "wsd", "optim.decay_fraction": 0.5},
    }
    path = _study(tmp_path, store, "s", **extra)
    step = StackTrainer.train_step

    def poisoned(self, batches):
        losses, norms = step(self, batches)
        if self.lead.run_dir.parent.name == "branches":
            losses = losses.clone()
            losses[1] = float("nan")
        return losses, norms

    monkeypatch.setattr(StackTrainer, "train_step", poisoned)
    first = runner.invoke(app, ["study", "run", str(path)])
    assert first.exit_code == 1, first.output
    said = _flat(first.output)
    assert "2 points to train, in 1 stacks" in said and "1 trained" in said, first.output
    status = runner.invoke(app, ["study", "status", str(tmp_path / "s"), "--json"])
    states = {point["name"]: point for point in json.loads(status.output)}
    good, bad = "debug_small_n64_lr0.01_s0", "debug_small_n64_lr0.03_s0"
    assert states[good]["state"] == "done"
    assert states[bad]["state"] == "failed"
    assert states[bad]["message"].startswith(
        f"1 of 1 branches of {tmp_path / 's' / bad} failed (the others are done): d512: "
        "loss nan at step 3"
    ), states[bad]["message"]
    assert (tmp_path / "s" / good / "branches" / "d512" / "summary.json").is_file()
    assert not (tmp_path / "s" / bad / "branches" / "d512" / "summary.json").exists()

    monkeypatch.setattr(StackTrainer, "train_step", step)
    again = runner.invoke(app, ["study", "run", str(path)])
    assert again.exit_code == 0, again.output
    assert "1 of 2 points to train" in _flat(again.output), again.output
    status = runner.invoke(app, ["study", "status", str(tmp_path / "s"), "--json"])
    assert {point["state"] for point in json.loads(status.output)} == {"done"}
    rows = _collect(tmp_path / "s")
    assert sum("/branches/" in row["run_dir"] for row in rows) == 2


@pytest.mark.parametrize("setting", ["model.dropout=0.1", "logging.wandb.mode=offline"])
def test_a_point_that_cannot_stack_trains_alone(store, setting):
    config = resolve_config(None, [f"data.path={store}", setting])
    other = resolve_config(None, [f"data.path={store}", setting, "optim.lr=1e-2"])
    assert stack_groups([config, other]) == [[0], [1]]
    plain = resolve_config(None, [f"data.path={store}", "optim.lr=1e-2"])
    assert stack_groups(
        [
            plain,
            plain.model_copy(
                update={"run": plain.run.model_copy(update={"name": "b", "dir": Path("runs/b")})}
            ),
        ]
    ) == [[0, 1]]


@pytest.mark.slow
def test_parallel_stacks_train_the_same_points(tmp_path, store):
    one = runner.invoke(app, ["study", "run", str(_study(tmp_path, store, "one"))])
    assert one.exit_code == 0, one.output
    two = runner.invoke(
        app, ["study", "run", str(_study(tmp_path, store, "two")), "--parallel", "2"]
    )
    assert two.exit_code == 0, two.output
    for row_one, row_two in zip(
        _collect(tmp_path / "one"), _collect(tmp_path / "two"), strict=True
    ):
        assert [row_one.get(c) for c in NUMERIC] == [row_two.get(c) for c in NUMERIC]


@pytest.mark.slow
def test_a_sweep_submitted_here_trains_each_stack_as_one_job(tmp_path, store):
    """`llama-train submit` groups a sweep's lr x seed points into one job (array task)
    per stack; each point ends as it does with --no-stack."""
    config = tmp_path / "sweep.yaml"
    config.write_text(
        json.dumps(
            {
                "data": {"path": str(store), "batch_size": 4},
                "model": {"dim": 16, "n_layers": 1, "n_heads": 2},
                "train": {"steps": 4, "log_every": 2, "threads": 1, "progress": False},
                "eval": {"every": 4},
                "checkpoint": {"every": 4},
                "sweep": {"optim.lr": [1e-3, 1e-2], "run.seed": [0, 1]},
            }
        )
    )
    losses = {}
    for mode, extra in (("stacked", []), ("alone", ["--no-stack"])):
        root = tmp_path / mode
        result = runner.invoke(app, ["submit", str(config), f"run.dir={root}", "--local", *extra])
        assert result.exit_code == 0, result.output
        manifest = json.loads((root / "sweep.json").read_text())
        names = [point["name"] for point in manifest["points"]]
        assert len(names) == 4
        jobs = {read_state(root / name).job_id for name in names}
        assert len(jobs) == (1 if mode == "stacked" else 4)
        losses[mode] = {
            name: json.loads((root / name / "summary.json").read_text())["test_loss"]
            for name in names
        }
    assert losses["stacked"] == losses["alone"]
