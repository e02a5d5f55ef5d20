"""The light profiler (profile.csv), its resume after SIGKILL, and the torch.profiler window."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from llama_train.core import metrics
from llama_train.core.model import Llama
from llama_train.core.profiler import COLUMNS, flops_per_token, read_profile
from llama_train.recipe.train import train
from llama_train.recipe.train_config import resolve_config

TINY = ["model.dim=16", "model.n_layers=1", "model.n_heads=2", "data.batch_size=8"]


@pytest.fixture(scope="module")
def store(make_debug_store) -> Path:
    return make_debug_store(n_train=256, n_test=32, seq_len=17)


def _config(store: Path, run_dir: Path, *overrides: str):
    return resolve_config(None, [f"data.path={store}", f"run.dir={run_dir}", *TINY, *overrides])


def test_flops_per_token_counts_every_matmul_of_the_model() -> None:
    online = ["data.source=online", "data.preset=debug", "data.seq_len=17"]
    config = resolve_config(None, [*online, *TINY]).model
    model = Llama(config, seed=0)
    # Independent count: 2 FLOPs per multiply-add of every Linear (the head included),
    # x3 for forward + backward; attention: QK^T and AV over the context, both 2 d T.
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    context = config.max_seq_len - 1
    attention = 2 * (2 * config.dim * context) * config.n_layers
    expected = 3 * (2 * linear + attention)
    counted = flops_per_token(
        model.num_parameters(exclude_embeddings=True), config.n_layers, config.dim, context
    )
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert counted == pytest.approx(expected + 6 * norms, rel=1e-12)


def test_a_row_per_logged_step_with_throughput_and_mfu(store, tmp_path) -> None:
    config = _config(
        store,
        tmp_path / "run",
        "train.steps=6",
        "train.log_every=2",
        "eval.every=3",
        "checkpoint.every=6",
        "profile.peak_tflops=0.001",
    )
    summary = train(config, progress=False)
    rows = read_profile(config.run_dir)
    assert list(rows[0]) == list(COLUMNS)
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert [int(r["steps"]) for r in rows] == [2, 2, 2]
    per_token = flops_per_token(
        summary["parameters"] - 8 * 16, 1, 16, 16
    )  # parameters minus the input embedding (vocabulary 8, dim 16)
    for row in rows:
        wall, tokens_per_s = float(row["wall_s"]), float(row["tokens_per_s"])
        assert tokens_per_s == pytest.approx(2 * 8 * 16 / wall, rel=1e-4)
        assert float(row["tflops"]) == pytest.approx(per_token * tokens_per_s / 1e12, rel=1e-4)
        assert float(row["mfu"]) == pytest.approx(float(row["tflops"]) / 0.001, rel=1e-4)
        inside = sum(float(row[f"{p}_s"]) for p in ("data_wait", "forward_backward", "optimizer"))
        assert 0 < inside <= wall
        assert float(row["rss_mb"]) > 0 and row["hostname"]
        assert row["gpu_mem_peak_allocated_mb"] == ""  # CPU run
    assert float(rows[1]["eval_s"]) > 0  # the evaluation at step 3 is in the window 3..4
    assert float(rows[2]["checkpoint_s"]) > 0  # the last checkpoint is in the last row
    assert summary["profile_seconds"]["forward_backward"] == pytest.approx(
        sum(float(r["forward_backward_s"]) for r in rows), rel=1e-4
    )


def test_no_mfu_on_the_cpu_without_a_peak_and_nothing_when_disabled(store, tmp_path) -> None:
    config = _config(store, tmp_path / "a", "train.steps=2", "train.log_every=1")
    train(config, progress=False)
    assert [row["mfu"] for row in read_profile(config.run_dir)] == ["", ""]
    off = _config(store, tmp_path / "b", "train.steps=2", "profile.enabled=false")
    train(off, progress=False)
    assert not (off.run_dir / "profile.csv").exists()


KILLER = """
import os, signal, sys
from llama_train.recipe.train_config import resolve_config
from llama_train.recipe.train import Trainer, train

original = Trainer.train_step

def train_step(self, batches):
    if self.state.step == 8:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, batches)

Trainer.train_step = train_step
train(resolve_config(sys.argv[1], sys.argv[2:]), progress=False)
"""


@pytest.mark.integration
def test_a_run_killed_with_sigkill_resumes_its_profile_without_duplicate_rows(
    store, tmp_path
) -> None:
    config_path = tmp_path / "resume.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "data": {"path": str(store), "batch_size": 8},
                "model": {"dim": 16, "n_layers": 1, "n_heads": 2},
                "train": {"steps": 12, "log_every": 1, "progress": False},
                "eval": {"every": 6},
                "checkpoint": {"every": 3, "keep": 2},
            }
        )
    )
    run_dir = tmp_path / "killed"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *args, str(config_path), f"run.dir={run_dir}"],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )

    killed = run("-c", KILLER)
    assert killed.returncode == -9, killed.stderr
    assert [int(r["step"]) for r in read_profile(run_dir)] == list(range(1, 9))
    resumed = run("-m", "llama_train", "run")
    assert resumed.returncode == 0, resumed.stderr
    assert "from step 6" in resumed.stderr
    rows = read_profile(run_dir)
    assert [int(r["step"]) for r in rows] == list(range(1, 13))  # 7 and 8 replayed once
    assert all(int(r["steps"]) == 1 for r in rows)
    summary = json.loads((run_dir / "summary.json").read_text())
    # The totals came back from the checkpoint of step 6 and went on from there.
    assert summary["profile_seconds"]["optimizer"] == pytest.approx(
        sum(float(r["optimizer_s"]) for r in rows), rel=1e-3
    )


class FakeWandbRun:
    id = "fake1234"

    def __init__(self) -> None:
        self.artifacts: list = []
        self.summary: dict = {}

    def log(self, *args, **kwargs) -> None:
        pass

    def log_artifact(self, artifact) -> None:
        self.artifacts.append(artifact)

    def finish(self) -> None:
        pass


def test_a_torch_profiler_window_writes_a_trace_and_sends_it_to_wandb(
    store, tmp_path, monkeypatch
) -> None:
    fake = FakeWandbRun()
    monkeypatch.setattr(metrics, "_start_wandb", lambda *args: fake)
    config = _config(
        store,
        tmp_path / "run",
        "train.steps=5",
        "profile.start=2",
        "profile.steps=2",
        "logging.wandb.project=tests",
    )
    train(config, progress=False)
    trace = config.run_dir / "profile" / "trace_step2_rank0.json"
    events = json.loads(trace.read_text())["traceEvents"]
    steps = {e["name"] for e in events if e.get("name", "").startswith("train_step#")}
    assert steps == {"train_step#3", "train_step#4"}  # the two steps after step 2
    assert any(e.get("name") == "aten::mm" for e in events)
    [artifact] = fake.artifacts
    assert artifact.type == "profile" and trace.name in artifact.manifest.entries
