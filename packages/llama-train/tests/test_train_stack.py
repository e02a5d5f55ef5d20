"""The stack recipe: members write the runs `llama-train run` writes, with the same numbers.

Every member is compared with its own config trained alone by `train.train`: the
deterministic metrics, the evaluations and the summary's losses are equal (bit for
bit on CPU), and the checkpoint has the single run's format (a single run resumes
from it). A stack interrupted by SIGTERM and run again ends where an uninterrupted
stack ends.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from llama_train.core.checkpoint import CheckpointManager
from llama_train.errors import LlamaTrainError
from llama_train.recipe.evaluate_run import evaluate_run
from llama_train.recipe.train import train
from llama_train.recipe.train_config import TrainConfig, resolve_config
from llama_train.recipe.train_stack import StackTrainer, train_stack
from llama_train.rundir import CHECKPOINT_DIR, read_metrics

TINY = ["model.dim=16", "model.n_layers=1", "model.n_heads=2", "data.batch_size=8"]
CADENCE = ["train.steps=12", "train.log_every=3", "eval.every=6", "checkpoint.every=4"]
DETERMINISTIC_KEYS = ("step", "loss", "grad_norm", "lr", "tokens", "epoch", "eval/loss")
SUMMARY_KEYS = ("step", "test_loss", "excess_loss", "tokens", "parameters", "flops")
# lr, seed (init and data order: members 0 and 2 share theirs), clipping, schedule.
MEMBERS = [
    ["optim.lr=3e-3", "run.seed=0"],
    ["optim.lr=1e-2", "run.seed=1", "optim.grad_clip=0.1", "optim.schedule=wsd"],
    ["optim.lr=5e-3", "run.seed=0", "optim.weight_decay=0", "optim.warmup_steps=2"],
]


@pytest.fixture(scope="module")
def store(make_debug_store) -> Path:
    return make_debug_store(n_train=256, n_test=32, seq_len=17)


def _configs(store: Path, root: Path, members: list[list[str]] = MEMBERS) -> list[TrainConfig]:
    return [
        resolve_config(
            None,
            [
                f"data.path={store}",
                f"run.dir={root / f'm{i}'}",
                f"run.name=m{i}",
                *TINY,
                *CADENCE,
                *overrides,
            ],
        )
        for i, overrides in enumerate(members)
    ]


def _deterministic(run_dir: Path) -> list[dict]:
    return [
        {k: r[k] for k in DETERMINISTIC_KEYS if k in r}
        for r in read_metrics(run_dir)
        if any(k in r for k in ("loss", "eval/loss"))
    ]


def test_each_member_writes_the_run_its_config_writes_alone(store, tmp_path):
    stacked = _configs(store, tmp_path / "stack")
    result = train_stack(stacked, progress=False)
    assert result.errors == {}
    for config in stacked:
        alone = config.model_copy(deep=True)
        alone.run.dir = tmp_path / "alone" / config.run.name
        summary = train(alone, progress=False)
        assert _deterministic(config.run_dir) == _deterministic(alone.run_dir)
        mine = json.loads((config.run_dir / "summary.json").read_text())
        assert mine == result.summaries[config.run.name]
        for key in SUMMARY_KEYS:
            if key in summary:
                assert mine[key] == summary[key], key
        for name in ("config.yaml", "eval"):
            assert (config.run_dir / name).exists()
        manager = CheckpointManager(config.run_dir / CHECKPOINT_DIR)
        assert manager.steps() == CheckpointManager(alone.run_dir / CHECKPOINT_DIR).steps()
    # The members really trained differently.
    assert len({result.summaries[c.run.name]["test_loss"] for c in stacked}) == 3


@pytest.mark.slow
def test_a_compiled_stack_trains_its_members_as_compiled_single_runs(store, tmp_path):
    """train.compile compiles the stack (code generation: about a minute on 2 busy cores,
    hence slow). Inductor fuses the stack's batched ops otherwise than a single model's,
    so members equal their compiled single runs to float tolerance (1e-5 relative), not
    bit for bit; both compile into the configured cache."""
    cache = tmp_path / "compile-cache"
    compiled = ["train.compile=true", f"train.compile_cache={cache}"]
    stacked = _configs(store, tmp_path / "stack", [[*m, *compiled] for m in MEMBERS])
    result = train_stack(stacked, progress=False)
    assert result.errors == {}
    assert list(cache.rglob("*.py")), "the stack compiled nothing into train.compile_cache"
    for config in stacked:
        alone = config.model_copy(deep=True)
        alone.run.dir = tmp_path / "alone" / config.run.name
        summary = train(alone, progress=False)
        mine, theirs = _deterministic(config.run_dir), _deterministic(alone.run_dir)
        assert [sorted(r) for r in mine] == [sorted(r) for r in theirs]
        for ours, single in zip(mine, theirs, strict=True):
            for key, value in ours.items():
                assert value == pytest.approx(single[key], rel=1e-5, abs=1e-7), key
        test_loss = result.summaries[config.run.name]["test_loss"]
        assert test_loss == pytest.approx(summary["test_loss"], rel=1e-5)
    assert len({result.summaries[c.run.name]["test_loss"] for c in stacked}) == 3


def test_a_member_resumes_alone_from_a_stack_checkpoint(store, tmp_path):
    """The stack's checkpoints are single-run checkpoints: `eval` reads them and `run`
    continues a member."""
    short = _configs(store, tmp_path / "stack", [MEMBERS[0], MEMBERS[1]])
    for config in short:
        config.train.steps = 8
    train_stack(short, progress=False)
    for config in short:  # `llama-train eval` reads a member's weights as a run's
        summary = json.loads((config.run_dir / "summary.json").read_text())
        assert evaluate_run(config.run_dir).loss == pytest.approx(summary["test_loss"], rel=1e-6)
    longer = short[1].model_copy(deep=True)
    longer.train.steps = 12
    reference = longer.model_copy(deep=True)
    reference.run.dir = tmp_path / "reference"
    reference.train.steps = 8
    train(reference, progress=False)
    reference.train.steps = 12
    assert (
        train(longer, progress=False)["test_loss"] == train(reference, progress=False)["test_loss"]
    )


def test_a_stack_stopped_by_sigterm_resumes_to_the_uninterrupted_result(
    store, tmp_path, monkeypatch, stopped_by_sigterm
):
    uninterrupted = train_stack(_configs(store, tmp_path / "once"), progress=False)
    step = StackTrainer.train_step
    calls = {"n": 0}

    def signalled(self, batches):
        out = step(self, batches)
        calls["n"] += 1
        if calls["n"] == 6:  # between checkpoints (every 4): the signal saves step 6
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(StackTrainer, "train_step", signalled)
    interrupted = _configs(store, tmp_path / "twice")
    stopped = stopped_by_sigterm(lambda: train_stack(interrupted, progress=False))
    assert stopped.step == 6
    assert CheckpointManager(interrupted[0].run_dir / CHECKPOINT_DIR).steps()[-1] == 6
    monkeypatch.setattr(StackTrainer, "train_step", step)
    resumed = train_stack(interrupted, progress=False)
    for config in interrupted:
        name = config.run.name
        assert resumed.summaries[name]["test_loss"] == uninterrupted.summaries[name]["test_loss"]
        once = _deterministic(tmp_path / "once" / name)
        assert _deterministic(config.run_dir) == once


def test_a_diverging_member_stops_and_the_others_finish(store, tmp_path, monkeypatch):
    from llama_train.core import stack as stack_module

    forward = stack_module.StackedLlama.forward

    def poisoned(self, tokens, targets):
        losses = forward(self, tokens, targets)
        return losses * torch.tensor([1.0, float("nan"), 1.0])

    reference = train_stack(_configs(store, tmp_path / "clean"), progress=False)
    monkeypatch.setattr(stack_module.StackedLlama, "forward", poisoned)
    configs = _configs(store, tmp_path / "nan")
    result = train_stack(configs, progress=False)
    assert list(result.errors) == ["m1"] and "loss nan at step 1" in result.errors["m1"]
    assert result.summaries["m1"] is None
    assert not (configs[1].run_dir / "summary.json").exists()
    for name in ("m0", "m2"):
        assert result.summaries[name]["test_loss"] == reference.summaries[name]["test_loss"]


def test_members_that_differ_in_shape_or_data_cannot_share_a_stack(store, tmp_path):
    configs = _configs(store, tmp_path, [["model.dim=32"], []])
    with pytest.raises(LlamaTrainError, match=r"differ in model\.dim"):
        train_stack(configs, progress=False)


def test_a_stack_larger_than_the_memory_allows_splits_itself(store, tmp_path, monkeypatch):
    from llama_train.core import budget
    from llama_train.core.model import ModelConfig
    from llama_train.recipe import train_stack as recipe

    config = ModelConfig(dim=16, n_layers=1, n_heads=2, vocab_size=8, max_seq_len=17)
    per_member = budget.parameter_count(config) * 28 + budget.activation_bytes(
        config, 8, 16, bytes_per_value=4, backward=True
    )
    evaluation = budget.activation_bytes(config, 8, 16, bytes_per_value=4, backward=False)
    room = evaluation + 2 * per_member + per_member // 2  # room for two and a half members
    with monkeypatch.context() as patch:
        patch.setattr(budget, "available_memory", lambda device: budget.Memory(room, "test"))
        capacity = budget.stack_capacity(
            config, batch_size=8, eval_batch_size=8, seq_len=16, device=torch.device("cpu")
        )
    assert capacity == 2
    sizes = []
    build = recipe.build_stack

    def recording(configs):
        sizes.append(len(configs))
        return build(configs)

    monkeypatch.setattr(recipe, "build_stack", recording)
    monkeypatch.setattr(recipe, "stack_capacity", lambda *args, **kwargs: 2)
    result = train_stack(_configs(store, tmp_path / "split"), progress=False)
    assert sizes == [2, 1]
    reference = _configs(store, tmp_path / "whole")
    monkeypatch.undo()
    whole = train_stack(reference, progress=False)
    for config in reference:
        name = config.run.name
        assert result.summaries[name]["test_loss"] == whole.summaries[name]["test_loss"]
