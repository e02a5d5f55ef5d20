"""Command-line interface (`llama-train`, also `python -m llama_train`).

Thin commands over plain functions (`config.resolve_config`, `train.train`,
`evaluate.evaluate_run`, `metrics.plot_run`). User errors of either package
(a bad config, a missing store, a NaN loss) print one `error:` block (one line
per problem) on stderr and exit 1; never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gssm_data.errors import GssmDataError
from llama_train.errors import LlamaTrainError

if TYPE_CHECKING:
    from llama_train.config import TrainConfig

app = typer.Typer(
    name="llama-train",
    help="Train Llama-style models on gssm-data stores and measure them against the exact entropy.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the packages' user errors into a short message and exit code 1."""
    try:
        yield
    except (LlamaTrainError, GssmDataError) as error:
        # Another rank failed first and printed its own error (distributed.OtherRankFailed).
        if not getattr(error, "reported_elsewhere", False):
            err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print("interrupted; run the same command again to resume", highlight=False)
        raise typer.Exit(130) from None


def _table(title: str, rows: list[tuple[str, str, str]], caption: str = "") -> Table:
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    table.add_column("")
    table.add_column("nats/token", justify="right")
    table.add_column("bits/token", justify="right")
    for row in rows:
        table.add_row(*row)
    return table


def _figures(name: str, nats: float) -> tuple[str, str, str]:
    from llama_train.evaluate import LN2

    return name, f"{nats:.4f}", f"{nats / LN2:.4f}"


def _entropy_label(method: str) -> str:
    """Row name of the floor: exact, or a known-kernel lower bound for `transition` graphs."""
    return "exact entropy" if method.startswith("exact") else "known-kernel entropy (bound)"


def summary_table(summary: dict[str, Any]) -> Table:
    """The end-of-run table: test loss, exact entropy, excess loss and the data's baselines."""
    from llama_train.evaluate import LN2

    rows = [
        _figures("test loss", summary["test_loss"]),
        _figures(_entropy_label(summary["entropy_method"]), summary["test_entropy"]),
        _figures("excess loss", summary["excess_loss"]),
    ]
    baselines = summary.get("baselines") or {}
    for key, label in (
        ("unigram_bits", "unigram baseline"),
        ("zstd_bits", "zstd baseline"),
        ("gzip_bits", "gzip baseline"),
    ):
        if key in baselines:
            rows.append(_figures(label, baselines[key] * LN2))
    return _table(
        f"step {summary['step']}, {summary['eval_sequences']} {summary['eval_split']} sequences",
        rows,
        caption=f"entropy: {summary['entropy_method']}",
    )


@app.command("run")
def run_command(
    config: Annotated[Path, typer.Argument(help="Training config (YAML).")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="key.sub=value overrides, e.g. optim.lr=3e-4 model.n_layers=2."),
    ] = None,
    nproc: Annotated[
        int | None,
        typer.Option(
            "--nproc",
            min=1,
            help="Start N processes on this machine through torchrun (standalone rendezvous): "
            "one per GPU, or N one-thread CPU processes. Global batch = data.batch_size x "
            "train.grad_accum x N. Leave it out under torchrun or srun.",
        ),
    ] = None,
) -> None:
    """Train (or resume: the same command again continues from the latest checkpoint).

    Precedence: defaults < CONFIG < overrides. The run directory (run.dir)
    receives config.yaml, metrics.jsonl, checkpoints/, eval/ and summary.json.
    On SIGUSR1 or SIGTERM the run checkpoints at the next step, says where,
    and exits with code 3; the same command resumes it. Works unchanged as
    every rank of `torchrun -m llama_train run ...`.
    """
    from llama_train.config import resolve_config
    from llama_train.distributed import rank_info

    if nproc is not None and nproc > 1:
        _launch(nproc, config, overrides or [])
    from llama_train.train import PREEMPTED_EXIT_CODE, Preempted, train

    with user_errors():
        is_main = rank_info().is_main
        resolved = _refuse_sweep(resolve_config(config, overrides or []))
        try:
            summary = train(resolved)
        except Preempted as preempted:
            if is_main:
                err_console.print(str(preempted), highlight=False, soft_wrap=True)
            raise typer.Exit(PREEMPTED_EXIT_CODE) from None
    if is_main:
        console.print(summary_table(summary))
        console.print(f"run directory: {resolved.run_dir}", highlight=False)


def _refuse_sweep(config: TrainConfig) -> TrainConfig:
    """`run` trains one config: a grid would silently train only its base point."""
    if config.sweep:
        keys = ", ".join(sorted(config.sweep))
        raise LlamaTrainError(
            f"this config has a sweep over {keys}: `llama-train submit CONFIG` runs every point "
            "(add --local to run them here); `run` trains a single configuration"
        )
    return config


def _launch(nproc: int, config: Path, overrides: list[str]) -> None:
    """`run --nproc N`: check the config once here, then start N ranks; exit with their code."""
    from llama_train.config import resolve_config
    from llama_train.distributed import launch_torchrun, rank_info

    with user_errors():
        if rank_info().distributed:
            raise LlamaTrainError(
                "--nproc starts torchrun itself; this process is already one rank of a "
                "launched job, so leave --nproc out"
            )
        _refuse_sweep(resolve_config(config, overrides))  # fails once, not in every rank
        code = launch_torchrun(nproc, ["run", str(config), *overrides])
    raise typer.Exit(code)


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
    from llama_train.evaluate import evaluate_run

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
        _table(
            f"step {result.step}, {result.n_sequences} {result.split} sequences",
            [
                _figures("loss", result.loss),
                _figures(_entropy_label(result.entropy_method), result.entropy),
                _figures("excess loss", result.excess),
            ],
            caption=f"entropy: {result.entropy_method}",
        )
    )


@app.command("config-schema")
def config_schema_command() -> None:
    """Print the JSON schema of the training config (every section, key and default)."""
    from llama_train.config import config_schema

    sys.stdout.write(json.dumps(config_schema(), indent=2) + "\n")


@app.command("plot")
def plot_command(
    run_dir: Annotated[Path, typer.Argument(help="Run directory.")],
    out: Annotated[
        Path | None, typer.Option(help="Image file; default <run dir>/loss.png.")
    ] = None,
) -> None:
    """Plot training and test loss against the exact entropy, and the per-position curves."""
    from llama_train.metrics import plot_run

    with user_errors():
        path = plot_run(run_dir, out)
    console.print(f"wrote {path}", highlight=False)


def main() -> None:
    """Console-script entry point."""
    app()


# Issue 5, helper "slurm": `submit`, `sweep-status` and `best` register themselves on `app`.
from llama_train import cli_slurm  # noqa: E402, F401
