"""`llama-train submit`, `sweep-status` and `best`: Slurm jobs, sweeps and their winner.

Thin commands over :func:`llama_train.launch.slurm.submit` and
:mod:`llama_train.launch.sweep`, imported inside the commands so `llama-train
--help` does not load torch; importing this module registers them on the app.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from llama_train.analysis.status import PointStatus, rank_points, state_counts, sweep_status
from llama_train.cli.app import app, console, err_console, user_errors
from llama_train.core.plain_text import control_character
from llama_train.errors import LlamaTrainError

if TYPE_CHECKING:
    from llama_train.launch.slurm import Submission


def _say(message: str) -> None:
    err_console.print(message, highlight=False, soft_wrap=True)


@app.command("submit")
def submit_command(
    config: Annotated[Path, typer.Argument(help="Training config (YAML), with or without sweep.")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="key.sub=value overrides, e.g. optim.lr=3e-4 sweep.model.dim=[32,64]."),
    ] = None,
    partition: Annotated[
        str | None, typer.Option(help="Slurm partition (slurm.partition).")
    ] = None,
    time: Annotated[
        str | None,
        typer.Option(help="Time limit: minutes, H:MM:SS or D-HH:MM:SS (slurm.timeout_min)."),
    ] = None,
    nodes: Annotated[int | None, typer.Option(help="Nodes per run (slurm.nodes).")] = None,
    gpus_per_node: Annotated[
        int | None, typer.Option(help="GPUs per node, one trainer task each (slurm.gpus_per_node).")
    ] = None,
    cpus_per_task: Annotated[
        int | None, typer.Option(help="CPUs per task (slurm.cpus_per_task).")
    ] = None,
    mem: Annotated[str | None, typer.Option(help="Memory per node, e.g. 64G (slurm.mem).")] = None,
    local: Annotated[
        bool,
        typer.Option(
            "--local", help="Run the same job(s) here through submitit's local executor and wait."
        ),
    ] = False,
    no_stack: Annotated[
        bool,
        typer.Option(
            "--no-stack",
            help="One job per sweep point. By default, points that differ only in optim.*, "
            "run.seed or logging train together as one stack per job (the same results).",
        ),
    ] = False,
) -> None:
    """Submit a training run to Slurm, or its `sweep` grid as one array job.

    Precedence: defaults < CONFIG < overrides < flags. Each point of a sweep
    gets its own run directory under run.dir, named by its overrides. Running
    the same command again submits only what is neither done nor queued.
    Preempted or timed-out runs (SIGUSR1 slurm.signal_delay_s before the limit,
    or SIGTERM) checkpoint, requeue themselves and resume.
    """
    from llama_train.launch.slurm import parse_time_limit, submit
    from llama_train.launch.stacks import stack_units

    with user_errors():
        for flag, text in (("--partition", partition), ("--time", time), ("--mem", mem)):
            found = control_character(text or "")
            if found is not None:
                raise LlamaTrainError(
                    f"{flag} contains the control character {found}, which would break the "
                    "generated job script"
                )
        settings: dict[str, Any] = {
            key: value
            for key, value in {
                "partition": partition,
                "timeout_min": parse_time_limit(time) if time is not None else None,
                "nodes": nodes,
                "gpus_per_node": gpus_per_node,
                "cpus_per_task": cpus_per_task,
                "mem": mem,
            }.items()
            if value is not None
        }
        submission = submit(
            config,
            overrides or [],
            slurm_settings=settings,
            local=local,
            log=_say,
            units=None if no_stack else stack_units,
        )
    _report(submission)


def _report(submission: Submission) -> None:
    """Job id, what runs where, logs, and the command that shows progress."""
    from llama_train.launch.slurm import tasks_per_node

    plan = submission.plan
    directory = plan.directory
    for name, reason in submission.skipped.items():
        _say(f"skipped {name}: {reason}")
    if not submission.jobs:
        console.print(f"nothing to submit in {directory}: every point is done or queued")
        return
    if submission.executor == "local":
        console.print(status_table(_statuses(directory)))
        return
    slurm = plan.base.slurm
    resources = (
        f"partition {slurm.partition or '(default)'}, {slurm.timeout_min} min, "
        f"{slurm.nodes} node(s) x {tasks_per_node(slurm)} task(s)"
    )
    first = next(iter(submission.jobs))
    array = "_" in submission.job_ids[first]  # a single point left to run is a plain job
    count, tasks = len(submission.jobs), len(set(submission.job_ids.values()))
    in_tasks = f" in {tasks} tasks (stacks)" if tasks < count else ""
    what = (
        f"array job {submission.job_id}: {count} points{in_tasks}"
        if array
        else f"job {submission.job_id}"
    )
    console.print(f"submitted Slurm {what} ({resources})", highlight=False)
    if plan.is_sweep:
        for name, job_id in submission.job_ids.items():
            console.print(f"  {job_id}  {directory / name}", highlight=False)
    else:
        console.print(f"run directory: {directory}", highlight=False)
    stdout, _ = submission.log_files(first)
    name = stdout.name.replace(submission.job_ids[first], f"{submission.job_id}_<i>")
    where = (
        f"{stdout.parent / name} (and .err; <i> = task index)" if array else f"{stdout} (and .err)"
    )
    console.print(f"logs: {where}", highlight=False)
    console.print(f"status: llama-train sweep-status {directory}", highlight=False)


def _statuses(directory: Path, check_queue: bool = True) -> list[PointStatus]:
    return sweep_status(directory, check_queue=check_queue)


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def status_table(statuses: list[PointStatus], title: str = "") -> Table:
    """One row per point: state, progress, test loss and excess loss (final when done)."""
    counts = ", ".join(f"{count} {state}" for state, count in state_counts(statuses).items())
    notes = [_note(status) for status in statuses]
    table = Table(
        title=f"{title}{len(statuses)} point(s): {counts}",
        title_justify="left",
        caption="nats/token; excess = test loss - exact entropy; * = not final",
        caption_justify="left",
    )
    longest = max((len(status.name) for status in statuses), default=5)
    table.add_column("point", overflow="fold", min_width=min(longest, 40))
    table.add_column("state")
    table.add_column("step", justify="right")
    table.add_column("test loss", justify="right")
    table.add_column("excess", justify="right")
    table.add_column("job")
    if any(notes):
        table.add_column("note", overflow="fold")
    for status, note in zip(statuses, notes, strict=True):
        latest = "" if status.state == "done" or status.excess is None else "*"
        step = "-" if status.step is None else str(status.step)
        style = _STATE_STYLES.get(status.state, "")
        cells = [
            status.name,
            f"[{style}]{status.state}[/]",
            f"{step}/{status.steps}" if status.steps else step,
            _number(status.test_loss),
            _number(status.excess) + latest,
            status.job_id or "-",
        ]
        table.add_row(*cells, *([note] if any(notes) else []))
    return table


_STATE_STYLES = {
    "done": "green",
    "failed": "red",
    "preempted": "yellow",
    "running": "cyan",
    "pending": "default",
}


def _note(status: PointStatus) -> str:
    requeued = f"requeued {status.restarts}x" if status.restarts else ""
    return "; ".join(part for part in (requeued, status.message) if part)


@app.command("sweep-status")
def sweep_status_command(
    directory: Annotated[Path, typer.Argument(help="Sweep directory (its run.dir) or a run.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the points as JSON.")] = False,
    queue: Annotated[
        bool,
        typer.Option("--queue/--no-queue", help="Ask squeue whether running jobs are still there."),
    ] = True,
) -> None:
    """Show every point of a sweep: state, step, test loss and excess loss over the entropy.

    States come from the run directories (job_state.json, summary.json,
    metrics.jsonl): pending, running, done, failed, preempted (checkpointed and
    requeued).
    """
    with user_errors():
        statuses = _statuses(directory, check_queue=queue)
    if as_json:
        console.print_json(json.dumps([status.to_dict() for status in statuses], default=str))
        return
    console.print(status_table(statuses, title=f"{directory}: "))


@app.command("best")
def best_command(
    directory: Annotated[Path, typer.Argument(help="Sweep directory (its run.dir).")],
    by: Annotated[
        str,
        typer.Option(
            help="Figure to compare: eval.<metric> (final evaluation, e.g. eval.excess, "
            "eval.loss) or a summary.json key (test_loss, excess_loss, tokens_per_s)."
        ),
    ] = "eval.excess",
    maximize: Annotated[
        bool, typer.Option("--max", help="The highest value wins (default: the lowest).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the ranking as JSON.")] = False,
) -> None:
    """Pick the winning point of a finished sweep (learning-rate cross-validation, say)."""
    with user_errors():
        ranking = rank_points(_statuses(directory), by, maximize=maximize)
    winner, value = ranking[0]
    overrides = [_override_text(key, item) for key, item in winner.overrides.items()]
    if as_json:
        console.print_json(
            json.dumps(
                {
                    "by": by,
                    "best": {**winner.to_dict(), "value": value},
                    "ranking": [
                        {"name": status.name, "value": figure} for status, figure in ranking
                    ],
                },
                default=str,
            )
        )
        return
    table = Table(title=f"points by {by} ({'highest' if maximize else 'lowest'} first)")
    table.add_column("rank", justify="right")
    table.add_column("point")
    table.add_column(by, justify="right")
    for rank, (status, figure) in enumerate(ranking, start=1):
        table.add_row(str(rank), status.name, f"{figure:.6g}")
    console.print(table)
    console.print(f"best by {by}: {winner.name} ({value:.6g})", highlight=False)
    console.print(f"run directory: {winner.run_dir}", highlight=False)
    console.print(f"overrides: {' '.join(overrides) or '(none)'}", highlight=False)


def _override_text(key: str, value: Any) -> str:
    """`key=value` as `llama-train run` takes it back (values as YAML/JSON scalars)."""
    text = value if isinstance(value, str) else json.dumps(value)
    return f"{key}={text}"
