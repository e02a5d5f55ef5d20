"""`study run` builds the stores its study names, and only those, from a fresh start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llama_train.cli import app
from llama_train.errors import LlamaTrainError
from llama_train.launch.study import load_study

runner = CliRunner()

RECIPE = {
    "description": "three debug regimes; the study uses two",
    "seed": 3,
    "seq_len": 17,
    "regimes": [
        {"name": "debug-low", "preset": "debug", "alpha": 0.2, "target": "observed"},
        {"name": "debug-high", "preset": "debug", "alpha": 2.0, "target": "observed"},
        {"name": "debug-unused", "preset": "debug", "alpha": 1.0, "target": "observed"},
    ],
    "scales": {"tiny": {"train_sizes": [32, 96], "n_test": 16}},
}


def _write(tmp_path: Path) -> Path:
    recipe = tmp_path / "datasets" / "recipe.yaml"
    recipe.parent.mkdir()
    recipe.write_text(yaml.safe_dump(RECIPE))
    base = tmp_path / "base.yaml"
    base.write_text(
        yaml.safe_dump(
            {
                "data": {"path": "placeholder.zarr", "batch_size": 8},
                "model": {"dim": 8, "n_layers": 1, "n_heads": 2},
                "optim": {"warmup_steps": 1},
                "train": {"threads": 1, "log_every": 1, "progress": False},
                "eval": {"batch_size": 16},
            }
        )
    )
    study = tmp_path / "study.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "dir": str(tmp_path / "runs"),
                "base": str(base),
                "stores": {"recipe": str(recipe), "scale": "tiny"},
                "regimes": ["debug-low", "debug-high"],
                "models": [{"name": "m", "model": {"dim": 8, "n_heads": 2}}],
                "data": [32],
                "steps": {"steps": 2},
                "lr": [1e-2],
                "validation_sequences": 32,
            }
        )
    )
    return study


def test_study_run_builds_only_the_stores_its_study_names(tmp_path: Path) -> None:
    study = _write(tmp_path)
    index = tmp_path / "datasets" / "recipe" / "index-tiny.json"
    assert load_study(study).index == index  # the recipe's index by default
    result = runner.invoke(app, ["study", "run", str(study)])
    assert result.exit_code == 0, result.output
    assert "building 2 of 2 store(s) (debug-low, debug-high)" in result.output
    assert "on an idle CPU" in result.output  # about how long
    listed = {entry["name"] for entry in json.loads(index.read_text())["regimes"]}
    assert listed == {"debug-low", "debug-high"}
    stores = sorted(p.name for p in index.parent.glob("*.zarr"))
    assert len(stores) == 2 and not any("unused" in name for name in stores)
    points = sorted(p.name for p in (tmp_path / "runs").glob("debug-*"))
    assert [p.split("_")[0] for p in points] == ["debug-high", "debug-low"]
    assert all((tmp_path / "runs" / p / "validation.json").is_file() for p in points)
    # Again: nothing to build, nothing to train.
    again = runner.invoke(app, ["study", "run", str(study)])
    assert again.exit_code == 0, again.output
    assert "store(s)" not in again.output and "all 2 points are done" in again.output


def test_an_index_elsewhere_than_the_recipes_is_refused(tmp_path: Path) -> None:
    study = _write(tmp_path)
    raw = yaml.safe_load(study.read_text())
    study.write_text(yaml.safe_dump(raw | {"index": "elsewhere/index-tiny.json"}))
    with pytest.raises(LlamaTrainError, match=r"is not where stores\.recipe writes its index"):
        load_study(study)
