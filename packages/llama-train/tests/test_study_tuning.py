"""Per-size tuning in a study's table: parameter counts, the lr optimum, its edge, seed noise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama_train.errors import LlamaTrainError
from llama_train.scaling.points import collect


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
