"""`llama-train eval` and `plot`: measure a saved run against the exact entropy, draw it.

Thin commands over :func:`llama_train.recipe.evaluate_run.evaluate_run`,
:func:`llama_train.recipe.extrapolate.extrapolate_run` (`eval --rope-scaling`) and
:func:`llama_train.analysis.plot.plot`, imported inside the commands so
`llama-train --help` does not load torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from llama_train.cli.app import app, console, err_console, user_errors
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
    rope_scaling: Annotated[
        str | None,
        typer.Option(
            help="Evaluate beyond the training length on --data (longer sequences of the run's "
            "process, from `gssm-data extend`), rescaling the rotary frequencies with each "
            "method given: none, linear, ntk, yarn, llama3, a comma-separated list, or all. "
            "Prints the excess loss over the exact entropy by position range and plots it.",
        ),
    ] = None,
    factor: Annotated[
        float | None,
        typer.Option(
            help="With --rope-scaling: context stretch; default (L-1)/(T-1), the store's "
            "predicted positions over the trained ones."
        ),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            help="With --rope-scaling: the PNG to write; default <run>/extrapolation.png."
        ),
    ] = None,
) -> None:
    """Evaluate a checkpoint: test loss, exact entropy of the same sequences, excess loss.

    With --rope-scaling: excess loss by position on a longer store, once per scaling method.
    """
    from llama_train.recipe.evaluate_run import evaluate_run
    from llama_train.recipe.extrapolate import check_context

    if rope_scaling is not None or factor is not None or plot is not None:
        _extrapolate(
            run_dir,
            data,
            rope_scaling,
            factor,
            plot,
            checkpoint,
            split,
            max_sequences,
            device,
            as_json,
        )
        return
    with user_errors():
        if device not in ("auto", "cpu", "cuda"):
            raise LlamaTrainError(f"--device {device!r}: choose auto, cpu or cuda")
        if data is not None:
            check_context(run_dir, data)
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


def _extrapolate(
    run_dir: Path,
    data: Path | None,
    rope_scaling: str | None,
    factor: float | None,
    plot: Path | None,
    checkpoint: int | None,
    split: str | None,
    max_sequences: int | None,
    device: str,
    as_json: bool,
) -> None:
    """`eval --rope-scaling`: a table of excess loss by position range, the plot, or JSON."""
    from llama_train.recipe.extrapolate import (
        PLOT_FILE,
        extrapolate_run,
        parse_methods,
        plot_extrapolation,
    )

    with user_errors():
        if rope_scaling is None:
            raise LlamaTrainError("--factor and --plot go with --rope-scaling METHOD")
        if data is None:
            raise LlamaTrainError(
                "--rope-scaling needs --data: a store of longer sequences of the run's process "
                "(gssm-data extend STORE --seq-len L)"
            )
        if device not in ("auto", "cpu", "cuda"):
            raise LlamaTrainError(f"--device {device!r}: choose auto, cpu or cuda")
        result = extrapolate_run(
            run_dir,
            data,
            parse_methods(rope_scaling),
            factor=factor,
            checkpoint=checkpoint,
            split=split or "test",
            max_sequences=max_sequences,
            device=device,
            log=lambda line: err_console.print(line, highlight=False, soft_wrap=True),
        )
        path = plot_extrapolation(result, plot or run_dir / PLOT_FILE)
    if as_json:
        console.print_json(json.dumps(result.to_dict() | {"plot": str(path)}))
        return
    table = Table(
        title=f"step {result.step}: excess loss by position, nats/token ({result.n_sequences} "
        f"sequences of {result.seq_len} tokens; trained on {result.train_seq_len})",
        title_justify="left",
        caption=f"excess = model loss - {result.entropy_method} entropy, mean over the "
        "sequences and positions of each range; bits = nats / ln 2",
        caption_justify="left",
    )
    table.add_column("positions")
    for curve in result.curves:
        name = curve.method if curve.method == "none" else f"{curve.method} x{curve.factor:g}"
        table.add_column(name, justify="right")
    columns = [result.excess_by_range(curve) for curve in result.curves]
    for row, (first, last) in enumerate(result.ranges()):
        trained = " (trained)" if last <= result.trained_positions else ""
        table.add_row(f"{first}-{last}{trained}", *(f"{values[row]:.4f}" for values in columns))
    console.print(table)
    console.print(f"wrote {path}", highlight=False)


@app.command("plot")
def plot_command(
    paths: Annotated[
        list[Path],
        typer.Argument(help="Run directories, or folders holding them (a sweep directory)."),
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="Image file; default loss.png in the first directory given."),
    ] = None,
    x: Annotated[str, typer.Option("--x", help="Horizontal axis: tokens or steps.")] = "tokens",
) -> None:
    """Plot loss and excess loss against tokens, and the excess loss by position.

    Several runs (or every run of a sweep) are overlaid. Nats on the left,
    bits on the right; the exact entropy of the evaluation set is the floor.
    """
    from llama_train.analysis.plot import plot

    with user_errors():
        path = plot(list(paths), out, x=x)
    console.print(f"wrote {path}", highlight=False)
