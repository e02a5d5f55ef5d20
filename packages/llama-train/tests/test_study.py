"""Scaling studies: the study file, its expansion, lr selection on the held-out slice, a run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llama_train.cli import app
from llama_train.core.model import Llama, ModelConfig
from llama_train.errors import LlamaTrainError
from llama_train.launch.study import (
    load_study,
    non_embedding_parameters,
    plan_study,
    shape_for_parameters,
)
from llama_train.scaling.points import select_best_lr

runner = CliRunner()
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
                "optim": {"warmup_steps": 1},
                "train": {"threads": 1, "log_every": 1, "progress": False},
                "eval": {"batch_size": 16},
            }
        )
    )
    return path


def _study(tmp_path: Path, base: Path, store: Path, **changes) -> Path:
    study = {
        "dir": str(tmp_path / "study"),
        "base": str(base),
        "regimes": [{"name": "debug", "store": str(store)}],
        "models": [
            {"name": "small", "model": {"dim": 8, "n_heads": 2}},
            {"name": "large", "model": {"dim": 16, "n_heads": 2}},
        ],
        "data": [32, 64],
        "steps": {"steps": 3},
        "lr": [1e-2],
        "validation_sequences": 64,
        **changes,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_expansion_is_the_full_grid_with_the_steps_rule(tmp_path, base, store):
    path = _study(tmp_path, base, store, lr=[1e-3, 1e-2], seeds=[0, 1], steps={"epochs": 2})
    expanded = plan_study(path)
    assert len(expanded.points) == 1 * 2 * 2 * 2 * 2  # regimes x models x data x lr x seeds
    assert len({point.name for point in expanded.points}) == len(expanded.points)
    by_name = {point.name: point for point in expanded.plan.points}
    point = by_name["debug_large_n64_lr0.001_s1"]
    config = point.config
    assert (config.model.dim, config.data.n_train, config.optim.lr, config.run.seed) == (
        16,
        64,
        1e-3,
        1,
    )
    assert config.train.steps == 2 * 64 // 8  # two epochs of 64 rows, 8 rows a step
    assert config.run_dir == tmp_path / "study" / point.name
    # The held-out slice: the last 64 train rows, after every data size.
    assert expanded.validation_first["debug"] == TRAIN_ROWS - 64
    tokens = plan_study(_study(tmp_path, base, store, steps={"tokens": 1000}))
    assert {p.steps for p in tokens.points} == {-(-1000 // (8 * (SEQ_LEN - 1)))}


def test_compiled_points_share_one_compile_cache_in_the_study_directory(tmp_path, base, store):
    """Every point of a shape compiles the same graphs, so a compiled study points them
    all at one cache (a shape compiles once per study); a cache the user chose wins,
    and an eager study sets none."""
    compiled = plan_study(_study(tmp_path, base, store, overrides={"train.compile": True}))
    caches = {point.config.train.compile_cache for point in compiled.plan.points}
    assert caches == {tmp_path / "study" / "compile-cache"}
    mine = tmp_path / "mine"
    own = {"train.compile": True, "train.compile_cache": str(mine)}
    chosen = plan_study(_study(tmp_path, base, store, overrides=own))
    assert {point.config.train.compile_cache for point in chosen.plan.points} == {mine}
    eager = plan_study(_study(tmp_path, base, store))
    assert {point.config.train.compile_cache for point in eager.plan.points} == {None}


def test_data_reaching_into_the_validation_slice_is_refused(tmp_path, base, store):
    path = _study(tmp_path, base, store, data=[32, TRAIN_ROWS - 63])
    with pytest.raises(LlamaTrainError, match="reaches into the validation slice"):
        plan_study(path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"steps": {"steps": 3, "epochs": 1}}, "exactly one of tokens, epochs or steps"),
        ({"lr": [1e-3, 1e-3]}, "lr: a value is listed twice"),
        ({"models": [{"model": {"dimm": 8}}]}, "unknown config key 'model.dimm'"),
        ({"overrides": {"optim.lrr": 1}}, "unknown config key 'optim.lrr'"),
        ({"surprise": 1}, "surprise"),
        ({"regimes": ["hmm-low"]}, "set index"),
    ],
)
def test_bad_study_files_are_one_line_errors(tmp_path, base, store, changes, message):
    with pytest.raises(LlamaTrainError, match=message.replace("(", r"\(")):
        plan_study(_study(tmp_path, base, store, **changes))


def test_parameter_targets_become_shapes_the_model_agrees_with():
    for dim, layers, heads, kv in ((16, 1, 2, None), (48, 2, 3, None), (64, 2, 4, 2)):
        config = ModelConfig(
            dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv, vocab_size=32, max_seq_len=16
        )
        expected = Llama(config).num_parameters(exclude_embeddings=True)
        assert non_embedding_parameters(config, 32) == expected
    shape = shape_for_parameters(1e5, 32)
    count = non_embedding_parameters(ModelConfig(**shape), 32)
    assert 0.7e5 < count < 1.4e5
    assert shape["dim"] % shape["n_heads"] == 0


def test_lr_is_chosen_on_the_validation_slice_not_the_test_split():
    rows = [
        {
            "regime": "r",
            "model": "m",
            "n_train": 64,
            "seed": 0,
            "lr": 1e-3,
            "val_loss": 1.0,
            "loss": 0.5,
        },
        {
            "regime": "r",
            "model": "m",
            "n_train": 64,
            "seed": 0,
            "lr": 1e-2,
            "val_loss": 0.9,
            "loss": 0.7,
        },
        {
            "regime": "r",
            "model": "m",
            "n_train": 128,
            "seed": 0,
            "lr": 1e-3,
            "val_loss": 0.8,
            "loss": 0.6,
        },
    ]
    best = select_best_lr(rows)
    assert [(row["n_train"], row["lr"], row["lr_tried"]) for row in best] == [
        (64, 1e-2, 2),  # lower validation loss wins, although its test loss is higher
        (128, 1e-3, 1),
    ]


def _flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines at the terminal width


def test_a_tiny_study_runs_resumes_and_collects(tmp_path, base, store):
    path = _study(tmp_path, base, store)
    directory = tmp_path / "study"
    result = runner.invoke(app, ["study", "run", str(path)])
    assert result.exit_code == 0, result.output
    assert "4 trained, 0 already done, 0 failed" in _flat(result.output)
    for point in plan_study(path).plan.points:
        summary = json.loads((point.config.run_dir / "summary.json").read_text())
        validation = json.loads((point.config.run_dir / "validation.json").read_text())
        assert validation["first"] == TRAIN_ROWS - 64 and validation["sequences"] == 64
        assert summary["unique_tokens"] == point.config.data.n_train * (SEQ_LEN - 1)
        assert summary["tokens_seen"] == 3 * 8 * (SEQ_LEN - 1)
        assert (
            summary["flops_6nd"] == 6 * summary["parameters_non_embedding"] * summary["tokens_seen"]
        )
        model = point.config.model
        attention = 6 * model.n_layers * (SEQ_LEN - 1) * model.dim * summary["tokens_seen"]
        assert summary["flops_attention"] == attention
        assert summary["flops"] == summary["flops_6nd"] + attention
        assert summary["parameters_total"] > summary["parameters_non_embedding"]
        assert len(summary["store_fingerprint"]) == 16
    again = runner.invoke(app, ["study", "run", str(path)])
    assert "all 4 points are done" in _flat(again.output)
    status = runner.invoke(app, ["study", "status", str(directory), "--json"])
    states = json.loads(status.output)
    assert [point["state"] for point in states] == ["done"] * 4
    assert all(isinstance(point["val_loss"], float) for point in states)
    collected = runner.invoke(app, ["study", "collect", str(directory)])
    assert collected.exit_code == 0, collected.output
    with (directory / "points.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4
    assert {row["model"] for row in rows} == {"small", "large"}
    assert {int(row["D"]) for row in rows} == {32 * 16, 64 * 16}
    for row in rows:
        assert float(row["excess"]) == pytest.approx(float(row["loss"]) - float(row["entropy"]))
        assert float(row["epochs"]) == pytest.approx(3 * 8 / int(row["n_train"]))


def test_study_commands_refuse_a_folder_that_is_not_a_study(tmp_path):
    for command in ("status", "collect", "plot"):
        result = runner.invoke(app, ["study", command, str(tmp_path)])
        assert result.exit_code == 1
        assert "not a study directory" in result.output


def test_load_study_names_the_study_after_its_file(tmp_path, base, store):
    path = _study(tmp_path, base, store)
    assert load_study(path).name == "study"


@pytest.mark.slow
def test_parallel_workers_train_the_same_points_as_one_process(tmp_path, base, store):
    """--parallel 2 (spawned workers) gives the losses of the in-process run, bit for bit."""
    serial = _study(tmp_path, base, store)
    result = runner.invoke(app, ["study", "run", str(serial)])
    assert result.exit_code == 0, result.output
    parallel_dir = tmp_path / "parallel"
    parallel = tmp_path / "parallel.yaml"
    parallel.write_text(serial.read_text().replace(str(tmp_path / "study"), str(parallel_dir)))
    result = runner.invoke(app, ["study", "run", str(parallel), "--parallel", "2"])
    assert result.exit_code == 0, result.output
    assert "4 trained" in _flat(result.output)
    for point in plan_study(serial).points:
        one = json.loads((tmp_path / "study" / point.name / "summary.json").read_text())
        two = json.loads((parallel_dir / point.name / "summary.json").read_text())
        assert one["test_loss"] == two["test_loss"]
