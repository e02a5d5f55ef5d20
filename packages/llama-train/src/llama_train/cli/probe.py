"""`llama-train probe`: linear probes of a run's hidden states against the Bayes filter.

A thin command over `llama_train.recipe.probe.probe_run`: a table per latent node on
stdout (or the report as JSON), progress on stderr, user errors one line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from gssm_data.common.progress import progress_display, progress_mode
from llama_train.cli.app import app, console, user_errors
from llama_train.errors import LlamaTrainError

# Off a terminal, a progress line at most this often (seconds).


@app.command("probe")
def probe_command(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (run.dir of a training run).")],
    checkpoint: Annotated[
        int | None, typer.Option(help="Step of the checkpoint to probe; default the latest.")
    ] = None,
    layers: Annotated[
        str,
        typer.Option(
            help="Residual streams to probe: `all`, or indices such as 0,2 (0 = token "
            "embeddings, i = output of block i, n_layers+1 = final norm). The selected "
            "streams are also probed concatenated."
        ),
    ] = "all",
    node: Annotated[
        list[str] | None,
        typer.Option(help="Latent node to probe for (repeat for several); default every one."),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="Store written --with-latents; default the run's own store."),
    ] = None,
    split: Annotated[str, typer.Option(help="Split whose sequences are probed.")] = "test",
    sequences: Annotated[
        int,
        typer.Option(
            help="First N sequences of the split; a quarter are held out for scoring, the "
            "rest fit the probes (penalty by cross-validation over sequence folds)."
        ),
    ] = 256,
    positions: Annotated[
        int,
        typer.Option(
            help="N evenly spaced positions per sequence (0: every position); never more "
            "than fit in 1 GiB of hidden states."
        ),
    ] = 32,
    folds: Annotated[int, typer.Option(help="Cross-validation folds (of sequences).")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the sequence split and shuffles.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[
        int | None,
        typer.Option(
            help="CPU threads of the forward passes and fits; default the run's "
            "train.threads, else the idle CPUs (as training chooses)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress.")] = False,
) -> None:
    """Linear probes of every layer for the latent state, against the exact Bayes filter.

    Per latent node and layer: a classifier of the true state (accuracy,
    cross-entropy) and a regression onto the exact posterior p(z_t | x_<=t)
    (R², KL), next to the Bayes filter's own accuracy (the ceiling), a
    position-only baseline, shuffled labels and the untrained (step-0) model.
    Needs a store written --with-latents. Saves the report and a plot under
    <run dir>/probe/. Before the fits start, a line on stderr gives the threads and
    how long they will take at the current load.
    """
    from llama_train.recipe.probe import ProbeOptions, probe_run, strict_json

    with user_errors():
        if device not in ("auto", "cpu", "cuda"):
            raise LlamaTrainError(f"--device {device!r}: choose auto, cpu or cuda")
        options = ProbeOptions(
            checkpoint=checkpoint,
            layers=layers,
            nodes=node,
            data=data,
            split=split,
            sequences=sequences,
            positions=positions or None,
            folds=folds,
            seed=seed,
            device=device,
            threads=threads,
        )
        with _progress(quiet) as on_progress:
            report = probe_run(run_dir, options, progress=on_progress, announce=on_progress.say)
    if as_json:
        sys.stdout.write(json.dumps(strict_json(report), indent=2) + "\n")
        return
    for name, entry in report["nodes"].items():
        console.print(probe_table(report, name, entry))
    console.print(f"report: {report['report']}\nplot: {report['plot']}", highlight=False)


class _progress:
    """Probes done: a bar on a terminal, a line every GSSM_PROGRESS_EVERY s in a log."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.err = Console(stderr=True)
        self.bar = progress_display(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.err,
            mode=progress_mode(quiet),
            transient=True,
        )
        self.task: Any = None

    def __enter__(self) -> Any:
        self.bar.start()
        self.task = self.bar.add_task("probing", total=None)
        return self

    def say(self, line: str) -> None:
        """A start-up line (threads, expected time), above the bar on a terminal."""
        if not self.quiet:
            self.err.print(line, highlight=False, soft_wrap=True)

    def __call__(self, done: int, total: int, what: str) -> None:
        self.bar.update(self.task, completed=done, total=total, description=what)

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()


def probe_table(report: dict[str, Any], name: str, entry: dict[str, Any]) -> Table:
    """One node: every layer's probe scores, then the ceiling and floor; fits 80 columns."""
    table = Table(
        title=f"{name} ({entry['states']} states), step {report['step']}: linear probes, "
        f"{report['test_sequences']} held-out {report['split']} sequences x "
        f"{report['positions']} positions",
        title_justify="left",
        caption="acc, CE: classifier of the true state; R², KL: regression onto the exact "
        "belief p(z_t | x_<=t); nats. untrained: step-0 weights (same seed); shuffled: "
        "fitted to other sequences' targets. all layers: every stream concatenated. Bayes "
        "filter: argmax and -log of the exact posterior (the ceiling); position only: the "
        "majority state, state frequencies and mean belief at each position (the floor).",
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("layer", no_wrap=True)
    for column in ("acc", "CE", "R²", "KL", "acc\nuntr.", "R²\nuntr.", "acc\nshuf.", "R²\nshuf."):
        table.add_column(column, justify="right", no_wrap=True, min_width=5)
    for layer in entry["layers"]:
        trained, untrained = layer["trained"], layer["untrained"]
        table.add_row(
            layer["layer"].removesuffix(" (concatenated)"),
            _number(trained["accuracy"]),
            _number(trained["cross_entropy"]),
            _number(trained["r2"]),
            _number(trained["kl"]),
            _number(untrained["accuracy"]),
            _number(untrained["r2"]),
            _number(trained["shuffled_accuracy"]),
            _number(trained["shuffled_r2"]),
        )
    bayes, position = entry["bayes"], entry["position_baseline"]
    table.add_section()
    table.add_row(
        "Bayes filter",
        _number(bayes["accuracy"]),
        _number(bayes["cross_entropy"]),
        "1",
        "0",
    )
    table.add_row(
        "position only",
        _number(position["accuracy"]),
        _number(position["cross_entropy"]),
        _number(position["r2"]),
        _number(position["kl"]),
    )
    return table


def _number(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.3f}"
