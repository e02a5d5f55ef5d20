"""The training recipe, top to bottom.

Launch (from the repository root)::

    llama-train run packages/llama-train/configs/debug.yaml            # CPU or one GPU
    llama-train run packages/llama-train/configs/demo.yaml optim.lr=1e-3 train.steps=200
    python -m llama_train run CONFIG ...                               # the same
    llama-train run --nproc 4 CONFIG ...                               # 4 processes (torchrun)
    torchrun --standalone --nproc-per-node 4 -m llama_train run CONFIG ...   # the same
    torchrun ... -m llama_train run CONFIG distributed.strategy=fsdp   # sharded (FSDP2)

Running the same command again on the same `run.dir` resumes from the latest
checkpoint, and the losses continue exactly as if the run had never stopped
(bit-exact on CPU): model, optimizer, grad scaler, loader position, every RNG
state and the loop's own counters are in each checkpoint, and the learning
rate is a pure function of the step (`optim.lr_at`).

The recipe: resolve the config (done by the caller) -> write it to
`run.dir/config.yaml` -> build the model (seeded), optimizer and loader ->
load the latest checkpoint if any -> loop: `grad_accum` micro-batches under
autocast, unscale, clip (the pre-clip norm is logged), step -> metrics every
`train.log_every` steps, evaluation every `eval.every`, a checkpoint every
`checkpoint.every`, all three at the last step -> `summary.json`.

Ranks (:mod:`llama_train.core.distributed`): each rank reads its own slice of
every global batch (data.batch_size x train.grad_accum x world size rows per
step), gradients are averaged once per step (DDP) or reduce-scattered (FSDP2),
the logged loss, evaluation and throughput are reduced over ranks, and only
rank 0 writes metrics, evaluation files and the summary. Checkpoints go
through torch.distributed.checkpoint (every rank writes its part), so a run
saved on N processes resumes on M; with the same global batch the losses
continue as if nothing had changed (up to float rounding of the reductions).

Preemption: SIGUSR1 or SIGTERM only raises a flag; at the next step boundary
all ranks agree, save a checkpoint, and :func:`train` raises
:class:`Preempted`; `llama-train run` exits with
:data:`~llama_train.core.distributed.PREEMPTED_EXIT_CODE` (3).
Running the same command again resumes from that checkpoint.


The module reads in the order a run happens: :func:`train` (one run directory
under its lock and process group, then its cooldown branches), the build step
:func:`build` (lock, store, device, config checks, model, checkpoint, and what
watches the loop: metrics logger, profiler, trace window, progress display),
the loop :meth:`Trainer.loop`, and the step :meth:`Trainer.train_step`:
`llama-train run` -> `train` -> `Trainer.loop` -> `Trainer.train_step`.
The loop's own state (counters, loss window, exceptions) comes last.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from gssm_data.common.humanize import format_si
from gssm_data.common.progress import progress_display, progress_mode
from gssm_data.common.resources import default_threads, describe_threads, set_torch_threads
from llama_train.core import distributed
from llama_train.core.budget import check_training_fits
from llama_train.core.checkpoint import CheckpointManager, DcpPayload, rng_state, set_rng_state
from llama_train.core.compile_cache import compile_cache
from llama_train.core.config_files import flatten_keys
from llama_train.core.data import DataSpec, TrainLoader, build_loader, resolve_data
from llama_train.core.distributed import (
    PreemptionWatch,
    RankInfo,
    rank_info,
    resolve_amp,
    resolve_device,
)
from llama_train.core.evaluate import (
    EvalResult,
    EvalSet,
    evaluate,
)
from llama_train.core.metrics import MetricLogger, system_metrics
from llama_train.core.model import Llama
from llama_train.core.optim import (
    OptimConfig,
    build_optimizer,
    clip_gradients,
    lr_at,
    resolve_warmup,
    set_lr,
)
from llama_train.core.profiler import StepProfiler, TraceWindow, flops_per_token
from llama_train.core.run_identity import data_fingerprint
from llama_train.core.runlock import run_dir_lock
from llama_train.core.weights import WEIGHTS_FILE, full_model_state, write_weights
from llama_train.errors import LlamaTrainError
from llama_train.recipe.branches import branch_failures, fork, plan_branches, trunk_branches
from llama_train.recipe.train_config import (
    TrainConfig,
    TrainSection,
    keep_legacy_settings,
    with_legacy_defaults,
    write_config,
)
from llama_train.rundir import (
    CHECKPOINT_DIR,
    CONFIG_FILENAME,
    SUMMARY_VERSION,
    RunSummary,
    drop_evaluations_after,
    load_yaml,
    sound_summary,
    wandb_name_and_group,
    write_evaluation,
)
from llama_train.scaling.compute import training_compute

console = Console(stderr=True)


# ---------------------------------------------------------------------------
# The run


def train(
    config: TrainConfig,
    *,
    progress: bool | None = None,
    prepare: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the training described by a resolved config; return the summary.

    Launched as several ranks (torchrun, srun), it starts the process group
    and always destroys it. `progress` overrides `train.progress` (the
    benchmark and tests turn it off). On SIGUSR1 or SIGTERM the run
    checkpoints at an agreed step and raises :class:`Preempted` on every rank.
    With `train.branches`, the run is a trunk: once it is done, each cooldown
    branch that is not is forked and trained (:mod:`llama_train.recipe.branches`).
    `prepare` runs on rank 0 first, holding the run's lock (a branch's fork).
    """
    ranks = rank_info()
    summary = finished_summary(config)
    if summary is not None:
        _say_on_main(
            ranks,
            f"{config.run_dir} is complete (step {summary['step']} of "
            f"{config.train.steps}): nothing to train; raise train.steps to continue it",
        )
    else:
        device = resolve_device(config.train, ranks)
        with (
            PreemptionWatch() as preemption,
            compile_cache(config.train.compile_cache if config.train.compile else None),
            distributed.process_group(ranks, device, config.distributed),
            contextlib.ExitStack() as held,
        ):
            trainer = build(config, ranks, device, held, progress=progress, prepare=prepare)
            try:
                trainer.loop(preemption)
            except NonFiniteLoss as error:
                raise NonFiniteLoss(f"{error}. {trainer.last_good()}") from None
            trainer.finish(trainer.logger)
            summary = trainer.write_summary()
    if config.train.branches:
        train_branches(config, summary, progress=progress)
    return summary


