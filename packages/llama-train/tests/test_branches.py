"""Cooldown branches: each equals the run trained from scratch with its length, bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from llama_train.analysis.runs import find_runs
from llama_train.core.checkpoint import CheckpointManager
from llama_train.core.weights import WEIGHTS_FILE, read_weights
from llama_train.errors import LlamaTrainError
from llama_train.recipe.branches import branch_dir
from llama_train.recipe.train import Preempted, Trainer, train
from llama_train.recipe.train_config import TrainConfig, read_run_config, resolve_config
from llama_train.rundir import CHECKPOINT_DIR, read_metrics

TINY = ["model.dim=16", "model.n_layers=1", "model.n_heads=2", "data.batch_size=8"]
DETERMINISTIC_KEYS = ("step", "loss", "grad_norm", "lr", "tokens", "epoch", "eval/loss")
TOKENS_PER_STEP = 8 * 16
# Trunk of 12 steps; branches of 5 steps (640 tokens) and 9 steps (1025 tokens, rounded up).
# decay_fraction 0.5: the 5-step branch decays over its last round(2.5) = 2 steps (fork at
# 3), the 9-step one over its last 4 (fork at 5), the trunk over its last 6.
SHORT, LONG = 640, 1025
FORKS = {SHORT: 3, LONG: 5}
STEPS = {SHORT: 5, LONG: 9}


@pytest.fixture(scope="module")
def store(make_debug_store) -> Path:
    return make_debug_store(n_train=256, n_test=32, seq_len=17)


def _config(store: Path, run_dir: Path, *overrides: str) -> TrainConfig:
    return resolve_config(
        None,
        [
            f"data.path={store}",
            f"run.dir={run_dir}",
            *TINY,
            "optim.schedule=wsd",
            "optim.decay_fraction=0.5",
            "optim.warmup_steps=2",
            "optim.lr=3e-3",
            "train.log_every=1",
            "eval.every=3",
            "eval.max_sequences=16",
            "checkpoint.every=100",
            "run.seed=3",
            *overrides,
        ],
    )


def _trunk(store: Path, root: Path) -> TrainConfig:
    return _config(store, root / "trunk", "train.steps=12", f"train.branches=[{SHORT},{LONG}]")


def _record(run_dir: Path) -> dict:
    """What must be identical: the deterministic metrics, the summary's loss, the weights."""
    metrics = [
        {key: r[key] for key in DETERMINISTIC_KEYS if key in r} for r in read_metrics(run_dir)
    ]
    steps = CheckpointManager(run_dir / CHECKPOINT_DIR).steps()
    weights, _ = read_weights(
        CheckpointManager(run_dir / CHECKPOINT_DIR).folder(steps[-1]) / WEIGHTS_FILE
    )
    summary = (run_dir / "summary.json").read_text()
    return {"metrics": metrics, "weights": weights, "summary": summary}


def _assert_same_run(branch: Path, scratch: Path) -> None:
    a, b = _record(branch), _record(scratch)
    assert a["metrics"] == b["metrics"]
    assert a["weights"].keys() == b["weights"].keys()
    for key, tensor in a["weights"].items():
        assert torch.equal(tensor, b["weights"][key]), key
    summary_a, summary_b = json.loads(a["summary"]), json.loads(b["summary"])
    for key in ("step", "test_loss", "tokens", "tokens_seen", "flops", "parameters_total"):
        assert summary_a[key] == summary_b[key], key


@pytest.fixture(scope="module")
def scratch(store, tmp_path_factory) -> dict[int, Path]:
    """The reference: each branch's length trained from scratch as an ordinary wsd run."""
    root = tmp_path_factory.mktemp("scratch")
    runs = {}
    for tokens, steps in STEPS.items():
        config = _config(store, root / f"s{steps}", f"train.steps={steps}")
        train(config, progress=False)
        runs[tokens] = config.run_dir
    return runs


def test_each_branch_equals_the_run_trained_from_scratch_with_its_length(store, scratch, tmp_path):
    trunk = _trunk(store, tmp_path)
    summary = train(trunk, progress=False)
    assert summary["step"] == 12
    # The trunk keeps its fork checkpoints (keep=2 would have dropped step 3).
    assert CheckpointManager(trunk.run_dir / CHECKPOINT_DIR).steps() == [3, 5, 12]
    for tokens, reference in scratch.items():
        branch = branch_dir(trunk.run_dir, tokens)
        config = read_run_config(branch)
        assert config.train.steps == STEPS[tokens] and config.train.branches == []
        _assert_same_run(branch, reference)
    # Commands that read runs take a trunk with its branches.
    assert set(find_runs([trunk.run_dir])) == {
        trunk.run_dir,
        *(branch_dir(trunk.run_dir, tokens) for tokens in STEPS),
    }
    # Running it again trains nothing.
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("summary.json")}
    train(trunk, progress=False)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("summary.json")} == stamps


