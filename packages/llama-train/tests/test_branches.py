"""Cooldown branches: each equals the run trained from scratch with its length, bit for bit.

The branches of trunks trained as a stack train as stacks too, each equal bit for bit to
the branch its trunk trains alone (`train_branches`, one by one).
"""

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
from llama_train.recipe.train_stack import StackTrainer, train_stack
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


# ---------------------------------------------------------------------------
# The branches of stacked trunks train as stacks

# Trunks that may share a stack: lr and seed differ (t0 is the scratch runs' config).
STACKED = [
    ["optim.lr=3e-3", "run.seed=3"],
    ["optim.lr=1e-2", "run.seed=3"],
    ["optim.lr=3e-3", "run.seed=4"],
]


def _trunks(store: Path, root: Path, count: int = len(STACKED)) -> list[TrainConfig]:
    return [
        _config(
            store,
            root / f"t{i}",
            "train.steps=12",
            f"train.branches=[{SHORT},{LONG}]",
            f"run.name=t{i}",
            *overrides,
        )
        for i, overrides in enumerate(STACKED[:count])
    ]


@pytest.fixture(scope="module")
def alone(store, tmp_path_factory) -> list[Path]:
    """The reference: each trunk trained alone, its branches one by one (`train_branches`)."""
    trunks = _trunks(store, tmp_path_factory.mktemp("alone"))
    for trunk in trunks:
        train(trunk, progress=False)
    return [trunk.run_dir for trunk in trunks]