def train_branches(
    trunk: TrainConfig, summary: dict[str, Any], *, progress: bool | None = None
) -> list[dict[str, Any]]:
    """Fork and train every unfinished branch of a finished trunk; their summaries.

    A branch that fails (its fork impossible, a non-finite loss) does not stop the
    others; the failures are raised together at the end, one line. A preemption
    stops at once: running the same command again resumes the branch.
    """
    trunk_checkpoints = CheckpointManager(trunk.run_dir / CHECKPOINT_DIR, keep=None)
    summaries, failures = [], []
    for branch in trunk_branches(trunk, summary):
        finished = finished_summary(branch.config)
        if finished is not None:
            summaries.append(finished)
            continue
        say = partial(_say_on_main, rank_info())
        say(f"branch {branch.name}: {branch.steps} steps, forking at step {branch.fork_step}")
        try:
            summaries.append(
                train(
                    branch.config,
                    progress=progress,
                    prepare=partial(fork, branch, trunk_checkpoints, say),
                )
            )
        except LlamaTrainError as error:
            if not isinstance(error, distributed.OtherRankFailed):
                say(f"branch {branch.name} failed: {error}")
            failures.append(f"{branch.name}: {error}")
    if failures:
        raise branch_failures(trunk, failures)
    return summaries


def _say_on_main(ranks: RankInfo, message: str) -> None:
    if ranks.is_main:
        console.print(message, highlight=False, soft_wrap=True)


def finished_summary(config: TrainConfig) -> dict[str, Any] | None:
    """The summary of a run that already reached `train.steps`, None when there is work left.

    Finished means summary.json says so and the newest checkpoint is that same
    step (a summary without its checkpoint, or one of a shorter run, is not).
    """
    # A damaged summary is none: the run resumes from its last checkpoint and writes it again.
    summary = sound_summary(config.run_dir)
    if summary is None or summary.step < config.train.steps:
        return None
    steps = CheckpointManager(config.run_dir / CHECKPOINT_DIR, keep=config.checkpoint.keep).steps()
    return summary.to_dict() if steps and steps[-1] == summary.step else None


# ---------------------------------------------------------------------------
# The build step