def test_a_preempted_branch_resumes_to_the_same_run(store, scratch, tmp_path, monkeypatch):
    step = Trainer.train_step
    calls = {"n": 0}

    def signalled(self, batches):
        if self.config.run_dir == branch_dir(tmp_path / "trunk", LONG):
            calls["n"] += 1
            if calls["n"] == 2:  # the branch's second step after the fork (step 7)
                os.kill(os.getpid(), signal.SIGUSR1)
        return step(self, batches)

    monkeypatch.setattr(Trainer, "train_step", signalled)
    trunk = _trunk(store, tmp_path)
    with pytest.raises(Preempted):
        train(trunk, progress=False)
    assert (branch_dir(trunk.run_dir, SHORT) / "summary.json").is_file()
    assert not (branch_dir(trunk.run_dir, LONG) / "summary.json").is_file()
    train(trunk, progress=False)
    for tokens, reference in scratch.items():
        _assert_same_run(branch_dir(trunk.run_dir, tokens), reference)


def test_a_preempted_trunk_resumes_and_keeps_its_fork_checkpoints(
    store, scratch, tmp_path, monkeypatch
):
    step = Trainer.train_step
    calls = {"n": 0}

    def signalled(self, batches):
        if self.config.run_dir == tmp_path / "trunk":
            calls["n"] += 1
            if calls["n"] == 7:  # step 6 of the trunk, past both fork points
                os.kill(os.getpid(), signal.SIGUSR1)
        return step(self, batches)

    monkeypatch.setattr(Trainer, "train_step", signalled)
    trunk = _trunk(store, tmp_path)
    with pytest.raises(Preempted) as caught:
        train(trunk, progress=False)
    assert caught.value.step == 7
    assert not (tmp_path / "trunk" / "branches").exists()
    train(trunk, progress=False)
    # The fork checkpoints outlive retention (keep=2: the preemption's step 7 and 12).
    assert CheckpointManager(trunk.run_dir / CHECKPOINT_DIR).steps() == [3, 5, 7, 12]
    for tokens, reference in scratch.items():
        _assert_same_run(branch_dir(trunk.run_dir, tokens), reference)


def _corrupt(folder: Path) -> None:
    state = folder / "state.pt"
    state.write_bytes(state.read_bytes()[:-8] + b"corrupt!")


def test_a_damaged_fork_checkpoint_forks_from_the_last_sound_one(store, scratch, tmp_path):
    trunk = _trunk(store, tmp_path)
    train(trunk, progress=False)
    checkpoints = CheckpointManager(trunk.run_dir / CHECKPOINT_DIR)
    long_branch = branch_dir(trunk.run_dir, LONG)
    # The long branch must be forked again (its own checkpoints unusable) while the
    # trunk's checkpoint at its fork step (5) is damaged: it forks from step 3.
    for folder in (long_branch / CHECKPOINT_DIR).iterdir():
        _corrupt(folder)
    (long_branch / "summary.json").unlink()
    _corrupt(checkpoints.folder(FORKS[LONG]))
    train(trunk, progress=False)
    assert CheckpointManager(long_branch / CHECKPOINT_DIR).steps() == [3, 9]
    _assert_same_run(long_branch, scratch[LONG])


def test_a_branch_with_no_sound_trunk_checkpoint_fails_in_one_line_and_the_others_train(
    store, scratch, tmp_path
):
    trunk = _trunk(store, tmp_path)
    train(trunk, progress=False)
    short, long = branch_dir(trunk.run_dir, SHORT), branch_dir(trunk.run_dir, LONG)
    shutil.rmtree(short)
    shutil.rmtree(long)
    _corrupt(CheckpointManager(trunk.run_dir / CHECKPOINT_DIR).folder(FORKS[SHORT]))
    with pytest.raises(LlamaTrainError) as caught:
        train(trunk, progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert f"d640: cannot fork: the trunk {trunk.run_dir} has no sound checkpoint" in message
    assert f"llama-train run {short / 'config.yaml'}" in message
    assert "1 of 2 branches" in message
    _assert_same_run(long, scratch[LONG])  # the other branch is untouched by the failure
    # What the line says to do: train the branch from scratch as an ordinary run.
    train(read_run_config(short), progress=False)
    _assert_same_run(short, scratch[SHORT])


def test_branches_need_wsd_and_must_be_shorter_than_the_run(store, tmp_path):
    with pytest.raises(LlamaTrainError, match=r"optim\.schedule=wsd"):
        _config(store, tmp_path / "x", "optim.schedule=cosine", "train.branches=[640]")
    config = _config(store, tmp_path / "y", "train.steps=4", "train.branches=[640]")
    with pytest.raises(LlamaTrainError, match="not shorter than the run"):
        train(config, progress=False)
    assert not (tmp_path / "y" / CHECKPOINT_DIR).exists()