def _recording_stacks(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The members (run names) of every stack built from here on, in order."""
    from llama_train.recipe import train_stack as recipe

    built: list[list[str]] = []
    build = recipe.build_stack

    def recording(configs):
        built.append([config.run.name for config in configs])
        return build(configs)

    monkeypatch.setattr(recipe, "build_stack", recording)
    return built


def test_the_branches_of_stacked_trunks_train_as_stacks_equal_to_each_trained_alone(
    store, scratch, alone, tmp_path, monkeypatch
):
    from llama_train.recipe import train_stack as recipe

    built = _recording_stacks(monkeypatch)
    monkeypatch.setattr(recipe, "stack_capacity", lambda *args, **kwargs: 2)
    trunks = _trunks(store, tmp_path)
    result = train_stack(trunks, progress=False)
    assert result.errors == {}
    # The trunks, then each branch length, stacked and split by the same capacity.
    assert built == [
        ["t0", "t1"],
        ["t2"],
        ["t0/d640", "t1/d640"],
        ["t2/d640"],
        ["t0/d1025", "t1/d1025"],
        ["t2/d1025"],
    ]
    for trunk, reference in zip(trunks, alone, strict=True):
        for tokens in STEPS:
            branch = branch_dir(trunk.run_dir, tokens)
            _assert_same_run(branch, branch_dir(reference, tokens))
            summary = json.loads((branch / "summary.json").read_text())
            assert result.summaries[f"{trunk.run.name}/d{tokens}"] == summary
            assert read_run_config(branch).train.steps == STEPS[tokens]
    for tokens, reference in scratch.items():  # and t0's are the runs trained from scratch
        _assert_same_run(branch_dir(trunks[0].run_dir, tokens), reference)
    # The trunks really differ, and so do their branches.
    assert len({result.summaries[f"t{i}/d{SHORT}"]["test_loss"] for i in range(3)}) == 3
    # Running it again trains nothing.
    built.clear()
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("summary.json")}
    assert train_stack(trunks, progress=False).errors == {}
    assert built == []
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("summary.json")} == stamps


def test_a_diverging_branch_in_a_stack_stops_only_itself(store, alone, tmp_path, monkeypatch):
    step = StackTrainer.train_step

    def poisoned(self, batches):
        losses, norms = step(self, batches)
        if self.lead.config.run.name == f"t0/d{LONG}":  # member 1: t1's long branch
            losses = losses.clone()
            losses[1] = float("nan")
        return losses, norms

    monkeypatch.setattr(StackTrainer, "train_step", poisoned)
    trunks = _trunks(store, tmp_path, 2)
    result = train_stack(trunks, progress=False)
    assert list(result.errors) == ["t1"]
    message = result.errors["t1"]
    assert "\n" not in message
    assert message.startswith(
        f"1 of 2 branches of {trunks[1].run_dir} failed (the others are done): "
        f"d{LONG}: loss nan at step {FORKS[LONG] + 1}"
    ), message
    assert result.summaries[f"t1/d{LONG}"] is None
    assert not (branch_dir(trunks[1].run_dir, LONG) / "summary.json").exists()
    for i, trunk in enumerate(trunks):
        for tokens in STEPS:
            if (i, tokens) != (1, LONG):
                _assert_same_run(branch_dir(trunk.run_dir, tokens), branch_dir(alone[i], tokens))


def test_a_branch_stack_stopped_by_sigterm_resumes_to_the_branches_trained_alone(
    store, alone, tmp_path, monkeypatch, stopped_by_sigterm
):
    step = StackTrainer.train_step

    def signalled(self, batches):
        out = step(self, batches)
        if self.lead.config.run.name == f"t0/d{LONG}" and self.step == FORKS[LONG] + 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(StackTrainer, "train_step", signalled)
    trunks = _trunks(store, tmp_path, 2)
    stopped = stopped_by_sigterm(lambda: train_stack(trunks, progress=False))
    stopped_at = FORKS[LONG] + 3
    assert stopped.step == stopped_at
    for trunk in trunks:
        assert (branch_dir(trunk.run_dir, SHORT) / "summary.json").is_file()
        long = branch_dir(trunk.run_dir, LONG)
        assert CheckpointManager(long / CHECKPOINT_DIR).steps()[-1] == stopped_at
        assert not (long / "summary.json").exists()
    monkeypatch.setattr(StackTrainer, "train_step", step)
    assert train_stack(trunks, progress=False).errors == {}
    for i, trunk in enumerate(trunks):
        for tokens in STEPS:
            _assert_same_run(branch_dir(trunk.run_dir, tokens), branch_dir(alone[i], tokens))


def test_stacked_branches_fork_as_branches_trained_alone_fork(store, alone, tmp_path, monkeypatch):
    """A branch that cannot fork fails alone; one forked from an earlier sound checkpoint
    (its trunk's fork checkpoint damaged) starts there, in a stack of its own."""
    trunks = _trunks(store, tmp_path, 2)
    train_stack(trunks, progress=False)
    for trunk in trunks:
        shutil.rmtree(trunk.run_dir / "branches")
    checkpoints = [CheckpointManager(trunk.run_dir / CHECKPOINT_DIR) for trunk in trunks]
    _corrupt(checkpoints[0].folder(FORKS[SHORT]))  # t0's short branch: nothing to fork from
    _corrupt(checkpoints[1].folder(FORKS[LONG]))  # t1's long branch: forks from step 3
    built = _recording_stacks(monkeypatch)
    result = train_stack(trunks, progress=False)
    assert list(result.errors) == ["t0"]
    assert result.errors["t0"].startswith(
        f"1 of 2 branches of {trunks[0].run_dir} failed (the others are done): "
        f"d{SHORT}: cannot fork: the trunk {trunks[0].run_dir} has no sound checkpoint"
    )
    assert result.summaries[f"t0/d{SHORT}"] is None
    # Stacks by starting step: t1's long branch from step 3, t0's from its fork step 5.
    assert built == [[f"t1/d{LONG}"], [f"t0/d{LONG}"], [f"t1/d{SHORT}"]]
    assert CheckpointManager(branch_dir(trunks[1].run_dir, LONG) / CHECKPOINT_DIR).steps() == [
        FORKS[SHORT],
        STEPS[LONG],
    ]
    for i, tokens in ((0, LONG), (1, LONG), (1, SHORT)):
        _assert_same_run(branch_dir(trunks[i].run_dir, tokens), branch_dir(alone[i], tokens))