def build(
    config: TrainConfig,
    ranks: RankInfo,
    device: torch.device,
    held: contextlib.ExitStack,
    *,
    progress: bool | None = None,
    prepare: Callable[[], None] | None = None,
) -> Trainer:
    """Everything one run needs before its first step, entered into `held` to close with it.

    The run directory's lock (one per job: a second job fails on every rank),
    `prepare`, the trainer (:func:`build_trainer`: store, config checks, model,
    optimizer, loader, latest checkpoint), and what watches the loop: the
    metrics logger, the profiler, the trace window and the progress display.
    """
    with distributed.together(f"locking {config.run_dir}"):
        if ranks.is_main:
            held.enter_context(run_dir_lock(config.run_dir))
    if prepare is not None:
        with distributed.together(f"preparing {config.run_dir}"):
            if ranks.is_main:
                prepare()
    trainer = build_trainer(config, ranks, device=device)
    config = trainer.config  # with the settings a resumed run keeps
    trainer.logger = held.enter_context(trainer.open_logger())
    trainer.profiler = StepProfiler(
        trainer.run_dir,
        config.profile,
        device=device,
        flops_per_token=trainer.flops_per_token,
        world_size=ranks.world_size,
        enabled=ranks.is_main,
    )
    trainer.profiler.start(trainer.state.step if trainer.resumed else None)
    trainer.profiler.load_state_dict(trainer.state.profiler)
    trainer.trace = held.enter_context(
        TraceWindow(
            trainer.run_dir,
            config.profile,
            device=device,
            rank=ranks.rank,
            on_file=trainer.logger.upload,
        )
    )
    show = (config.train.progress if progress is None else progress) and ranks.is_main
    trainer.progress = held.enter_context(progress_bar(show, config.train.progress_every))
    trainer.progress_task = trainer.progress.add_task(
        "train",
        total=config.train.steps,
        completed=trainer.state.step,
        loss="-",
        excess="-",
        speed="-",
    )
    return trainer


def build_trainer(
    config: TrainConfig, ranks: RankInfo | None = None, *, device: torch.device | None = None
) -> Trainer:
    """Write the config, build model/optimizer/loader, and load the latest checkpoint.

    Every rank calls it (a stack calls it once per member, then opens their
    loggers itself). Several ranks (or FSDP on one) need the process group
    that :func:`train` starts. Whatever can fail for a user's reason (data,
    run directory, config) is checked on every rank before the first
    collective, and a failure on any rank stops them all (no rank is left
    waiting for one that has exited). `device` is the one :func:`train`
    resolved; left out, it is resolved here.
    """
    ranks = ranks or rank_info()
    if distributed.needs_process_group(ranks, config.distributed) and not (
        distributed.is_initialized()
    ):
        raise LlamaTrainError(
            f"this is rank {ranks.rank} of {ranks.world_size} ({ranks.launcher}) with "
            f"distributed.strategy={config.distributed.strategy}, but no process group is up; "
            "train through llama_train.recipe.train.train(config) or the llama-train command"
        )
    threads = _set_threads(config.train, ranks, config.data.num_workers)
    device = device if device is not None else resolve_device(config.train, ranks)
    run_dir = config.run_dir
    with distributed.together("checking the run directory, the data and the model"):
        amp_dtype = resolve_amp(config.train.amp, device)
        checkpoints = CheckpointManager(
            run_dir / CHECKPOINT_DIR, keep=config.checkpoint.keep, payload=DcpPayload()
        )
        stored = None  # the config.yaml of the run this one resumes, read once
        if checkpoints.steps() and (run_dir / CONFIG_FILENAME).is_file():
            stored = load_yaml(run_dir / CONFIG_FILENAME)
            config = keep_legacy_settings(config, stored)
        changes = check_resumable(config, stored)
        spec = resolve_data(config.data)
        check_training_fits(
            config.model,
            batch_size=config.data.batch_size,
            eval_batch_size=config.eval.batch_size or config.data.batch_size,
            seq_len=spec.seq_len - 1,
            device=device,
            shards=ranks.world_size if config.distributed.strategy == "fsdp" else 1,
            processes_sharing=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
            half_precision=amp_dtype is not None,
        )
        seed_everything(config.run.seed + ranks.rank)
        model = Llama(config.model, seed=config.run.seed)  # the same weights on every rank
        loader = build_loader(
            config.data,
            rank=ranks.rank,
            world_size=ranks.world_size,
            seq_len=spec.seq_len,
            seed=config.run.seed,
            spec=spec,
        )
        eval_set = EvalSet(
            spec,
            split=config.eval.split,
            max_sequences=config.eval.max_sequences,
            rank=ranks.rank,
            world_size=ranks.world_size,
        )
    with distributed.together(f"writing {run_dir / CONFIG_FILENAME}"):
        if ranks.is_main:
            write_config(config)
    step_model = distributed.parallelize(
        model,
        strategy=config.distributed.strategy,
        device=device,
        amp_dtype=amp_dtype,
        compile=config.train.compile,
    )
    trainer = Trainer(
        config=config,
        ranks=ranks,
        device=device,
        amp_dtype=amp_dtype,
        spec=spec,
        model=model,
        step_model=step_model,
        optimizer=build_optimizer(model, config.optim),  # after sharding: on the shards
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        loader=loader,
        checkpoints=checkpoints,
        eval_set=eval_set,
        state=TrainState(),
        resumed=False,
    )
    with distributed.together("planning the cooldown branches"):
        branches = plan_branches(
            config, tokens_per_step=trainer.tokens_per_step, optim=trainer.optim
        )
    trainer.fork_steps = checkpoints.pinned = frozenset(branch.fork_step for branch in branches)
    step = trainer.load_latest_checkpoint()
    if step is not None:
        trainer.resumed = True
        if ranks.is_main:
            drop_evaluations_after(run_dir, step)
        trainer.say(f"resuming {run_dir} from step {step}")
        for change in changes:
            trainer.say(f"  changed since the checkpoint: {change}")
    where = f"{device}"
    if distributed.is_initialized():
        where = f"{ranks.world_size} x {device} ({config.distributed.strategy})"
    trainer.say(
        f"model: {model.num_parameters():,} parameters "
        f"({model.num_parameters(exclude_embeddings=True):,} without embeddings); "
        f"{trainer.tokens_per_step:,} tokens per step on {where}"
        + (f" with {config.train.amp} autocast" if amp_dtype is not None else "")
        + (f"; {threads}" if device.type == "cpu" else "")
    )
    return trainer


