"""The stack recipe: several configs of one model shape trained in one process.

Each member is an ordinary run: :func:`~llama_train.recipe.train.build_trainer` builds it
(its run directory, config.yaml, seeded model, loader, eval set, and its own latest
checkpoint when resuming), and it writes what a single run writes (metrics.jsonl,
eval/, checkpoints in the usual format, summary.json), so every command that reads
a run reads a member. Only the training step is shared: the members' weights and
AdamW moments live in one :class:`~llama_train.core.stack.StackedLlama` and
:class:`~llama_train.core.stack.StackedAdamW`, and each member's slice is copied back
into its single model before that member evaluates or checkpoints. Member m then
equals its config trained alone by `llama-train run`, bit for bit on CPU
(`core/stack.py` says why).

Members may differ in what a member may vary (:data:`MEMBER_KEYS`: the `optim`
section, the seed, the name and directory, logging); everything else (data, model,
steps, batch, eval and checkpoint cadence) must be equal. Members with the same
seed read the same batches, and each batch is read once; members with their own
seeds read their own.

A member whose loss or gradient norm is not finite stops, as a single run does
(its last good checkpoint is kept, no summary), and the others go on unchanged.
Preemption (SIGTERM, SIGUSR1) checkpoints every member and raises
:class:`~llama_train.recipe.train.Preempted`; running the same stack again resumes all.
Members resuming from different steps (one finished, one preempted earlier) are
trained as separate stacks, one per starting step.

Trunks (`train.branches`) fork their cooldown branches once trained, and the branches
train as stacks too: the branches of one length share everything their trunks share,
and each member resumes from its own trunk's fork checkpoint, so member m equals the
branch its trunk trains alone (`recipe.train.train_branches`), bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llama_train.core import distributed
from llama_train.core.budget import stack_capacity
from llama_train.core.checkpoint import CheckpointManager
from llama_train.core.compile_cache import compile_cache
from llama_train.core.config_files import flatten_keys
from llama_train.core.distributed import PreemptionWatch, rank_info, resolve_amp, resolve_device
from llama_train.core.optim import lr_at
from llama_train.core.runlock import run_dir_lock
from llama_train.core.stack import (
    StackedAdamW,
    StackedLlama,
    check_stackable,
    chunk_members,
    clip_member_gradients,
)
from llama_train.errors import LlamaTrainError
from llama_train.recipe.branches import Branch, branch_failures, fork, trunk_branches
from llama_train.recipe.train import (
    LossWindow,
    NonFiniteLoss,
    Preempted,
    Trainer,
    build_trainer,
    console,
    due_work,
    finished_summary,
    progress_bar,
)
from llama_train.recipe.train_config import TrainConfig
from llama_train.rundir import CHECKPOINT_DIR

# Config keys (dotted prefixes) in which the members of one stack may differ.
MEMBER_KEYS = ("optim.", "run.", "logging.")


def stack_key(config: TrainConfig) -> tuple[tuple[str, Any], ...]:
    """What members of one stack share: every setting outside MEMBER_KEYS."""
    flat = flatten_keys(config.model_dump(mode="json"))
    return tuple(sorted((k, repr(v)) for k, v in flat.items() if not k.startswith(MEMBER_KEYS)))


def check_stack_configs(configs: Sequence[TrainConfig]) -> None:
    """Refuse, in one line, configs that cannot train as one stack."""
    if not configs:
        raise LlamaTrainError("a stack needs at least one config")
    first = dict(stack_key(configs[0]))
    for config in configs[1:]:
        other = dict(stack_key(config))
        differing = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
        if differing:
            raise LlamaTrainError(
                f"{configs[0].run.name} and {config.run.name} cannot share a stack: they "
                f"differ in {', '.join(differing)} (members may differ only in "
                f"{', '.join(k.rstrip('.') for k in MEMBER_KEYS)})"
            )
    for what, values in (
        ("run directory", [str(c.run_dir) for c in configs]),
        ("run name", [c.run.name for c in configs]),
    ):
        if len(set(values)) != len(values):
            raise LlamaTrainError(f"two members of a stack share a {what}")
    config = configs[0]
    check_stackable(config.model)
    if config.train.amp == "fp16":
        raise LlamaTrainError(
            "train.amp=fp16 needs a gradient scaler per member; stacks train in fp32 or bf16"
        )
    if any(c.logging.wandb.effective_mode != "disabled" for c in configs):
        raise LlamaTrainError(
            "logging.wandb: one process holds one wandb run, so stack members log to "
            "metrics.jsonl only; set logging.wandb.mode=disabled and mirror the members with "
            "`llama-train wandb-sync` afterwards, or train them one by one (--no-stack)"
        )
    if config.distributed.strategy == "fsdp" or rank_info().distributed:
        raise LlamaTrainError("a stack trains in one process; launch it without torchrun/srun")


@dataclass
class _Member:
    """One member's run: its Trainer (single model, torch AdamW, loader, files) and logs."""

    trainer: Trainer
    window: LossWindow
    logger: Any = None
    error: str | None = None


