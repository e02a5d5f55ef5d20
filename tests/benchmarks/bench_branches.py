"""Cooldown branches of stacked trunks: trained as stacks against one by one (`make bench`).

A stack shaped like one (regime, model) of the small study: K = 4 trunks that differ in
lr, each with 5 cooldown branches at 1/2, 1/4, ..., 1/32 of its data (one epoch), on
base-small.yaml's settings (wsd, 1-sqrt decay over the last 20%, warmup over N tokens,
batch 16 x 256, 256 evaluation sequences at the end of every run, one thread). The
trunks are trained once (not timed); then, on fresh copies of them, their 20 branches
train

1. one by one, as a stack's trunks trained their branches before (`train_branches` per
   trunk: each branch its own run, in this process), and
2. as stacks (`train_stack` on the finished trunks: the branches of one length form a
   stack of K).

Both in this process, alternating over three rounds (best of each), so background load
hits both alike; the branches of the two sides are then checked equal (test_loss, bit
for bit). BENCH_BRANCHES_QUICK=1 runs one round.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from llama_train.recipe.branches import BRANCH_DIR, trunk_branches
from llama_train.recipe.train import Trainer, train_branches
from llama_train.recipe.train_config import TrainConfig, resolve_config
from llama_train.recipe.train_stack import StackTrainer, train_stack

QUICK = os.environ.get("BENCH_BRANCHES_QUICK") == "1"
ROUNDS = 1 if QUICK else 3
TRUNKS = 4  # lrs
ROWS, SEQ, BATCH = 2048, 257, 16  # the trunk's data: one epoch of 128 steps
BRANCH_ROWS = (64, 128, 256, 512, 1024)
WIDTH, LAYERS, HEADS = 32, 1, 2


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, write_preset_store) -> Path:
    out = tmp_path_factory.mktemp("bench-branches") / "hmm.zarr"
    write_preset_store(out, "hmm", n_train=ROWS, n_test=256, seq_len=SEQ)
    return out


def _trunks(store: Path, root: Path) -> list[TrainConfig]:
    tokens = [rows * (SEQ - 1) for rows in BRANCH_ROWS]
    shared = [
        f"data.path={store}",
        f"data.batch_size={BATCH}",
        f"model.dim={WIDTH}",
        f"model.n_layers={LAYERS}",
        f"model.n_heads={HEADS}",
        "optim.warmup_tokens_per_parameter=1",
        "optim.schedule=wsd",
        "optim.decay_shape=1-sqrt",
        "optim.decay_fraction=0.2",
        "optim.min_lr_ratio=0",
        f"train.steps={ROWS // BATCH}",
        f"train.branches=[{','.join(map(str, tokens))}]",
        "train.threads=1",
        "train.log_every=50",
        "train.progress=false",
        "eval.every=1000000",
        "eval.max_sequences=256",
        "checkpoint.every=1000000",
        "checkpoint.keep=1",
    ]
    return [
        resolve_config(
            None,
            [*shared, f"run.dir={root / f'lr{i}'}", f"run.name=lr{i}", f"optim.lr={5e-3 * 2**i}"],
        )
        for i in range(TRUNKS)
    ]


def _moved(trunks: list[TrainConfig], root: Path) -> list[TrainConfig]:
    """Copies of the trained trunks (without branches) under `root`."""
    copies = []
    for trunk in trunks:
        target = root / trunk.run_dir.name
        shutil.copytree(trunk.run_dir, target, ignore=shutil.ignore_patterns(BRANCH_DIR, ".lock"))
        copies.append(
            trunk.model_copy(update={"run": trunk.run.model_copy(update={"dir": target})})
        )
    return copies


def _one_by_one(trunks: list[TrainConfig]) -> None:
    for trunk in trunks:
        summary = json.loads((trunk.run_dir / "summary.json").read_text())
        train_branches(trunk, summary, progress=False)


def _stacked(trunks: list[TrainConfig]) -> None:
    result = train_stack(trunks, progress=False)
    assert result.errors == {}, result.errors


def _timed(train: Callable[[list[TrainConfig]], None], trunks: list[TrainConfig]) -> float:
    started = time.perf_counter()
    with _quiet():
        train(trunks)
    return time.perf_counter() - started


def _quiet() -> contextlib.ExitStack:
    """The runs' messages (stderr) and anything on stdout kept off the table."""
    quiet = contextlib.ExitStack()
    quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
    quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return quiet


def _step_seconds(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """A one-item list that sums the seconds spent in training steps (a single run's or a
    stack's): what stacking can speed up; the rest (building, resuming, evaluating,
    checkpointing) is each branch's own either way."""
    seconds = [0.0]
    for owner in (Trainer, StackTrainer):

        def timed(self, batches, step=owner.train_step):
            started = time.perf_counter()
            try:
                return step(self, batches)
            finally:
                seconds[0] += time.perf_counter() - started

        monkeypatch.setattr(owner, "train_step", timed)
    return seconds


def _branch_losses(trunks: list[TrainConfig]) -> list[float]:
    return [
        json.loads((path / "summary.json").read_text())["test_loss"]
        for trunk in trunks
        for path in sorted((trunk.run_dir / BRANCH_DIR).iterdir())
    ]


def test_stacked_cooldown_branches(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trunks = _trunks(store, tmp_path / "trunks")
    with _quiet():
        _stacked(trunks)  # the trunks (and once their branches: a warm-up for both sides)
    decay_steps = 0  # what the branches train: each its steps after its fork
    for trunk in trunks:
        summary = json.loads((trunk.run_dir / "summary.json").read_text())
        decay_steps += sum(b.steps - b.fork_step for b in trunk_branches(trunk, summary))
    contenders = {"one by one": _one_by_one, "as stacks": _stacked}
    best = dict.fromkeys(contenders, (float("inf"), 0.0))  # (seconds, of which steps)
    losses = {}
    in_steps = _step_seconds(monkeypatch)
    for round_ in range(ROUNDS):
        order = list(contenders) if round_ % 2 == 0 else list(reversed(contenders))
        for name in order:
            copies = _moved(trunks, tmp_path / f"round{round_}" / name.replace(" ", "-"))
            in_steps[0] = 0.0
            best[name] = min(best[name], (_timed(contenders[name], copies), in_steps[0]))
            losses[name] = _branch_losses(copies)
    (alone, alone_steps), (stacked, stacked_steps) = best.values()
    one_by_one, as_stacks = losses.values()
    assert as_stacks == one_by_one and len(set(as_stacks)) == len(as_stacks)
    print(
        f"\nstacked cooldown branches: {TRUNKS} trunks (lr) x {len(BRANCH_ROWS)} branches "
        f"({'/'.join(str(r // BATCH) for r in BRANCH_ROWS)} steps of a {ROWS // BATCH}-step "
        f"trunk, decay 20%), width {WIDTH}, {LAYERS} layer, batch {BATCH} x {SEQ - 1}, "
        f"eval 256 sequences, 1 thread, best of {ROUNDS}; {decay_steps} branch steps in all"
    )
    print(f"  {'':34} {'whole s':>8} {'in steps s':>11}")
    rows = (
        (f"{TRUNKS * len(BRANCH_ROWS)} branches one by one", alone, alone_steps),
        (f"as {len(BRANCH_ROWS)} stacks of {TRUNKS}", stacked, stacked_steps),
        ("ratio (one by one / stacks)", alone / stacked, alone_steps / stacked_steps),
    )
    for label, whole, steps in rows:
        print(f"  {label:34} {whole:8.2f} {steps:11.2f}")