def _set_threads(section: TrainSection, ranks: RankInfo, loader_workers: int) -> str:
    """train.threads when set; else one per rank, or the idle CPUs of a single process
    less one per DataLoader worker (each works in one thread beside the training step).

    Returns the choice in words for the start-up line.
    """
    threads = section.threads
    if threads is None and ranks.distributed:
        threads = 1
    if threads is None:
        threads = max(default_threads() - loader_workers, 1)
    chosen = set_torch_threads(threads)
    return describe_threads(chosen, ranks.world_size if ranks.distributed else 1)


def check_resumable(config: TrainConfig, stored: Mapping[str, Any] | None) -> list[str]:
    """Compare the config.yaml of an existing run (`stored`) with this one before resuming it.

    A different model cannot load the checkpoint: a user error naming the keys.
    Other differences are allowed (a longer run, another eval cadence) and
    returned as `key: old -> new` lines to show. None (nothing to resume): no changes.
    """
    if stored is None:
        return []
    run_dir = config.run_dir
    new = flatten_keys(config.model_dump(mode="json"))
    # A key the old file lacks (written before the key existed) had its default then.
    defaults = flatten_keys(type(config).model_construct().model_dump(mode="json", warnings=False))
    old = {key: defaults[key] for key in new if key in defaults} | flatten_keys(
        with_legacy_defaults(stored)
    )
    changed = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    model_changes = [
        key for key in changed if key.startswith("model.") and key not in WEIGHT_NEUTRAL_KEYS
    ]
    if model_changes:
        details = ", ".join(f"{key}: {old.get(key)} -> {new.get(key)}" for key in model_changes)
        raise LlamaTrainError(
            f"{run_dir} holds checkpoints of another model ({details}); "
            "resume with the original model settings or choose another run.dir"
        )
    return [f"{key}: {old.get(key)} -> {new.get(key)}" for key in changed]


# Model keys that choose how the same weights are computed with, not what they are: a
# run may resume with another attention kernel (same results to float tolerance).
WEIGHT_NEUTRAL_KEYS = frozenset({"model.attention"})


