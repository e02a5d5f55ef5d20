"""Sweep and study points trained as stacks (`train_stack`): grouping, and the stack job.

Points that share everything but what a stack member may vary
(`train_stack.MEMBER_KEYS`: optim, seed, name and directory, logging) are one
group; each group trains in one process as one stack (split further by
`budget.stack_capacity` when memory is short). A point that cannot stack (dropout,
fp16, several ranks) stays alone. :class:`StackJob` is what a process (or a Slurm
task) runs for a group: every member's job_state.json says running / done / failed
/ preempted as a single point's would, and each member that finished gets its
job's after-training work (a study's validation). The cooldown branches of a stack's
trunks train in the same process, stacked in turn (`train_stack`); a trunk whose branch
failed is recorded failed with the branch's reason, and the same command retries it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from llama_train.core.distributed import PREEMPTED_EXIT_CODE
from llama_train.errors import LlamaTrainError
from llama_train.launch.slurm import TrainJob, describe_error
from llama_train.launch.submit_config import SubmitConfig
from llama_train.launch.sweep import Point
from llama_train.recipe import train as recipe
from llama_train.recipe.train_config import TrainConfig
from llama_train.recipe.train_stack import check_stack_configs, stack_key, train_stack
from llama_train.rundir import read_state, write_state


def can_stack(config: TrainConfig) -> bool:
    """Whether a config may train as a stack member (else it trains alone)."""
    try:
        check_stack_configs([config])
    except LlamaTrainError:
        return False
    return True


def stack_groups(configs: Sequence[TrainConfig], *, enabled: bool = True) -> list[list[int]]:
    """Indices of configs grouped into stacks, in order of first appearance.

    Disabled, or for a config that cannot stack, every index is its own group.
    """
    groups: dict[Any, list[int]] = {}
    for index, config in enumerate(configs):
        key = stack_key(config) if enabled and can_stack(config) else ("alone", index)
        groups.setdefault(key, []).append(index)
    return list(groups.values())


@dataclass
class StackJob:
    """Train the configs of several point jobs as one stack; picklable like TrainJob.

    Returns {run dir: problem} for the members that did not finish (empty when
    all did). On preemption every member is checkpointed and recorded as
    preempted; the Slurm task is requeued once, for all of them.
    """

    jobs: list[TrainJob]

    def __call__(self) -> dict[str, str]:
        configs = [job.config for job in self.jobs]
        for config in configs:
            write_state(config.run_dir, "running")
        try:
            result = train_stack([config.train_config() for config in configs], progress=False)
        except recipe.Preempted as stop:
            lead = self.jobs[0]
            lead._requeue(stop.step, saved=stop.checkpoint is not None)
            record = read_state(lead.config.run_dir)
            for config in configs[1:]:
                write_state(
                    config.run_dir,
                    "preempted",
                    step=stop.step,
                    message=record.message if record else None,
                )
            raise SystemExit(PREEMPTED_EXIT_CODE) from None
        except BaseException as error:
            for config in configs:
                write_state(config.run_dir, "failed", message=describe_error(error))
            raise
        problems: dict[str, str] = {}
        for job in self.jobs:
            name, run_dir = job.config.run.name, job.config.run_dir
            summary = result.summaries.get(name)
            # A trunk trained but with a failed branch fails, as `llama-train run` does.
            problem = result.errors.get(name)
            if summary is None or problem is not None:
                problems[str(run_dir)] = problem or "not trained"
                write_state(run_dir, "failed", message=problems[str(run_dir)])
                continue
            write_state(run_dir, "done", step=summary["step"])
            after = getattr(job, "after_training", None)
            if after is not None:
                after()
        return problems


def stack_units(
    points: list[Point], make_job: Callable[[SubmitConfig], TrainJob]
) -> list[tuple[list[Point], Callable[[], Any]]]:
    """`slurm.submit_plan`'s units with stacking: one job (array task) per stack."""
    groups = stack_groups([point.config.train_config() for point in points])
    units: list[tuple[list[Point], Callable[[], Any]]] = []
    for group in groups:
        members = [points[i] for i in group]
        jobs = [make_job(point.config) for point in members]
        units.append((members, jobs[0] if len(jobs) == 1 else StackJob(jobs)))
    return units
