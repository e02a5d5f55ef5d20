"""The training loop: learning, clipping, accumulation, NaN stop, exact resume after SIGKILL."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from llama_train.core.checkpoint import CheckpointManager
from llama_train.core.distributed import resolve_amp
from llama_train.core.model import Llama, ModelOutput
from llama_train.errors import LlamaTrainError
from llama_train.recipe.train import NonFiniteLoss, build_trainer, train
from llama_train.recipe.train_config import TrainConfig, resolve_config
from llama_train.rundir import CHECKPOINT_DIR, read_metrics

TINY = ["model.dim=16", "model.n_layers=1", "model.n_heads=2", "data.batch_size=8"]
# What depends on the arithmetic only (not on time or the machine): compared exactly.
DETERMINISTIC_KEYS = ("step", "loss", "grad_norm", "lr", "tokens", "epoch", "eval/loss")


@pytest.fixture(scope="module")
def store(make_debug_store) -> Path:
    """Debug preset, 256 train sequences in 4 chunks of 64, 32 test sequences of 17 tokens."""
    return make_debug_store(n_train=256, n_test=32, seq_len=17)


def _config(store: Path, run_dir: Path, *overrides: str) -> TrainConfig:
    return resolve_config(None, [f"data.path={store}", f"run.dir={run_dir}", *TINY, *overrides])


def test_the_loss_decreases_and_the_model_beats_the_unigram_baseline(store, tmp_path):
    config = _config(
        store,
        tmp_path / "run",
        "train.steps=40",
        "train.log_every=5",
        "optim.lr=3e-3",
        "optim.warmup_steps=5",
        "eval.every=20",
        "checkpoint.every=20",
    )
    summary = train(config, progress=False)
    records = read_metrics(config.run_dir)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[1]["eval/loss"] < evals[0]["eval/loss"]
    unigram_nats = summary["baselines"]["unigram_bits"] * 0.6931471805599453
    assert summary["test_entropy"] < summary["test_loss"] < unigram_nats
    assert summary["excess_loss"] == pytest.approx(summary["test_loss"] - summary["test_entropy"])
    assert summary["step"] == 40 and summary["tokens"] == 40 * 8 * 16
    assert json.loads((config.run_dir / "summary.json").read_text()) == summary
    line = next(r for r in records if "loss" in r)
    assert {"lr", "grad_norm", "tokens_per_s", "elapsed", "hostname", "rss_mb"} <= set(line)
    assert (config.run_dir / "config.yaml").is_file()
    assert CheckpointManager(config.run_dir / CHECKPOINT_DIR).steps() == [20, 40]


def test_clipping_logs_the_pre_clip_norm_and_steps_with_clipped_gradients(store, tmp_path):
    config = _config(store, tmp_path / "run", "optim.grad_clip=0.01", "optim.warmup_steps=0")
    trainer = build_trainer(config)
    reference = copy.deepcopy(trainer.model)
    first_batch = torch.from_numpy(trainer.loader.stream.rows(0, 8).astype("int64"))
    reference(first_batch[:, :-1], first_batch[:, 1:]).loss.backward()
    independent_norm = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in reference.parameters()])
    )
    norms_seen_by_the_optimizer = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads = [p.grad.norm() for p in trainer.model.parameters() if p.grad is not None]
        norms_seen_by_the_optimizer.append(torch.linalg.vector_norm(torch.stack(grads)).item())
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    _, pre_clip = trainer.train_step(iter(trainer.loader))
    assert pre_clip.item() == pytest.approx(independent_norm.item(), rel=1e-5)
    assert pre_clip.item() > 0.1
    assert norms_seen_by_the_optimizer == [pytest.approx(0.01, rel=1e-4)]


def test_accumulating_two_half_batches_equals_one_full_batch(store, tmp_path):
    def one_step(*overrides: str) -> tuple[float, list[torch.Tensor]]:
        trainer = build_trainer(_config(store, tmp_path / "+".join(overrides), *overrides))
        loss, _ = trainer.train_step(iter(trainer.loader))
        return loss.item(), [p.detach().clone() for p in trainer.model.parameters()]

    loss_accumulated, accumulated = one_step("data.batch_size=4", "train.grad_accum=2")
    loss_full, full = one_step("data.batch_size=8", "train.grad_accum=1")
    assert loss_accumulated == pytest.approx(loss_full, rel=1e-6)
    for a, b in zip(accumulated, full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(store, tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = Llama.forward

    def poisoned(self, tokens, targets=None, **kwargs) -> ModelOutput:
        output = forward(self, tokens, targets, **kwargs)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] >= 5:  # the fifth optimizer step
                return output._replace(loss=output.loss * float("nan"))
        return output

    monkeypatch.setattr(Llama, "forward", poisoned)
    config = _config(
        store,
        tmp_path / "run",
        "train.steps=10",
        "train.log_every=3",
        "checkpoint.every=2",
        "checkpoint.keep=5",
        "eval.every=100",
    )
    with pytest.raises(NonFiniteLoss) as caught:
        train(config, progress=False)
    message = str(caught.value)
    assert "loss nan at step 5" in message and "last good checkpoint (step 4)" in message
    manager = CheckpointManager(config.run_dir / CHECKPOINT_DIR)
    assert manager.steps() == [2, 4]
    step, state = manager.load_latest()
    assert step == 4
    assert all(torch.isfinite(tensor).all() for tensor in state["model"].values())


def test_build_trainer_without_a_process_group_refuses_a_multi_process_launch(
    store, tmp_path, monkeypatch
):
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(LlamaTrainError, match=r"rank 1 of 2 \(torchrun\)"):
        build_trainer(_config(store, tmp_path / "run"))


def test_fp16_needs_cuda_and_bf16_autocast_runs_on_the_cpu(store, tmp_path):
    with pytest.raises(LlamaTrainError, match=r"fp16 needs CUDA"):
        resolve_amp("fp16", torch.device("cpu"))
    assert resolve_amp("auto", torch.device("cpu")) is None
    summary = train(
        _config(store, tmp_path / "run", "train.amp=bf16", "train.steps=2"), progress=False
    )
    assert summary["test_loss"] == pytest.approx(summary["test_loss"])  # finite, not NaN


def test_resuming_with_another_model_is_refused_naming_the_keys(store, tmp_path):
    run_dir = tmp_path / "run"
    train(_config(store, run_dir, "train.steps=2"), progress=False)
    with pytest.raises(LlamaTrainError, match=r"model.dim: 16 -> 32"):
        build_trainer(_config(store, run_dir, "train.steps=2", "model.dim=32"))


def test_a_run_whose_config_predates_a_new_key_still_resumes(store, tmp_path):
    run_dir = tmp_path / "run"
    train(_config(store, run_dir, "train.steps=2"), progress=False)
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    del written["model"]["rope_scaling"]  # as written by a version without the key
    (run_dir / "config.yaml").write_text(yaml.safe_dump(written))
    build_trainer(_config(store, run_dir, "train.steps=4"))  # the default is no change
    with pytest.raises(LlamaTrainError, match=r"model.rope_scaling.method: none -> linear"):
        build_trainer(_config(store, run_dir, "train.steps=4", "model.rope_scaling.method=linear"))


def test_running_a_finished_run_again_changes_nothing(store, tmp_path):
    config = _config(store, tmp_path / "run", "train.steps=3", "train.log_every=1")
    first = train(config, progress=False)
    lines = (config.run_dir / "metrics.jsonl").read_text()
    again = train(config, progress=False)
    assert again == first
    assert (config.run_dir / "metrics.jsonl").read_text() == lines


def test_a_resumed_run_logs_into_the_same_wandb_run(store, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    wandb = ["logging.wandb.project=tests"]  # offline: the default once a project is named
    train(_config(store, run_dir, "train.steps=2", *wandb), progress=False)
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    train(_config(store, run_dir, "train.steps=4", *wandb), progress=False)
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    # Both sessions are folders of the one run id (wandb may suffix a folder name
    # when two sessions start within the same second).
    sessions = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(sessions) == 2, sessions
    assert all(run_id in path.name for path in sessions), (run_id, sessions)


# ---------------------------------------------------------------------------
# Exact resume after SIGKILL (subprocesses: the kill is real)

KILL_AT_STEP = 8  # killed as step 9 starts: checkpoints at 3 and 6; lines 7, 8 are replayed

KILLER = """
import os, signal, sys
from llama_train.recipe.train_config import resolve_config
from llama_train.recipe.train import Trainer, train

