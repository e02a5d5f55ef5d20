"""Cooldown branches: many data sizes from one warmup-stable-decay run.

A run with ``train.branches: [D1, D2, ...]`` (predicted tokens, each shorter than
the run) is the *trunk*. With the wsd schedule the learning rate before a run's
decay depends on the step only, not on the run's length (:func:`decay_start`), so
a run of S steps and a longer run agree on every step before S's decay starts.
Branch b therefore trains S_b = ceil(D_b / tokens per step) steps: it starts from
the trunk's checkpoint at its fork step F_b = decay_start(S_b), where its own decay
begins, and decays over its last decay_fraction. It *is* the run the same config
with ``train.steps = S_b`` trains from scratch, bit for bit on CPU, for the price
of its decay alone (Hägele et al. 2024; OLMo-core's ladder).

Layout: branch b is an ordinary run directory, ``<trunk>/branches/d<D_b>/``
(config.yaml with train.steps = S_b and no branches, metrics, evaluations,
checkpoints, summary.json), so every command that reads a run reads it. Its
metrics and evaluations up to the fork are the trunk's, copied at the fork.

The trunk saves a checkpoint at every fork step and keeps those (retention spares
them). Forking copies the newest sound trunk checkpoint at or before F_b into the
branch (the fork step's own, or an earlier one when it is damaged or missing:
the steps in between are trunk steps at the stable lr, retrained exactly), and
the branch resumes from it as any run resumes. A branch with sound checkpoints of
its own resumes from them; one whose checkpoints are all unusable is forked
again. With no sound trunk checkpoint at or before F_b the branch fails with a
line naming the trunk and the command that trains it from scratch instead.

A trunk trained alone trains its branches one by one (`train.train_branches`); the
trunks of a stack train theirs as stacks (`train_stack`): the branches of one length
of trunks that differ only in what a stack member may vary share everything else, and
each resumes from its own fork checkpoint as a stack member resumes.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_train.core.checkpoint import CheckpointManager
from llama_train.core.optim import OptimConfig, decay_start, resolve_warmup
from llama_train.errors import LlamaTrainError
from llama_train.recipe.train_config import TrainConfig, write_config
from llama_train.rundir import (
    CHECKPOINT_DIR,
    CONFIG_FILENAME,
    EVAL_DIR,
    METRICS_FILENAME,
    RunSummary,
)

BRANCH_DIR = "branches"


@dataclass(frozen=True)
class Branch:
    """One cooldown branch of a trunk."""

    tokens: int  # as requested (train.branches)
    steps: int  # its train.steps: ceil(tokens / tokens per step)
    fork_step: int  # where its decay starts: the trunk's checkpoint it resumes from
    config: TrainConfig

    @property
    def name(self) -> str:
        return f"d{self.tokens}"

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir


def branch_dir(trunk_dir: Path, tokens: int) -> Path:
    """Where the branch of `tokens` predicted tokens of a trunk lives."""
    return Path(trunk_dir) / BRANCH_DIR / f"d{tokens}"


def branch_config(trunk: TrainConfig, tokens: int, steps: int) -> TrainConfig:
    """The trunk's config as the branch's run: train.steps = `steps`, no branches, its dir."""
    train = trunk.train.model_copy(update={"steps": steps, "branches": []})
    run = trunk.run.model_copy(
        update={"dir": branch_dir(trunk.run_dir, tokens), "name": f"{trunk.run.name}/d{tokens}"}
    )
    return trunk.model_copy(update={"train": train, "run": run})


def plan_branches(trunk: TrainConfig, *, tokens_per_step: int, optim: OptimConfig) -> list[Branch]:
    """The branches of a trunk, shortest first; `optim` has its warmup resolved.

    A branch must be shorter than the trunk (the trunk is the longest point), and
    two branches must not round to the same number of steps.
    """
    branches: list[Branch] = []
    trunk_tokens = trunk.train.steps * tokens_per_step
    for tokens in trunk.train.branches:
        steps = math.ceil(tokens / tokens_per_step)
        if steps >= trunk.train.steps:
            raise LlamaTrainError(
                f"train.branches: a branch of {tokens:,} tokens ({steps} steps of "
                f"{tokens_per_step:,} tokens) is not shorter than the run ({trunk.train.steps} "
                f"steps, {trunk_tokens:,} tokens), which is the longest point itself; "
                "list shorter branches or raise train.steps"
            )
        if branches and branches[-1].steps == steps:
            raise LlamaTrainError(
                f"train.branches: {branches[-1].tokens:,} and {tokens:,} tokens are both "
                f"{steps} steps of {tokens_per_step:,} tokens; list distinct data sizes"
            )
        fork = min(decay_start(steps, optim), steps)
        branches.append(Branch(tokens, steps, fork, branch_config(trunk, tokens, steps)))
    return branches


def trunk_branches(trunk: TrainConfig, summary: dict[str, Any]) -> list[Branch]:
    """The branches of a finished trunk, shortest first, planned from its summary.

    The summary holds what the plan needs beyond the config: the tokens per step and
    the parameter count that the warmup rule (and so every fork step) depends on.
    """
    done = RunSummary.model_validate(summary)
    if done.tokens is None or done.parameters_total is None:
        raise LlamaTrainError(f"{trunk.run_dir}: its summary lacks the tokens or parameters")
    tokens_per_step = done.tokens // done.step
    optim = resolve_warmup(
        trunk.optim, parameters=done.parameters_total, tokens_per_step=tokens_per_step
    )
    return plan_branches(trunk, tokens_per_step=tokens_per_step, optim=optim)


def branch_failures(trunk: TrainConfig, failures: Sequence[str]) -> LlamaTrainError:
    """The one-line error of a trunk whose branches `failures` ("d<D>: why") failed."""
    return LlamaTrainError(
        f"{len(failures)} of {len(trunk.train.branches)} branches of {trunk.run_dir} "
        f"failed (the others are done): {'; '.join(failures)}"
    )


def fork(branch: Branch, trunk_checkpoints: CheckpointManager, say: Callable[[str], None]) -> None:
    """Make sure the branch has a sound checkpoint to resume from, copying the trunk's.

    Rank 0 only (file work). A branch that already has a sound checkpoint keeps it;
    otherwise its unusable folders are removed and the newest sound trunk checkpoint
    at or before the fork step is copied in, with the trunk's metrics and
    evaluations. LlamaTrainError when the trunk has none.
    """
    own = CheckpointManager(branch.run_dir / CHECKPOINT_DIR, keep=None)
    damaged = []
    for step in reversed(own.steps()):
        if _sound(own, step) is None:
            return
        damaged.append(step)
    source, problems = None, []
    for step in reversed([s for s in trunk_checkpoints.steps() if s <= branch.fork_step]):
        problem = _sound(trunk_checkpoints, step)
        if problem is None:
            source = step
            break
        problems.append(f"step {step}: {problem}")
    if branch.fork_step not in trunk_checkpoints.steps():
        problems.insert(0, f"step {branch.fork_step}: missing")
    trunk_dir = trunk_checkpoints.directory.parent
    write_config(branch.config)  # the branch's own config: a run of its own from here
    if source is None:
        raise LlamaTrainError(
            f"cannot fork: the trunk {trunk_dir} has no sound checkpoint at or before step "
            f"{branch.fork_step} ({', '.join(problems)}); "
            f"train the branch from scratch with `llama-train run "
            f"{branch.run_dir / CONFIG_FILENAME}`, or move {trunk_dir} away to retrain the trunk"
        )
    for step in damaged:
        shutil.rmtree(own.folder(step))
    if problems:
        say(
            f"branch {branch.name}: the trunk's checkpoint {', '.join(problems)}; forking "
            f"from step {source} (its last sound checkpoint before step {branch.fork_step})"
        )
    # Records first: the published checkpoint is what makes a fork done, so a fork
    # killed before it is redone whole, never left with a checkpoint and no records.
    _copy_records(trunk_dir, branch.run_dir)
    _copy_checkpoint(trunk_checkpoints.folder(source), own.folder(source))
    say(f"branch {branch.name}: forked from {trunk_checkpoints.folder(source)}")


def _sound(checkpoints: CheckpointManager, step: int) -> str | None:
    """None when the checkpoint of `step` passes its checksums, else why not."""
    try:
        checkpoints.verified_meta(step)
    except LlamaTrainError as error:
        return str(error).partition(" is unusable: ")[2] or str(error)
    return None


def _copy_checkpoint(source: Path, target: Path) -> None:
    """Copy a checkpoint folder under a hidden name, then publish it by renaming."""
    temporary = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, temporary)
    temporary.rename(target)


def _copy_records(trunk_dir: Path, run_dir: Path) -> None:
    """The trunk's metrics and evaluations: the resuming branch keeps those up to its step."""
    metrics = trunk_dir / METRICS_FILENAME
    if metrics.is_file():
        shutil.copyfile(metrics, run_dir / METRICS_FILENAME)
    if (trunk_dir / EVAL_DIR).is_dir():
        shutil.copytree(trunk_dir / EVAL_DIR, run_dir / EVAL_DIR, dirs_exist_ok=True)