def seed_everything(seed: int) -> None:
    """Seed every global RNG the loop may draw from (dropout, workers)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def progress_bar(enabled: bool, every: float) -> Progress:
    """A bar on a terminal; a line every `every` seconds in a log (Slurm, CI); or nothing."""
    return progress_display(
        TextColumn("step {task.completed}/{task.total}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("excess {task.fields[excess]}"),
        TextColumn("{task.fields[speed]} tok/s"),
        TimeRemainingColumn(),
        console=console,
        mode=progress_mode() if enabled else "off",
        every=every,
    )


# ---------------------------------------------------------------------------
# The loop and the step


@dataclass
class Trainer:
    """Everything a run holds; built by :func:`build`, driven by :meth:`loop`."""

    config: TrainConfig
    ranks: RankInfo
    device: torch.device
    amp_dtype: torch.dtype | None
    spec: DataSpec
    model: Llama  # the model's parameters (sharded in place under FSDP): state dicts, eval
    step_model: torch.nn.Module  # the model as the loop calls it (compiled, DDP-wrapped or not)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: TrainLoader
    checkpoints: CheckpointManager
    eval_set: EvalSet
    state: TrainState
    resumed: bool
    saved_step: int | None = None  # step of the checkpoint on disk that matches the state
    fork_steps: frozenset[int] = frozenset()  # a trunk's: checkpointed, kept (branches)
    startup_cpu_seconds: float | None = None  # this process's CPU before its first step
    # What watches the loop, set by :func:`build` (a stack keeps its own loggers and bar).
    logger: MetricLogger | None = None
    profiler: StepProfiler | None = None
    trace: TraceWindow | None = None
    progress: Progress | None = None
    progress_task: Any = None

    def loop(self, preemption: PreemptionWatch) -> None:
        """Train to `train.steps`, logging, evaluating and checkpointing on schedule.

        A preemption signal stops the loop at an agreed step boundary: the
        state is checkpointed and Preempted raised.
        """
        config, state = self.config, self.state
        logger, profiler, trace, bar = self.logger, self.profiler, self.trace, self.progress
        assert None not in (logger, profiler, trace, bar), "build() sets up what watches the loop"
        task = self.progress_task
        steps = config.train.steps
        window = LossWindow(state, check_grad_norm=self.amp_dtype != torch.float16)
        batches = iter(self.loader)
        session_start = time.perf_counter()
        wall_before = state.wall_seconds
        self.startup_cpu_seconds = time.process_time()  # interpreter, imports, set-up

        def elapsed() -> float:
            return wall_before + time.perf_counter() - session_start

        while state.step < steps:
            if preemption.poll():  # the same answer on every rank, at the same step
                window.sync()
                state.wall_seconds = elapsed()
                self._preempt(preemption)
            trace.before_step(state.step)
            started = time.perf_counter()
            loss, grad_norm = self.train_step(batches)
            trace.after_step()
            profiler.step_done(self.tokens_per_step)
            state.step += 1
            state.tokens += self.tokens_per_step
            seconds = time.perf_counter() - started
            state.train_seconds += seconds
            window.add(loss, grad_norm, self.tokens_per_step, seconds)
            bar.update(task, completed=state.step)
            last = state.step == steps
            due_log, due_eval, due_checkpoint = due_work(state.step, config, self.fork_steps)
            if not (due_log or due_eval or due_checkpoint):
                continue
            window.sync()
            if due_log:
                figures = window.flush()
                logger.log(self.metrics_line(figures, elapsed()))
                bar.update(
                    task, loss=f"{figures['loss']:.4f}", speed=format_si(figures["tokens_per_s"])
                )
            if due_eval:
                with self._phase("eval"):
                    result = self.evaluate_and_log(logger)
                bar.update(task, excess=f"{result.excess:.4f}")
            # The profiler's row of a step comes before its checkpoint (which then holds
            # the profiler's state up to that row); the last checkpoint goes in the last row.
            if due_log and not last:
                profiler.row(state.step)
            if due_checkpoint:
                state.wall_seconds = elapsed()
                with self._phase("checkpoint"):
                    self.save_checkpoint()
            if due_log and last:
                profiler.row(state.step)
        preemption.settle()  # every rank polled as often: its last agreement can finish

    def train_step(self, batches: Iterator[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulate `grad_accum` micro-batches, clip, step. Returns (mean loss, pre-clip norm)."""
        config = self.config
        set_lr(self.optimizer, lr_at(self.state.step, config.train.steps, self.optim))
        accum = config.train.grad_accum
        total = torch.zeros((), device=self.device)
        for micro in range(accum):
            with self._phase("data_wait"):
                batch = next(batches).to(self.device, non_blocking=True)  # (B, L)
            # Gradients cross ranks once per optimizer step, on the last micro-batch.
            with (
                self._phase("forward_backward"),
                distributed.gradient_sync(self.step_model, enabled=micro == accum - 1),
            ):
                with distributed.autocast(self.device, self.amp_dtype):
                    loss = self.step_model(batch[:, :-1], batch[:, 1:]).loss / accum
                self.scaler.scale(loss).backward()
            total += loss.detach()
        with self._phase("optimizer"):
            self.scaler.unscale_(self.optimizer)  # true gradients before measuring/clipping
            grad_norm = distributed.full_value(clip_gradients(self.model, config.optim.grad_clip))
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        return total, grad_norm

    # -- the step's helpers ----------------------------------------------------

    @functools.cached_property
    def optim(self) -> OptimConfig:
        """The optim section with its warmup rule resolved (what :func:`lr_at` reads)."""
        return resolve_warmup(
            self.config.optim,
            parameters=self.model.num_parameters(),
            tokens_per_step=self.tokens_per_step,
        )

    def _phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Time a block as a phase of the light profiler (nothing when there is none)."""
        return contextlib.nullcontext() if self.profiler is None else self.profiler.phase(name)

    @property
    def tokens_per_step(self) -> int:
        """Predicted tokens per optimizer step, all ranks (L-1 per sequence)."""
        data = self.config.data
        return (
            data.batch_size
            * (self.spec.seq_len - 1)
            * self.config.train.grad_accum
            * self.ranks.world_size
        )

    @property
    def flops_per_token(self) -> float:
        """Training FLOPs per predicted token (see llama_train.core.profiler.flops_per_token)."""
        model = self.config.model
        return flops_per_token(
            self.model.num_parameters(exclude_embeddings=True),
            model.n_layers,
            model.dim,
            self.spec.seq_len - 1,
        )

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir

    def say(self, message: str) -> None:
        if self.ranks.is_main:
            console.print(message, highlight=False, soft_wrap=True)

    # -- evaluation and checkpoints -----------------------------------------

    def evaluate(self) -> EvalResult:
        batch_size = self.config.eval.batch_size or self.config.data.batch_size
        return evaluate(
            self.model,
            self.eval_set,
            step=self.state.step,
            batch_size=batch_size,
            device=self.device,
            amp_dtype=self.amp_dtype,
        )

    def save_checkpoint(self) -> Path:
        """Checkpoint the current step (collective: every rank calls it); return its folder.

        Model and optimizer go through DCP under parameter names (sharded
        under FSDP); the rest is rank 0's, except the RNG states, one per rank.
        The loader position and the counters are global, so any number of
        ranks can resume from it.
        """
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        weights = full_model_state(self.model)  # collective; rank 0 holds them
        model_config = self.config.model.model_dump(mode="json")
        if self.profiler is not None:
            self.state.profiler = self.profiler.state_dict()
        folder = self.checkpoints.save(
            self.state.step,
            {
                "model": model_state,
                "optimizer": optimizer_state,
                "scaler": self.scaler.state_dict(),
                "loader": self.loader.state_dict(),
                "rng": distributed.gather_objects(rng_state()),  # rank r's at index r
                "trainer": self.state.state_dict(),
                "model_config": self.config.model.model_dump(mode="json"),
                "world_size": self.ranks.world_size,
                "strategy": self.config.distributed.strategy,
            },
            extra_files={
                WEIGHTS_FILE: partial(write_weights, state=weights, model_config=model_config)
            },
        )
        self.saved_step = self.state.step
        return folder

    def load_latest_checkpoint(self) -> int | None:
        """Restore the newest sound checkpoint, whatever world size wrote it; its step or None.

        get_state_dict's templates (this run's layout: sharded or not) are
        filled in place by DCP, then set_state_dict hands them to the model
        and optimizer. Building the templates initialises an empty optimizer's
        state, so it is done only when there is something to load.
        """
        if not self.checkpoints.agreed_steps():
            return None  # a fresh run: no DCP import (about 1 s of CPU) before its first step
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        latest = self.checkpoints.load_latest(
            map_location="cpu", into={"model": model_state, "optimizer": optimizer_state}
        )
        if latest is None:
            return None
        step, state = latest
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(state["loader"])
        # A rank beyond those that saved (resuming on more ranks) keeps its fresh seed.
        rng_states = state["rng"]
        if self.ranks.rank < len(rng_states):
            set_rng_state(rng_states[self.ranks.rank])
        self.state = TrainState.from_state_dict(state["trainer"])
        self.saved_step = step
        return step

    def _preempt(self, preemption: PreemptionWatch) -> None:
        """Checkpoint the current step (unless the one on disk is it) and raise Preempted.

        Before the first step of a fresh run there is nothing worth saving (and
        DCP would initialise the empty optimizer state): the same command
        simply starts again.
        """
        step = self.state.step
        if self.saved_step != step and step > 0:
            self.save_checkpoint()
        folder = self.checkpoints.folder(step) if self.saved_step == step else None
        preemption.settle()
        raise Preempted(step, folder)

    def last_good(self) -> str:
        """Where the run can resume from after a non-finite loss, and what to change."""
        steps = self.checkpoints.steps()
        where = (
            f"The last good checkpoint (step {steps[-1]}) is kept in {self.checkpoints.directory}"
            if steps
            else "No checkpoint was saved yet"
        )
        return (
            f"{where}; lower optim.lr, raise optim.warmup_steps or use train.amp=fp32, "
            "then run the same command to resume"
        )

    # -- records: metrics, evaluations, summary -------------------------------

    def open_logger(self) -> MetricLogger:
        """The run's metrics.jsonl (and wandb run), continued after a resume."""
        config = self.config
        wandb = config.logging.wandb
        name, group = wandb_name_and_group(config.run.name, wandb.name)
        return MetricLogger(
            self.run_dir,
            enabled=self.ranks.is_main,
            resume_step=self.state.step if self.resumed else None,
            wandb_mode=wandb.effective_mode,
            wandb_project=wandb.project,
            wandb_entity=wandb.entity,
            run_name=name,
            group=group,
            config={
                **config.model_dump(mode="json"),
                "parameters": self.parameter_counts(),
                "data_fingerprint": data_fingerprint(self.spec),
            },
        )

    def metrics_line(self, figures: dict[str, float], elapsed: float) -> dict[str, Any]:
        """The metrics.jsonl line of the step just done, from a LossWindow's figures."""
        state, steps = self.state, self.config.train.steps
        return {
            "step": state.step,
            **figures,
            "lr": lr_at(state.step - 1, steps, self.optim),
            "tokens": state.tokens,
            "epoch": self.loader.epoch,
            "elapsed": elapsed,
            "train_seconds": state.train_seconds,
            **system_metrics(self.device),
        }

    def finish(self, logger: MetricLogger) -> None:
        """After the last step: evaluate it unless done, and hand the logger the totals."""
        if self.state.last_eval is None or self.state.last_eval["step"] != self.state.step:
            self.evaluate_and_log(logger)
        logger.summarize(self.scale_figures())

    def evaluate_and_log(self, logger: MetricLogger) -> EvalResult:
        result = self.evaluate()
        self.state.last_eval = result.to_dict()
        if self.ranks.is_main:
            logger.log({"step": result.step, **result.metrics()})
            write_evaluation(self.run_dir, result.record())
        self.say(
            f"step {result.step}: {result.split} loss {result.loss:.4f}, exact entropy "
            f"{result.entropy:.4f}, excess {result.excess:.4f} nats ({result.excess_bits:.4f} bits)"
        )
        return result

    def write_summary(self) -> dict[str, Any]:
        """summary.json: the final evaluation and the run's totals (nats, with bits beside)."""
        assert self.state.last_eval is not None
        result = EvalResult.from_dict(self.state.last_eval)
        summary: dict[str, Any] = {
            "version": SUMMARY_VERSION,
            "step": self.state.step,
            "test_loss": result.loss,
            "test_entropy": result.entropy,
            "excess_loss": result.excess,
            "test_loss_bits": result.loss_bits,
            "test_entropy_bits": result.entropy_bits,
            "excess_loss_bits": result.excess_bits,
            "entropy_method": result.entropy_method,
            "eval_split": result.split,
            "eval_sequences": result.n_sequences,
            "parameters": self.model.num_parameters(),
            "warmup_steps": self.optim.warmup_steps,
            "world_size": self.ranks.world_size,
            "tokens": self.state.tokens,
            "train_seconds": self.state.train_seconds,
            "tokens_per_s": self.state.tokens / max(self.state.train_seconds, 1e-9),
            "data": str(self.config.data.path) if self.config.data.path else None,
            "profile_seconds": dict(self.profiler.totals) if self.profiler else None,
            "startup_cpu_seconds": self.startup_cpu_seconds,
            "baselines": self._baselines(),
            **self.scale_figures(),
        }
        record = RunSummary.model_validate(summary)
        if self.ranks.is_main:
            record.write(self.run_dir)
        return record.to_dict()

    def parameter_counts(self) -> dict[str, int]:
        """Total (embeddings and head) and non-embedding (head still in) parameter counts.

        Fits use the total by default (Pearce & Song 2024; Porian et al. 2024: at small
        scale the non-embedding count biases the exponents); both are reported.
        """
        return {
            "parameters_total": self.model.num_parameters(),
            "parameters_non_embedding": self.model.num_parameters(exclude_embeddings=True),
        }

    def scale_figures(self) -> dict[str, Any]:
        """What a scaling-law fit reads from a run: N, tokens seen and unique, FLOPs, store.

        Unique tokens are the predicted tokens of the train prefix (n_train x (seq_len - 1));
        online data never repeats, so there every token seen is unique. Unique tokens seen
        are those the run has actually read (less than the prefix within the first epoch,
        as for a cooldown branch: its D).
        """
        context = self.spec.seq_len - 1
        seen = self.state.tokens
        unique = seen if self.spec.n_train is None else self.spec.n_train * context
        counts = self.parameter_counts()
        compute = training_compute(
            non_embedding_parameters=counts["parameters_non_embedding"],
            n_layers=self.config.model.n_layers,
            dim=self.config.model.dim,
            context=context,
            tokens=seen,
        )
        store = self.spec.store
        return {
            **counts,
            "n_train": self.spec.n_train,
            "tokens_seen": seen,
            "unique_tokens": unique,
            # Rows seen at least once: an epoch visits every row of the prefix once.
            "unique_tokens_seen": min(seen, unique),
            "epochs": seen / unique if unique else 0.0,
            **compute.to_dict(),
            "store_fingerprint": store.manifest.fingerprint if store is not None else None,
        }

    def _baselines(self) -> dict[str, float] | None:
        store = self.spec.store
        if store is None or self.eval_set.split not in store.manifest.splits:
            return None
        baselines = store.baselines(self.eval_set.split)
        return None if baselines is None else baselines.model_dump()


