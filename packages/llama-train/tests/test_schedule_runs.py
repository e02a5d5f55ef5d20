"""The schedule as runs see it: the warmup rule, and old wsd runs resuming on their shape."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import yaml

from llama_train.core.optim import OptimConfig, lr_at
from llama_train.recipe.train import train
from llama_train.recipe.train_config import TrainConfig, read_run_config, resolve_config
from llama_train.rundir import CHECKPOINT_DIR, read_metrics

TINY = ["model.dim=16", "model.n_layers=1", "model.n_heads=2", "data.batch_size=8"]


@pytest.fixture(scope="module")
def store(make_debug_store) -> Path:
    return make_debug_store(n_train=256, n_test=32, seq_len=17)


def _config(store: Path, run_dir: Path, *overrides: str) -> TrainConfig:
    return resolve_config(
        None,
        [f"data.path={store}", f"run.dir={run_dir}", "train.log_every=1", *TINY, *overrides],
    )


def _logged_lrs(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_metrics(run_dir) if "lr" in r}


def test_the_warmup_rule_warms_up_over_n_tokens(store, tmp_path):
    config = _config(
        store, tmp_path / "run", "train.steps=3", "optim.warmup_tokens_per_parameter=1"
    )
    summary = train(config, progress=False)
    tokens_per_step = 8 * 16
    warmup = math.ceil(summary["parameters_total"] / tokens_per_step)
    assert summary["warmup_steps"] == warmup > 3
    lr = config.optim.lr
    assert _logged_lrs(config.run_dir) == {
        step: pytest.approx(lr * step / warmup) for step in (1, 2, 3)
    }


def test_an_old_wsd_run_resumes_on_its_linear_decay(store, tmp_path):
    """A config.yaml written before optim.decay_shape existed decayed linearly."""
    run_dir = tmp_path / "old"
    config = _config(
        store,
        run_dir,
        "train.steps=8",
        "checkpoint.every=4",
        "optim.schedule=wsd",
        "optim.decay_fraction=0.5",
        "optim.warmup_steps=0",
        "optim.decay_shape=linear",
    )
    train(config, progress=False)
    expected = _logged_lrs(run_dir)
    # Make the directory what an older version wrote: no decay_shape, stopped at step 4.
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    del stored["optim"]["decay_shape"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(stored))
    shutil.rmtree(run_dir / CHECKPOINT_DIR / "step_000008")
    (run_dir / "summary.json").unlink()
    assert read_run_config(run_dir).optim.decay_shape == "linear"

    resumed = _config(
        store,
        run_dir,
        "train.steps=8",
        "checkpoint.every=4",
        "optim.schedule=wsd",
        "optim.decay_fraction=0.5",
        "optim.warmup_steps=0",
    )
    assert resumed.optim.decay_shape == "1-sqrt"  # the new default, for new runs
    train(resumed, progress=False)
    assert _logged_lrs(run_dir) == expected
    linear = OptimConfig(
        lr=config.optim.lr,
        warmup_steps=0,
        schedule="wsd",
        decay_fraction=0.5,
        decay_shape="linear",
    )
    assert expected[8] == lr_at(7, 8, linear)
    assert read_run_config(run_dir).optim.decay_shape == "linear"
