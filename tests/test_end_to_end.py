"""generate -> train -> eval, through the installed commands, as a user runs them.

The numbers tie the packages together: the trainer's entropy is the one
`gssm-data` measured for the store, its excess loss is the difference, and
`llama-train eval` on the saved checkpoint gives back the run's own figures,
whether the entropy comes from the manifest or from the per-token array that
`gssm-data entropy --write` adds.
"""

from __future__ import annotations

import json
import math

import pytest
import yaml

from gssm_data.store import open_store
from llama_train.rundir import read_metrics

# The installed commands end to end, as a user runs them: excluded from `make test-fast`.
pytestmark = pytest.mark.integration


def test_generate_train_and_evaluate_against_the_exact_entropy(cli, tmp_path):
    cli(
        "gssm-data", "generate", "--preset", "debug", "--n", "1000", "--n-test", "100",
        "--seq-len", "33", "--out", "debug.zarr", "--workers", "1", "--quiet",
    )  # fmt: skip
    manifest = open_store(tmp_path / "debug.zarr").manifest
    (tmp_path / "run.yaml").write_text(
        yaml.safe_dump(
            {
                "data": {"path": "debug.zarr", "batch_size": 16},
                "model": {"dim": 32, "n_layers": 2, "n_heads": 2},
                "optim": {"lr": 3e-3, "warmup_steps": 10},
                "train": {"steps": 40, "log_every": 10, "progress": False},
                "eval": {"every": 20},
                "checkpoint": {"every": 20},
            }
        )
    )
    trained = cli("llama-train", "run", "run.yaml", "run.dir=runs/e2e")
    assert "excess loss" in trained.stdout
    run_dir = tmp_path / "runs" / "e2e"
    summary = json.loads((run_dir / "summary.json").read_text())
    test_entropy = manifest.splits["test"].entropy
    assert summary["step"] == 40
    assert summary["test_entropy"] == pytest.approx(test_entropy.nats_per_token, rel=1e-12)
    assert summary["excess_loss"] == pytest.approx(summary["test_loss"] - summary["test_entropy"])
    assert summary["excess_loss_bits"] == pytest.approx(summary["excess_loss"] / math.log(2))
    assert 0 < summary["excess_loss"] < summary["baselines"]["unigram_bits"] * math.log(2)
    losses = [record["loss"] for record in read_metrics(run_dir) if "loss" in record]
    assert losses[-1] < losses[0]

    evaluated = json.loads(cli("llama-train", "eval", "runs/e2e", "--json").stdout)
    assert evaluated["loss"] == pytest.approx(summary["test_loss"], rel=1e-9)
    assert evaluated["entropy_method"] == "exact (manifest)"

    cli("gssm-data", "entropy", "debug.zarr", "--write", "--quiet")
    stored = json.loads(cli("llama-train", "eval", "runs/e2e", "--json").stdout)
    assert stored["entropy_method"] == "exact (stored per token)"
    assert stored["entropy"] == pytest.approx(summary["test_entropy"], rel=1e-6)  # float32
    assert stored["excess"] == pytest.approx(summary["excess_loss"], abs=1e-6)