# ---------------------------------------------------------------------------
# Loop state


@dataclass
class TrainState:
    """The loop's own resumable counters (saved in every checkpoint as plain types)."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # predicted tokens consumed, all ranks
    train_seconds: float = 0.0  # time inside training steps, all sessions
    wall_seconds: float = 0.0  # wall-clock time of the run, all sessions (up to the last save)
    window_losses: list[float] = field(default_factory=list)  # since the last metrics line
    window_grad_norms: list[float] = field(default_factory=list)
    last_eval: dict[str, Any] | None = None
    profiler: dict[str, Any] = field(default_factory=dict)  # StepProfiler.state_dict()

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TrainState:
        return cls(**state)


class LossWindow:
    """Per-step losses and pre-clip gradient norms since the last metrics line.

    Kept as device tensors between syncs so the loop never waits on the GPU;
    `sync` fetches them once (at a log, eval or checkpoint step), checks them
    and averages the loss over ranks.
    """

    def __init__(self, state: TrainState, *, check_grad_norm: bool) -> None:
        self.state = state
        self.check_grad_norm = check_grad_norm
        self._losses: list[torch.Tensor] = []
        self._grad_norms: list[torch.Tensor] = []
        self.seconds = 0.0
        self.tokens = 0

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, tokens: int, seconds: float) -> None:
        self._losses.append(loss.detach().float())
        self._grad_norms.append(grad_norm.detach().float())
        self.tokens += tokens
        self.seconds += seconds

    def sync(self) -> None:
        """Move pending values into the state; raise NonFiniteLoss at the first bad step.

        Collective: the losses are averaged over ranks (every rank sees the
        same figures, so all stop together on a bad one) and the window's
        time is the slowest rank's, so tokens_per_s is the job's throughput.
        Gradient norms are already global (all-reduced or sharded gradients).
        """
        if not self._losses:
            return
        started = time.perf_counter()
        losses_tensor = distributed.all_reduce(torch.stack(self._losses), "sum")
        values = torch.stack(
            [losses_tensor / distributed.world_size(), torch.stack(self._grad_norms)]
        )
        losses, norms = values.cpu().tolist()
        self.seconds += time.perf_counter() - started
        self.seconds = float(distributed.all_reduce(torch.tensor([self.seconds]), "max").item())
        first = self.state.step - len(losses) + 1
        for offset, (loss, norm) in enumerate(zip(losses, norms, strict=True)):
            if not math.isfinite(loss) or (self.check_grad_norm and not math.isfinite(norm)):
                what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm}"
                raise NonFiniteLoss(_nonfinite_message(what, first + offset))
        self.state.window_losses.extend(losses)
        self.state.window_grad_norms.extend(norms)
        self._losses, self._grad_norms = [], []

    def flush(self) -> dict[str, float]:
        """The figures of a metrics line for the synced window; start a new window."""
        losses, norms = self.state.window_losses, self.state.window_grad_norms
        figures = {
            "loss": math.fsum(losses) / len(losses),
            "grad_norm": math.fsum(norms) / len(norms),
            "tokens_per_s": self.tokens / self.seconds if self.seconds > 0 else 0.0,
        }
        self.state.window_losses, self.state.window_grad_norms = [], []
        self.seconds, self.tokens = 0.0, 0
        return figures


def due_work(
    step: int, config: TrainConfig, fork_steps: frozenset[int] = frozenset()
) -> tuple[bool, bool, bool]:
    """Whether a metrics line, an evaluation and a checkpoint are due after optimizer
    step `step` (1-based count of steps done); all three at the last step, and a
    checkpoint at each of a trunk's fork steps (its cooldown branches start there)."""
    last = step == config.train.steps
    return (
        step % config.train.log_every == 0 or last,
        step % config.eval.every == 0 or last,
        step % config.checkpoint.every == 0 or last or step in fork_steps,
    )


class NonFiniteLoss(LlamaTrainError):
    """The loss (or gradient norm) became NaN or infinite: the run stops."""


class Preempted(Exception):
    """The run stopped on a preemption signal after checkpointing `step` (not a user error).

    Raised on every rank at the same step. `checkpoint` is the folder holding
    that step (None when the signal came before the first step: there was
    nothing to save, and running again starts afresh exactly as before).
    """

    def __init__(self, step: int, checkpoint: Path | None = None) -> None:
        self.step = step
        self.checkpoint = checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint is not None else "nothing to save yet"
        super().__init__(f"preempted at step {step}: {where}; run the same command again to resume")


def _nonfinite_message(what: str, step: int) -> str:
    return f"{what} at step {step}: stopping without saving this step's state"
