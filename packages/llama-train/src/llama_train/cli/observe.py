"""`llama-train wandb-sync` and `report`: mirrors and views of finished (or running) runs.

Registered on the `llama-train` app by importing this module (`llama_train.cli` does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llama_train.cli.app import app, console, user_errors
from llama_train.errors import LlamaTrainError


@app.command("wandb-sync")
def wandb_sync_command(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(help="Run directories, or folders holding them (a sweep directory)."),
    ],
    mode: Annotated[
        str, typer.Option(help="offline (files under WANDB_DIR, `wandb sync` later) or online.")
    ] = "offline",
    project: Annotated[
        str | None,
        typer.Option(
            help="wandb project; default the run's logging.wandb.project, or llama-train."
        ),
    ] = None,
    entity: Annotated[str | None, typer.Option(help="wandb entity (team or user).")] = None,
) -> None:
    """Replay run directories into wandb: metrics, evaluations, profile, summary, config.

    One wandb run per run directory, with an id fixed by the directory (or the
    id it logged live with), so a second sync resumes it and sends only the
    steps it has not sent. A sweep point is named by its overrides and grouped
    by its sweep.
    """
    from llama_train.analysis.runs import find_runs
    from llama_train.analysis.wandb_sync import sync_run

    with user_errors():
        if mode not in ("offline", "online"):
            raise LlamaTrainError(f"--mode {mode!r}: choose offline or online")
        for run_dir in find_runs(list(run_dirs)):
            result = sync_run(run_dir, mode=mode, project=project, entity=entity)  # type: ignore[arg-type]
            last = "-" if result.last_step is None else result.last_step
            console.print(
                f"{run_dir}: wandb run {result.run_id} ({result.name}): "
                f"{result.steps_sent} new steps (last step {last}), {result.files} files",
                highlight=False,
                soft_wrap=True,
            )


@app.command("report")
def report_command(
    paths: Annotated[
        list[Path],
        typer.Argument(help="Run directories, or folders holding them (a sweep directory)."),
    ],
    html: Annotated[Path, typer.Option("--html", help="The HTML file to write.")],
    x: Annotated[str, typer.Option("--x", help="Horizontal axis: tokens or steps.")] = "tokens",
) -> None:
    """Write an interactive report (one self-contained HTML file, plotly.js inlined).

    The figures of `llama-train plot` with every run toggled from the legend,
    hover in nats and bits, and a table of each run's final figures. Given a study
    directory, the run that won each point's lr sweep is marked in an "lr sweep" column,
    and one whose optimum is on the sweep's edge gets "[lr edge: low|high]" in the legend.
    """
    from llama_train.analysis.html_report import write_report

    with user_errors():
        if x not in ("tokens", "steps"):
            raise LlamaTrainError(f"--x {x!r}: choose tokens or steps")
        path = write_report(list(paths), html, x=x)
    console.print(f"wrote {path}", highlight=False)