original = Trainer.train_step

def train_step(self, batches):
    if self.state.step == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, batches)

Trainer.train_step = train_step
train(resolve_config(sys.argv[1], sys.argv[2:]), progress=False)
"""


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.integration
def test_a_run_killed_with_sigkill_resumes_to_the_same_losses_step_for_step(store, tmp_path):
    config_path = tmp_path / "resume.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "data": {"path": str(store), "batch_size": 8},
                "model": {"dim": 16, "n_layers": 1, "n_heads": 2},
                "optim": {"lr": 3e-3, "warmup_steps": 2},
                "train": {"steps": 12, "log_every": 1, "progress": False},
                "eval": {"every": 4},
                "checkpoint": {"every": 3, "keep": 2},
            }
        )
    )
    env = {**os.environ, "KILL_AT_STEP": str(KILL_AT_STEP)}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    command = ["-m", "llama_train", "run", str(config_path)]
    done = _run([*command, f"run.dir={whole}"], env)
    assert done.returncode == 0, done.stderr
    interrupted = _run(["-c", KILLER, str(config_path), f"run.dir={killed}"], env)
    assert interrupted.returncode == -9, interrupted.stderr
    assert not (killed / "summary.json").exists()
    assert max(r["step"] for r in read_metrics(killed)) == KILL_AT_STEP
    resumed = _run([*command, f"run.dir={killed}"], env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and "from step 6" in resumed.stderr

    def deterministic(run_dir: Path) -> list[dict]:
        return [
            {key: record[key] for key in DETERMINISTIC_KEYS if key in record}
            for record in read_metrics(run_dir)
        ]

    expected = deterministic(whole)
    assert len(expected) == 12 + 3  # a line per step, evaluations at 4, 8, 12
    assert deterministic(killed) == expected
    summaries = [json.loads((d / "summary.json").read_text()) for d in (whole, killed)]
    assert summaries[0]["test_loss"] == summaries[1]["test_loss"]
    weights = [
        CheckpointManager(d / CHECKPOINT_DIR).load_latest()[1]["model"] for d in (whole, killed)
    ]
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name
