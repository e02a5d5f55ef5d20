"""`llama-train eval` and `plot`: measure a saved run against the exact entropy, draw it.

Thin commands over :func:`llama_train.eval.evaluate_run` and
:func:`llama_train.plot.plot_run`, imported inside the commands so
`llama-train --help` does not load torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from llama_train.cli.app import app, console, user_errors
from llama_train.cli.tables import entropy_label, figures_row, figures_table
from llama_train.errors import LlamaTrainError


@app.command("eval")
def eval_command(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (run.dir of a training run).")],
    checkpoint: Annotated[
        int | None, typer.Option(help="Step of the checkpoint to evaluate; default the latest.")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="Another store to evaluate on (same vocabulary); default the run's."),
    ] = None,
    split: Annotated[str | None, typer.Option(help="Split; default the run's eval.split.")] = None,
    max_sequences: Annotated[
        int | None, typer.Option(help="First sequences of the split; default the run's setting.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the full result (curves too) as JSON.")
    ] = False,
) -> None:
    """Evaluate a checkpoint: test loss, exact entropy of the same sequences, excess loss."""
    from llama_train.eval import evaluate_run

    with user_errors():
        if device not in ("auto", "cpu", "cuda"):
            raise LlamaTrainError(f"--device {device!r}: choose auto, cpu or cuda")
        result = evaluate_run(
            run_dir,
            checkpoint=checkpoint,
            data=data,
            split=split,
            max_sequences=max_sequences,
            device=device,
        )
    if as_json:
        console.print_json(json.dumps(result.to_dict()))
        return
    console.print(
        figures_table(
            f"step {result.step}, {result.n_sequences} {result.split} sequences",
            [
                figures_row("loss", result.loss),
                figures_row(entropy_label(result.entropy_method), result.entropy),
                figures_row("excess loss", result.excess),
            ],
            caption=f"entropy: {result.entropy_method}",
        )
    )


@app.command("plot")
def plot_command(
    run_dir: Annotated[Path, typer.Argument(help="Run directory.")],
    out: Annotated[
        Path | None, typer.Option(help="Image file; default <run dir>/loss.png.")
    ] = None,
) -> None:
    """Plot training and test loss against the exact entropy, and the per-position curves."""
    from llama_train.plot import plot_run

    with user_errors():
        path = plot_run(run_dir, out)
    console.print(f"wrote {path}", highlight=False)
