"""Per-size tuning in a study's table: parameter counts, the lr optimum, its edge, seed noise."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from llama_train.cli import app
from llama_train.core.model import Llama
from llama_train.errors import LlamaTrainError
from llama_train.launch.study import (
    missing_from_table,
    plan_study,
    read_widened,
    total_parameters,
    widen_edges,
    write_study_record,
)
from llama_train.scaling.plots import fit_lr_rule, plot_lr_sweeps
from llama_train.scaling.points import collect

runner = CliRunner()


def _write_study(directory: Path, runs: list[dict]) -> Path:
    """A study directory as collect reads it: study.json, summary.json, validation.json.

    Each run: regime, model, n_train, lr, seed, val_loss, loss, and optionally
    multiplier; the summary's parameter counts come from the model name.
    """
    counts = {"small": (1000, 800), "large": (8000, 7000)}
    points = []
    for run in runs:
        name = f"{run['regime']}_{run['model']}_n{run['n_train']}_lr{run['lr']}_s{run['seed']}"
        point = {
            "name": name,
            "regime": run["regime"],
            "model": run["model"],
            "n_train": run["n_train"],
            "lr": run["lr"],
            "seed": run["seed"],
            "steps": 10,
        }
        if "multiplier" in run:
            point["lr_multiplier"] = run["multiplier"]
        points.append(point)
        run_dir = directory / name
        run_dir.mkdir(parents=True)
        total, non_embedding = counts[run["model"]]
        summary = {
            "step": 10,
            "test_loss": run["loss"],
            "test_entropy": 1.0,
            "parameters_total": total,
            "parameters_non_embedding": non_embedding,
            "unique_tokens": run["n_train"] * 16,
            "tokens_seen": 160,
            "epochs": 1.0,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary))
        (run_dir / "validation.json").write_text(json.dumps({"loss": run["val_loss"]}))
    (directory / "study.json").write_text(json.dumps({"points": points}))
    return directory


def _run(model="small", lr=1e-2, seed=0, val_loss=2.0, loss=2.0, n_train=32, **extra):
    return {
        "regime": "r",
        "model": model,
        "n_train": n_train,
        "lr": lr,
        "seed": seed,
        "val_loss": val_loss,
        "loss": loss,
        **extra,
    }


def test_n_is_the_total_count_unless_asked_for_the_non_embedding_one(tmp_path):
    directory = _write_study(tmp_path / "s", [_run("small"), _run("large")])
    rows = {row["model"]: row for row in collect(directory)}
    assert (rows["small"]["N"], rows["large"]["N"]) == (1000, 8000)
    assert rows["small"]["N_total"] == 1000 and rows["small"]["N_non_embedding"] == 800
    assert rows["small"]["N_count"] == "total"
    rows = {row["model"]: row for row in collect(directory, parameters="non-embedding")}
    assert (rows["small"]["N"], rows["large"]["N"]) == (800, 7000)
    assert rows["small"]["N_count"] == "non-embedding"
    with pytest.raises(LlamaTrainError, match="total or non-embedding"):
        collect(directory, parameters="embedding")


def test_the_lr_optimum_is_the_vertex_of_the_parabola_in_log_lr(tmp_path):
    best = 0.013
    lrs = [0.0025, 0.005, 0.01, 0.02, 0.04]
    # A validation loss exactly quadratic in log lr, minimum at `best` (between 0.01 and 0.02).
    runs = [
        _run(lr=lr, val_loss=2.0 + 0.3 * (math.log(lr) - math.log(best)) ** 2, loss=2.5)
        for lr in lrs
    ]
    (row,) = collect(_write_study(tmp_path / "s", runs))
    assert row["lr"] == 0.01  # the best tried
    assert row["lr_opt"] == pytest.approx(best, rel=1e-9)
    assert row["lr_edge"] == "" and row["lr_tried"] == 5


@pytest.mark.parametrize(("best", "edge"), [(0.001, "low"), (1.0, "high")])
def test_an_optimum_on_the_edge_of_the_sweep_is_flagged(tmp_path, best, edge):
    runs = [_run(lr=lr, val_loss=abs(math.log(lr / best))) for lr in (0.005, 0.01, 0.02)]
    (row,) = collect(_write_study(tmp_path / "s", runs))
    assert row["lr_edge"] == edge
    assert row["lr_opt"] == row["lr"] == (0.005 if edge == "low" else 0.02)


def test_seed_noise_is_the_spread_of_the_test_loss_over_seeds(tmp_path):
    losses = {0: 2.10, 1: 2.16, 2: 2.07}
    runs = [_run(seed=seed, loss=loss) for seed, loss in losses.items()]
    runs.append(_run(model="large", seed=0, loss=1.9))
    rows = collect(_write_study(tmp_path / "s", runs))
    small = [row for row in rows if row["model"] == "small"]
    assert len(small) == 3
    for row in small:
        assert row["seeds"] == 3
        assert row["loss_seed_std"] == pytest.approx(statistics.stdev(losses.values()))
    (large,) = [row for row in rows if row["model"] == "large"]
    assert large["seeds"] == 1 and large["loss_seed_std"] is None


# --- the study file: rules per size, branches -----------------------------------------------

TRAIN_ROWS = 192
SEQ_LEN = 17


@pytest.fixture(scope="module")
def store(make_debug_store) -> Path:
    return make_debug_store(n_train=TRAIN_ROWS, n_test=32, seq_len=SEQ_LEN, block_size=32)


@pytest.fixture
def base(tmp_path: Path, store: Path) -> Path:
    path = tmp_path / "base.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "data": {"path": str(store), "batch_size": 8},
                "model": {"dim": 8, "n_layers": 1, "n_heads": 2},
                "optim": {"warmup_steps": 1, "schedule": "wsd", "decay_fraction": 0.5},
                "train": {"threads": 1, "log_every": 1, "progress": False},
                "eval": {"batch_size": 16, "max_sequences": 16},
            }
        )
    )
    return path


def _study_file(tmp_path: Path, base: Path, store: Path, **changes) -> Path:
    study = {
        "dir": str(tmp_path / "study"),
        "base": str(base),
        "regimes": [{"name": "debug", "store": str(store)}],
        "models": [
            {"name": "small", "model": {"dim": 8, "n_heads": 2}},
            {"name": "large", "model": {"dim": 16, "n_heads": 2}},
        ],
        "data": [32, 64],
        "steps": {"epochs": 1},
        "lr": {"c": 0.5, "exponent": -0.5, "multipliers": [0.5, 1, 2]},
        "validation_sequences": 64,
        **changes,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_the_lr_rule_centres_each_sizes_sweep_on_its_total_parameter_count(tmp_path, base, store):
    expanded = plan_study(_study_file(tmp_path, base, store))
    for size in ("small", "large"):
        points = [p for p in expanded.plan.points if p.overrides["model"] == size]
        model = Llama(points[0].config.model)
        n = model.num_parameters()  # the model's own count, embeddings and head included
        assert total_parameters(points[0].config.model, model.config.vocab_size) == n
        centre = 0.5 * n**-0.5
        lrs = sorted({p.config.optim.lr for p in points})
        assert lrs == pytest.approx([centre * m for m in (0.5, 1, 2)], rel=1e-5)
    assert {p.lr_multiplier for p in expanded.points} == {0.5, 1, 2}


def test_batch_and_beta2_per_size_by_rule_and_by_value(tmp_path, base, store):
    models = [
        {"name": "small", "model": {"dim": 8, "n_heads": 2}},
        {"name": "large", "model": {"dim": 16, "n_heads": 2}, "overrides": {"data.batch_size": 3}},
    ]
    rules = {
        "batch_tokens": {"c": 16 * 4, "exponent": 1.0, "reference": 1000},
        "beta2": {"threshold_tokens": 100, "below": 0.99, "above": 0.9},
    }
    expanded = plan_study(
        _study_file(tmp_path, base, store, models=models, per_size=rules, lr=[1e-2])
    )
    by_size = {p.overrides["model"]: p.config for p in expanded.plan.points}
    small = by_size["small"]
    n = Llama(small.model).num_parameters()
    assert small.data.batch_size == max(1, round(64 * n / 1000 / 16))
    expected_beta2 = 0.99 if small.data.batch_size * 16 < 100 else 0.9
    assert small.optim.betas == (0.9, expected_beta2)
    assert by_size["large"].data.batch_size == 3  # the size's own value wins over the rule


def test_a_branched_study_trains_one_trunk_per_lr_and_seed_and_collects_every_size(
    tmp_path, base, store
):
    path = _study_file(tmp_path, base, store, models=[{"name": "small", "model": {"dim": 8}}])
    path.write_text(path.read_text() + "branches: true\n")
    expanded = plan_study(path)
    assert len(expanded.plan.points) == 3  # one trunk per lr (data 64 = 8 steps)
    assert all(p.config.train.branches == [4 * 8 * 16] for p in expanded.plan.points)
    assert len(expanded.branch_points) == 3 and {b.steps for b in expanded.branch_points} == {4}
    dry = runner.invoke(app, ["study", "run", str(path), "--dry-run"])
    assert "3 point(s) and 3 cooldown branches" in " ".join(dry.output.split())
    result = runner.invoke(app, ["study", "run", str(path)])
    assert result.exit_code == 0, result.output
    directory = tmp_path / "study"
    status = runner.invoke(app, ["study", "status", str(directory)])
    assert status.exit_code == 0 and "branches/d512" in " ".join(status.output.split())
    again = runner.invoke(app, ["study", "run", str(path)])
    assert "all 3 points are done" in " ".join(again.output.split())
    assert missing_from_table(directory) == {}  # branches included: every point has its row
    rows = collect(directory)
    assert sorted((row["n_train"], row["D"]) for row in rows) == [
        (32, 4 * 8 * 16),
        (64, 8 * 8 * 16),
    ]
    # A branch's row is the branch's run: its own steps, validation and loss.
    branch = next(row for row in rows if row["n_train"] == 32)
    assert "/branches/d512" in branch["run_dir"] and branch["steps"] == 4
    summary = json.loads((Path(branch["run_dir"]) / "summary.json").read_text())
    assert summary["step"] == 4 and branch["loss"] == summary["test_loss"]
    # The bootstrap resamples a trunk with its branches: both rows carry the trunk's group.
    trunk = next(row for row in rows if row["n_train"] == 64)
    assert branch["group"] == trunk["group"] == Path(trunk["run_dir"]).name
    # Make the largest lr the best everywhere: status flags it, --widen-edges extends the sweep.
    for point in expanded.all_points:
        validation = directory / point.name / "validation.json"
        record = json.loads(validation.read_text())
        validation.write_text(json.dumps({**record, "loss": 3.0 - point.lr_multiplier}))
    status = runner.invoke(app, ["study", "status", str(directory)])
    assert "lr optimum on the high edge of the sweep: debug small n_train 64" in " ".join(
        status.output.split()
    )
    widened = runner.invoke(app, ["study", "run", str(path), "--widen-edges"])
    assert widened.exit_code == 0, widened.output
    assert "1 trained, 3 already done" in " ".join(widened.output.split())
    assert {row["lr_tried"] for row in collect(directory)} == {4}


def test_widen_edges_adds_a_multiplier_beyond_the_edge_the_optimum_sits_on(tmp_path, base, store):
    path = _study_file(tmp_path, base, store, models=[{"name": "small", "model": {"dim": 8}}])
    path.write_text(path.read_text().replace("- 64\n", "").replace("data:\n- 32\n", "data: [32]\n"))
    expanded = plan_study(path)
    directory = expanded.directory
    directory.mkdir(parents=True)
    # Pretend the sweep ran: the validation loss falls with the lr (optimum on the high edge).
    write_study_record(expanded)
    for point in expanded.points:
        run_dir = directory / point.name
        run_dir.mkdir()
        summary = {"step": point.steps, "test_loss": 2.0, "test_entropy": 1.0}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        (run_dir / "validation.json").write_text(json.dumps({"loss": 3.0 - point.lr}))
    assert widen_edges(expanded) == 1
    assert read_widened(directory) == {"debug/small": [4.0]}
    widened = plan_study(path)
    assert sorted({p.lr_multiplier for p in widened.points}) == [0.5, 1, 2, 4]


def test_the_lr_rule_fit_recovers_a_power_law():
    n = np.asarray([1e3, 4e3, 2e4, 1e5])
    c, k = fit_lr_rule(n, 0.7 * n**-0.33)
    assert (c, k) == (pytest.approx(0.7, rel=1e-9), pytest.approx(-0.33, rel=1e-9))
    with pytest.raises(LlamaTrainError, match="two model sizes"):
        fit_lr_rule(np.asarray([1e3, 1e3]), np.asarray([1e-2, 2e-2]))


def test_study_plot_draws_the_sweeps_and_lr_star_of_n(tmp_path):
    runs = []
    for model, best in (("small", 0.02), ("large", 0.01)):
        for lr in (0.005, 0.01, 0.02, 0.04):
            val = 2.0 + (math.log(lr) - math.log(best)) ** 2
            runs.append(_run(model=model, lr=lr, val_loss=val))
    directory = _write_study(tmp_path / "s", runs)
    paths = plot_lr_sweeps(collect(directory, every_lr=True), collect(directory), tmp_path / "p")
    assert [path.name for path in paths] == ["r-lr.png"]
    assert paths[0].stat().st_size > 10_000


def test_the_html_report_marks_an_lr_optimum_on_the_edge_of_its_sweep(tmp_path):
    from llama_train.analysis.html_report import LrMark, lr_marks

    runs = [_run("small", lr=lr, val_loss=abs(math.log(lr / 0.001))) for lr in (0.005, 0.01, 0.02)]
    runs += [_run("large", lr=lr, val_loss=abs(math.log(lr / 0.01))) for lr in (0.005, 0.01, 0.02)]
    directory = _write_study(tmp_path / "s", runs)
    for run_dir in directory.iterdir():
        if run_dir.is_dir():
            line = {"step": 10, "tokens": 160, "loss": 2.0}
            (run_dir / "metrics.jsonl").write_text(json.dumps(line) + "\n")
    marks = lr_marks([directory])
    assert marks == {
        (directory / "r_small_n32_lr0.005_s0").resolve(): LrMark(3, "low"),
        (directory / "r_large_n32_lr0.01_s0").resolve(): LrMark(3, ""),
    }
    out = tmp_path / "report.html"
    result = runner.invoke(app, ["report", str(directory), "--html", str(out)])
    assert result.exit_code == 0, result.output
    html = out.read_text()
    assert "r_small_n32_lr0.005_s0 [lr edge: low]" in html
    assert "best of 3 lr; on the low edge: widen the sweep" in html
    assert "lr edge: high" not in html and "[lr edge" not in html.replace("[lr edge: low]", "")
    # A folder of runs that is not a study gets no column.
    assert lr_marks([directory / "r_small_n32_lr0.01_s0"]) == {}
