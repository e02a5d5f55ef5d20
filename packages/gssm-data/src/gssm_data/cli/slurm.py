"""`gssm-data submit` and `submit-scaling`: stores written by Slurm array tasks.

Thin commands over :mod:`gssm_data.slurm` (submitit, the `slurm` extra).
`submit` takes the options of `gssm-data generate` that decide the store (not
--workers, --shard or --force: each task gets --cpus-per-task writers and its
own shard) plus the array's size and resources; stdout carries the job id and
the store's path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gssm_data.cli.app import app, fail, say
from gssm_data.cli.options import (
    GraphOption,
    ModeOption,
    NOption,
    NTestOption,
    OutOption,
    PresetOption,
    RegimesFromOption,
    RegimesOption,
    SeedOption,
    SeqLenOption,
    TargetBitsOption,
    TargetOption,
    WithLatentsOption,
    store_options,
)
from gssm_data.errors import GssmDataError
from gssm_data.slurm import SlurmSettings, SubmittedStore, submit_generate, submit_scaling

TasksOption = Annotated[int, typer.Option(help="Array tasks sharing the store (--shard k/N).")]
PartitionOption = Annotated[
    str | None, typer.Option(help="Slurm partition; default the cluster's.")
]
TimeOption = Annotated[
    str | None,
    typer.Option(
        help="Time limit per task: 90, 1:30:00 or 2-00:00:00 (a task reaching it is requeued "
        "and resumes); default the cluster's."
    ),
]
CpusOption = Annotated[int, typer.Option(help="CPUs per task, also its writer processes.")]
MemOption = Annotated[str | None, typer.Option(help="Memory per task's node, e.g. 8G.")]
AccountOption = Annotated[str | None, typer.Option(help="Slurm account.")]


# `submit` has no --quiet: its messages (calibration, logs) always go to stderr.
_say = say(quiet=False)


@app.command("submit")
def submit_command(
    tasks: TasksOption = 4,
    preset: PresetOption = None,
    graph: GraphOption = None,
    mode: ModeOption = None,
    n: NOption = "100_000",
    n_test: NTestOption = "10_000",
    seq_len: SeqLenOption = "257",
    seed: SeedOption = 0,
    out: OutOption = None,
    with_latents: WithLatentsOption = False,
    target_bits: TargetBitsOption = None,
    target: TargetOption = "latent",
    partition: PartitionOption = None,
    time: TimeOption = None,
    cpus_per_task: CpusOption = 1,
    mem: MemOption = None,
    account: AccountOption = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Return when every task has ended (asks squeue).")
    ] = False,
) -> None:
    """Write one store with a Slurm array of --tasks tasks; print the job id and the path.

    Same options, same bytes as `gssm-data generate`. Submitting again after a
    failed task finishes the store (written blocks are kept); a complete store
    is left alone.
    """
    try:
        # Alpha is calibrated once, here; every task then writes the same graph.
        options = store_options(
            preset=preset,
            graph=graph,
            mode=mode,
            n=n,
            n_test=n_test,
            seq_len=seq_len,
            seed=seed,
            out=out,
            with_latents=with_latents,
            target_bits=target_bits,
            target=target,
            workers=cpus_per_task,
            log=_say,
        )
        settings = SlurmSettings(
            partition=partition, time=time, cpus_per_task=cpus_per_task, mem=mem, account=account
        )
        submitted = submit_generate(options, tasks=tasks, settings=settings, wait=wait, log=_say)
        if wait and submitted.job_id is not None:
            _check_published(submitted)
    except GssmDataError as error:
        raise fail(str(error)) from None
    _print(submitted)


def _check_published(submitted: SubmittedStore) -> None:
    if not submitted.path.exists():
        raise GssmDataError(
            f"job {submitted.job_id} ended but {submitted.path} is not published; see the logs "
            f"in {submitted.job_dir}, then submit again to finish it"
        )


def _print(submitted: SubmittedStore) -> None:
    if submitted.job_id is None:
        typer.echo(f"complete: {submitted.path.absolute()}")
        return
    typer.echo(f"job {submitted.job_id} ({submitted.tasks} tasks): {submitted.path.absolute()}")
    _say(f"logs: {submitted.log_pattern} (* = task; .err beside each)")


@app.command("submit-scaling")
def submit_scaling_command(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (e.g. datasets/scaling.yaml).")],
    scale: Annotated[str, typer.Option(help="Which grid of the recipe: small or full.")] = "small",
    out_dir: Annotated[Path, typer.Option(help="Stores go to <out-dir>/<recipe name>/.")] = Path(
        "datasets"
    ),
    tasks: TasksOption = 4,
    partition: PartitionOption = None,
    time: TimeOption = None,
    cpus_per_task: CpusOption = 1,
    mem: MemOption = None,
    account: AccountOption = None,
    regimes: RegimesOption = None,
    regimes_from: RegimesFromOption = None,
) -> None:
    """`gssm-data scaling` on Slurm: one array per regime, then a job writing the index.

    Alphas are calibrated here (and recorded, as `gssm-data scaling` does); the
    index job runs after every array succeeds. Submitting again resumes.
    """
    try:
        settings = SlurmSettings(
            partition=partition, time=time, cpus_per_task=cpus_per_task, mem=mem, account=account
        )
        from gssm_data.scaling import regime_names

        submitted = submit_scaling(
            recipe,
            scale=scale,
            out_dir=out_dir,
            tasks=tasks,
            settings=settings,
            log=_say,
            regimes=regime_names(regimes, regimes_from),
        )
    except GssmDataError as error:
        raise fail(str(error)) from None
    for store in submitted.stores:
        _print(store)
    typer.echo(f"index job {submitted.index_job_id}: {out_dir / recipe.stem}/index-{scale}.json")