@dataclass
class StackTrainer:
    """A stack of member runs that start from the same step; driven by :meth:`run`."""

    members: list[_Member]
    stack: StackedLlama
    optimizer: StackedAdamW
    sources: list[int]  # the member whose loader member m's batches come from
    device: torch.device
    amp_dtype: torch.dtype | None
    saved_step: int | None = None
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def lead(self) -> Trainer:
        return self.members[0].trainer

    @property
    def step(self) -> int:
        return self.lead.state.step

    def active(self) -> list[tuple[int, _Member]]:
        return [(m, member) for m, member in enumerate(self.members) if member.error is None]

    # -- one optimizer step ----------------------------------------------------

    def _batches(self) -> Iterator[torch.Tensor]:
        """(B, L) batches when all members read one stream, else (M, B, L).

        Members with the same seed read the same rows: each distinct stream is read
        once per micro-step, from the loader of its first member.
        """
        readers = sorted(set(self.sources))
        streams = {r: iter(self.members[r].trainer.loader) for r in readers}
        while True:
            batches = {r: next(stream) for r, stream in streams.items()}
            if len(readers) == 1:
                yield batches[readers[0]]
            else:
                yield torch.stack([batches[r] for r in self.sources])

    def train_step(self, batches: Iterator[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulate, clip per member, step; returns (M,) losses and pre-clip norms."""
        config = self.lead.config
        lrs = [
            lr_at(self.step, config.train.steps, member.trainer.optim)  # warmup rule resolved
            for member in self.members
        ]
        accum = config.train.grad_accum
        total = torch.zeros(len(self.members), device=self.device)
        for _ in range(accum):
            batch = next(batches).to(self.device, non_blocking=True)
            with distributed.autocast(self.device, self.amp_dtype):
                losses = self.stack.backward_losses(batch[..., :-1], batch[..., 1:], 1 / accum)
            total += losses / accum
        clips = [member.trainer.config.optim.grad_clip for member in self.members]
        norms = clip_member_gradients(self.stack, clips)
        self.optimizer.step(lrs)
        self.optimizer.zero_grad()
        return total, norms

    # -- members' files --------------------------------------------------------

    def _sync_member(self, m: int) -> Trainer:
        """Copy member m's weights and AdamW moments into its single run."""
        trainer = self.members[m].trainer
        self.stack.copy_member_to(m, trainer.model)
        state = self.optimizer.state_dict(m)
        for name, param in trainer.model.named_parameters():
            if name in state:
                entry = state[name]
                trainer.optimizer.state[param] = {
                    "step": torch.tensor(entry["step"], dtype=torch.float32),
                    "exp_avg": entry["exp_avg"],
                    "exp_avg_sq": entry["exp_avg_sq"],
                }
        return trainer

    def save_checkpoints(self) -> None:
        for m, _ in self.active():
            self._sync_member(m).save_checkpoint()
        self.saved_step = self.step

    def _stop(self, m: int, error: NonFiniteLoss) -> None:
        member = self.members[m]
        member.error = f"{error}. {member.trainer.last_good()}"
        self.errors[member.trainer.config.run.name] = member.error
        self.optimizer.stop(m)
        console.print(
            f"{member.trainer.run_dir}: {member.error}; the other members go on",
            highlight=False,
            soft_wrap=True,
        )

    # -- the loop --------------------------------------------------------------

    def run(self, *, progress: bool | None, preemption: PreemptionWatch) -> list[dict | None]:
        """Train every member to train.steps; each member's summary, None where it failed."""
        lead = self.lead
        show = lead.config.train.progress if progress is None else progress
        with contextlib.ExitStack() as files:
            for member in self.members:
                member.logger = files.enter_context(member.trainer.open_logger())
            bar = files.enter_context(progress_bar(show, lead.config.train.progress_every))
            task = bar.add_task(
                "train",
                total=lead.config.train.steps,
                completed=self.step,
                loss="-",
                excess="-",
                speed="-",
            )
            self._loop(bar, task, preemption)
            summaries: list[dict | None] = []
            for m, member in enumerate(self.members):
                if member.error is not None:
                    summaries.append(None)
                    continue
                trainer = self._sync_member(m)
                trainer.finish(member.logger)
                summaries.append(trainer.write_summary())
        return summaries

    def _loop(self, bar: Any, task: Any, preemption: PreemptionWatch) -> None:
        config = self.lead.config
        steps = config.train.steps
        batches = self._batches()
        session_start = time.perf_counter()
        wall_before = self.lead.state.wall_seconds

        def elapsed() -> float:
            return wall_before + time.perf_counter() - session_start

        while self.step < steps:
            if preemption.poll():
                self._sync_windows(elapsed())
                self._preempt()
            started = time.perf_counter()
            losses, norms = self.train_step(batches)
            seconds = time.perf_counter() - started
            tokens = self.lead.tokens_per_step
            for m, member in enumerate(self.members):
                # A member reading another's stream stands where that stream stands.
                reader = self.members[self.sources[m]].trainer.loader
                member.trainer.loader.next_row = reader.next_row
                state = member.trainer.state
                state.step += 1
                state.tokens += tokens
                state.train_seconds += seconds
                if member.error is None:
                    member.window.add(losses[m], norms[m], tokens, seconds)
            bar.update(task, completed=self.step)
            due_log, due_eval, due_checkpoint = due_work(self.step, config, self.lead.fork_steps)
            if not (due_log or due_eval or due_checkpoint):
                continue
            self._sync_windows(elapsed())
            if due_log:
                for _, member in self.active():
                    figures = member.window.flush()
                    member.logger.log(member.trainer.metrics_line(figures, elapsed()))
            if due_eval:
                for m, member in self.active():
                    self._sync_member(m).evaluate_and_log(member.logger)
            if due_checkpoint:
                for _, member in self.active():
                    member.trainer.state.wall_seconds = elapsed()
                self.save_checkpoints()
            if not self.active():
                break
        preemption.settle()

    def _sync_windows(self, wall: float) -> None:
        for m, member in self.active():
            member.trainer.state.wall_seconds = wall
            try:
                member.window.sync()
            except NonFiniteLoss as error:
                self._stop(m, error)

    def _preempt(self) -> None:
        step = self.step
        if self.saved_step != step and step > 0:
            self.save_checkpoints()
        folder = self.lead.checkpoints.folder(step) if self.saved_step == step else None
        raise Preempted(step, folder)


def build_stack(configs: Sequence[TrainConfig]) -> StackTrainer:
    """Build every member's run (resuming each from its checkpoint) and stack them.

    The members must all stand at the same step; :func:`train_stack` groups them.
    """
    check_stack_configs(configs)
    trainers = [build_trainer(config) for config in configs]
    steps = {trainer.state.step for trainer in trainers}
    if len(steps) > 1:
        where = ", ".join(f"{t.config.run.name}: {t.state.step}" for t in trainers)
        raise LlamaTrainError(f"the members of a stack must resume from one step ({where})")
    lead = trainers[0]
    stack = StackedLlama.from_models([t.model for t in trainers]).to(lead.device)
    stack.chunk = chunk_members(
        lead.config.model, lead.config.data.batch_size * (lead.spec.seq_len - 1), lead.device
    )
    if lead.config.train.compile:
        stack.compile_losses()
    optimizer = StackedAdamW(stack, [t.config.optim for t in trainers])
    for m, trainer in enumerate(trainers):
        entries = {}
        for name, param in trainer.model.named_parameters():
            state = trainer.optimizer.state.get(param)
            if state:
                entries[name] = {k: state[k] for k in ("step", "exp_avg", "exp_avg_sq")}
        optimizer.load_member_state(m, entries)
    for trainer in trainers:  # the stack holds the weights now; the singles are copies
        trainer.optimizer.state.clear()
    first_of_seed: dict[int, int] = {}
    for m, trainer in enumerate(trainers):
        first_of_seed.setdefault(trainer.config.run.seed, m)
    members = [_Member(t, LossWindow(t.state, check_grad_norm=True)) for t in trainers]
    return StackTrainer(
        members=members,
        stack=stack,
        optimizer=optimizer,
        sources=[first_of_seed[t.config.run.seed] for t in trainers],
        device=lead.device,
        amp_dtype=lead.amp_dtype,
        saved_step=lead.saved_step,
    )


def _start_step(config: TrainConfig) -> int:
    steps = CheckpointManager(config.run_dir / CHECKPOINT_DIR, keep=config.checkpoint.keep).steps()
    return steps[-1] if steps else 0


@dataclass
class StackResult:
    """What :func:`train_stack` did: each member's summary (None where it failed) and why."""

    summaries: dict[str, dict[str, Any] | None]
    errors: dict[str, str]


def train_stack(configs: Sequence[TrainConfig], *, progress: bool | None = None) -> StackResult:
    """Train (or resume) configs of one shape as stacks; members already done are skipped.

    Members are grouped by the step they resume from, and a group larger than the
    memory allows (`budget.stack_capacity`) is split; each group trains as one stack.
    A member that diverges is reported in `errors`; the others finish. Trunks
    (`train.branches`) then fork their cooldown branches, which train as stacks too
    (:func:`_train_branches`); a trunk whose branches failed is named in `errors`
    with them, and each branch's summary is in `summaries` under its run name.
    """
    check_stack_configs(configs)
    result = StackResult({}, {})
    capacity = _capacity(configs[0])
    lead = configs[0].train
    with (
        PreemptionWatch() as preemption,
        compile_cache(lead.compile_cache if lead.compile else None),
    ):
        _train_groups(configs, result, capacity=capacity, progress=progress, preemption=preemption)
        _train_branches(
            configs, result, capacity=capacity, progress=progress, preemption=preemption
        )
    return result


def _capacity(config: TrainConfig) -> int:
    """How many members of this shape one stack may hold (`budget.stack_capacity`)."""
    device = resolve_device(config.train, rank_info())
    return stack_capacity(
        config.model,
        batch_size=config.data.batch_size,
        eval_batch_size=config.eval.batch_size or config.data.batch_size,
        seq_len=config.model.max_seq_len or 1,
        device=device,
        half_precision=resolve_amp(config.train.amp, device) is not None,
    )


def _train_groups(
    configs: Sequence[TrainConfig],
    result: StackResult,
    *,
    capacity: int,
    progress: bool | None,
    preemption: PreemptionWatch,
    contain: bool = False,
) -> None:
    """Train the unfinished configs, one stack per starting step and `capacity` members.

    With `contain`, a stack that cannot be built or trained (a user error, named in
    `errors` for each of its members) does not stop the next one.
    """
    todo: dict[int, list[TrainConfig]] = {}
    for config in configs:
        finished = finished_summary(config)
        if finished is not None:
            result.summaries[config.run.name] = finished
        else:
            todo.setdefault(_start_step(config), []).append(config)
    for _, group in sorted(todo.items()):
        for start in range(0, len(group), capacity):
            part = group[start : start + capacity]
            try:
                with contextlib.ExitStack() as locks:
                    for member in part:
                        locks.enter_context(run_dir_lock(member.run_dir))
                    trainer = build_stack(part)
                    summaries = trainer.run(progress=progress, preemption=preemption)
            except LlamaTrainError as error:
                if not contain:
                    raise
                for member in part:
                    result.summaries[member.run.name] = None
                    result.errors[member.run.name] = str(error)
                continue
            for member, summary in zip(part, summaries, strict=True):
                result.summaries[member.run.name] = summary
            result.errors.update(trainer.errors)


def _train_branches(
    trunks: Sequence[TrainConfig],
    result: StackResult,
    *,
    capacity: int,
    progress: bool | None,
    preemption: PreemptionWatch,
) -> None:
    """Fork the unfinished cooldown branches of the finished trunks; train them as stacks.

    A branch's config is its trunk's with the branch's train.steps, so the branches of
    one length of the trunks of a stack differ only where the trunks do: they group by
    `stack_key`, then (as members do) by the step they resume from, which is their
    fork step (an earlier one where a trunk's fork checkpoint is damaged, or the
    branch's own checkpoint when it resumes). Each member equals its branch trained
    alone by `train.train_branches`. A branch whose fork fails, whose stack cannot be
    built or which diverges stops only itself; its trunk's error names it, in the line
    `train_branches` raises.
    """
    owners: dict[str, tuple[TrainConfig, Branch]] = {}  # branch run name: trunk, branch
    groups: dict[tuple[tuple[str, Any], ...], list[TrainConfig]] = {}
    failures: dict[str, list[tuple[int, str]]] = {}  # trunk run name: (steps, "d<D>: why")
    for trunk in trunks:
        summary = result.summaries.get(trunk.run.name)
        if not trunk.train.branches or summary is None:
            continue
        checkpoints = CheckpointManager(trunk.run_dir / CHECKPOINT_DIR, keep=None)
        for branch in trunk_branches(trunk, summary):
            name = branch.config.run.name
            owners[name] = (trunk, branch)
            finished = finished_summary(branch.config)
            if finished is not None:
                result.summaries[name] = finished
                continue
            _say(f"branch {name}: {branch.steps} steps, forking at step {branch.fork_step}")
            try:
                with run_dir_lock(branch.run_dir):
                    fork(branch, checkpoints, _say)
            except LlamaTrainError as error:
                _say(f"branch {name} failed: {error}")
                result.summaries[name] = None
                failures.setdefault(trunk.run.name, []).append(
                    (branch.steps, f"{branch.name}: {error}")
                )
                continue
            groups.setdefault(stack_key(branch.config), []).append(branch.config)
    trained = StackResult({}, {})
    for group in groups.values():
        _train_groups(
            group,
            trained,
            capacity=capacity,
            progress=progress,
            preemption=preemption,
            contain=True,
        )
    result.summaries.update(trained.summaries)
    for name, error in trained.errors.items():
        trunk, branch = owners[name]
        failures.setdefault(trunk.run.name, []).append((branch.steps, f"{branch.name}: {error}"))
    for trunk in trunks:
        if trunk.run.name in failures:
            named = [why for _, why in sorted(failures[trunk.run.name])]
            result.errors[trunk.run.name] = str(branch_failures(trunk, named))


def _say(message: str) -> None:
    console.print(message, highlight=False, soft_wrap=True)
