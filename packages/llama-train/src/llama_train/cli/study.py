"""`llama-train study run|status|collect|plot` and `llama-train fit`: scaling laws.

Importing this module registers the commands on the `llama-train` app. The study
commands drive :mod:`llama_train.launch.study`; `fit` and the tables use the
torch-free :mod:`llama_train.scaling` package, so `fit` works on any CSV, anywhere.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from llama_train.cli.app import app, console, err_console, user_errors
from llama_train.errors import LlamaTrainError

if TYPE_CHECKING:
    from llama_train.scaling.fit import Fit

study_app = typer.Typer(
    help="Scaling studies: a grid of regimes x model sizes x data sizes x learning rates.",
    no_args_is_help=True,
)
app.add_typer(study_app, name="study")


def _say(message: str) -> None:
    err_console.print(message, highlight=False, soft_wrap=True)


def _print_table(table: Table) -> None:
    """Tables at their natural width off a terminal (logs, files): rich would squeeze
    them into 80 columns and cut the names."""
    (console if console.is_terminal else Console(width=160)).print(table)


@study_app.command("run")
def study_run_command(
    study: Annotated[
        Path, typer.Argument(help="Study file (YAML), e.g. configs/studies/small.yaml.")
    ],
    slurm: Annotated[
        bool, typer.Option("--slurm", help="Send the points to Slurm as one array job.")
    ] = False,
    local: Annotated[
        bool, typer.Option("--local", help="Train here (the default without --slurm).")
    ] = False,
    parallel: Annotated[
        int,
        typer.Option(
            "--parallel", "-j", min=1, help="Points trained at once here, one thread each."
        ),
    ] = 1,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Expand and validate; list the points; train nothing.")
    ] = False,
    no_stack: Annotated[
        bool,
        typer.Option(
            "--no-stack",
            help="One point per process. By default, points that differ only in lr or seed "
            "train together as one stack in one process (the same results).",
        ),
    ] = False,
) -> None:
    """Train every point of a study that is not done yet (the same command resumes).

    Each point (regime x model x n_train x lr x seed) gets its own run directory under
    the study directory; after training it scores its final checkpoint on the
    held-out validation slice (validation.json), which `study collect` uses to keep
    the best learning rate. Without --slurm, points run here, --parallel at a time;
    points that share regime, model and data train as one stack (--no-stack: alone).
    """
    from llama_train.launch.study import plan_study, run_local, slurm_ranks, submit_slurm

    with user_errors():
        if slurm and local:
            raise LlamaTrainError("choose --slurm or --local, not both")
        expanded = plan_study(study)
        if slurm:
            ranks = slurm_ranks(expanded.plan.base)
            if ranks != 1:
                expanded = plan_study(study, ranks=ranks)
        if dry_run:
            _print_plan(expanded)
            return
        if slurm:
            submission = submit_slurm(expanded, log=_say, stack=not no_stack)
            if not submission.jobs:
                console.print(
                    f"nothing to submit in {expanded.directory}: every point is done or queued"
                )
            else:
                tasks = len({id(job) for job in submission.jobs.values()})
                console.print(
                    f"submitted Slurm array job {submission.job_id}: {len(submission.jobs)} "
                    f"points in {tasks} tasks",
                    highlight=False,
                )
            console.print(f"status: llama-train study status {expanded.directory}", highlight=False)
            return
        report = run_local(expanded, parallel=parallel, log=_say, stack=not no_stack)
    console.print(
        f"{expanded.directory}: {len(report.trained)} trained, {report.skipped} already done, "
        f"{len(report.failed)} failed, in {report.seconds:.0f} s",
        highlight=False,
    )
    console.print(f"next: llama-train study collect {expanded.directory}", highlight=False)
    if report.failed:
        raise typer.Exit(1)


def _print_plan(expanded: Any) -> None:
    table = Table(
        title=f"{expanded.directory}: {len(expanded.points)} point(s)", title_justify="left"
    )
    for column in ("point", "regime", "model", "n_train", "lr", "seed", "steps"):
        table.add_column(
            column, justify="left" if column in ("point", "regime", "model") else "right"
        )
    for point in expanded.points:
        table.add_row(
            point.name,
            point.regime,
            point.model,
            str(point.n_train),
            f"{point.lr:g}",
            str(point.seed),
            str(point.steps),
        )
    _print_table(table)


@study_app.command("status")
def study_status_command(
    directory: Annotated[Path, typer.Argument(help="Study directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the points as JSON.")] = False,
) -> None:
    """Every point: state, step, test loss, excess (--json adds the validation loss, the lr
    criterion)."""
    from llama_train.cli.submit import status_table
    from llama_train.launch.status import sweep_status
    from llama_train.launch.study import read_study_record, read_validation

    with user_errors():
        read_study_record(directory)
        statuses = sweep_status(directory)
    if as_json:
        points = []
        for status in statuses:
            validation = read_validation(status.run_dir)
            points.append({**status.to_dict(), "val_loss": (validation or {}).get("loss")})
        console.print_json(json.dumps(points, default=str))
        return
    _print_table(status_table(statuses, title=f"{directory}: "))


@study_app.command("collect")
def study_collect_command(
    directory: Annotated[Path, typer.Argument(help="Study directory.")],
    out: Annotated[
        Path | None, typer.Option(help="CSV to write; default <study dir>/points.csv.")
    ] = None,
    every_lr: Annotated[
        bool, typer.Option("--every-lr", help="One row per run, not only the best lr per point.")
    ] = False,
) -> None:
    """Write the study's table: one row per finished point, its best learning rate.

    Columns: regime, model, N (non-embedding parameters), N_total, D (unique training
    tokens), n_train, tokens (seen), epochs, flops_6nd, flops_attention, flops, lr,
    seed, steps, val_loss, loss, entropy, excess (nats) and *_bits. Points without a
    validation.json are validated first (that needs their checkpoints).
    """
    from llama_train.launch.study import ensure_validation
    from llama_train.scaling.points import collect, write_csv

    with user_errors():
        ensure_validation(directory, log=_say)
        rows = collect(directory, every_lr=every_lr)
        if not rows:
            raise LlamaTrainError(f"{directory}: no finished point yet (llama-train study status)")
        path = write_csv(rows, out or Path(directory) / "points.csv")
    _print_table(_points_table(rows))
    console.print(f"wrote {path} ({len(rows)} rows)", highlight=False)


def _points_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(caption="nats/token; excess = test loss - exact entropy", caption_justify="left")
    for column in ("regime", "model", "N", "D", "epochs", "lr", "val loss", "test loss", "excess"):
        table.add_column(column, justify="left" if column in ("regime", "model") else "right")
    for row in rows:
        table.add_row(
            row["regime"],
            row["model"],
            f"{row['N']:,}",
            f"{row['D']:,}",
            f"{row['epochs']:.2f}",
            f"{row['lr']:g}",
            f"{row['val_loss']:.4f}",
            f"{row['loss']:.4f}",
            f"{row['excess']:.4f}",
        )
    return table


@study_app.command("plot")
def study_plot_command(
    directory: Annotated[Path, typer.Argument(help="Study directory.")],
    out_dir: Annotated[
        Path | None, typer.Option(help="Folder for the PNGs; default <study dir>/plots.")
    ] = None,
    bootstrap: Annotated[int, typer.Option(min=0, help="Bootstrap resamples per fit.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
) -> None:
    """Fit every regime (E free, E = exact entropy, excess) and draw the figures.

    Per regime: loss against N (one curve per D) and against D (one per N), loss
    against compute with the frontier, each with the fitted law and the exact-entropy
    floor; excess loss on log-log axes; residuals. Also the data-constrained view
    (test loss against epochs over the same unique data). Writes fits.json beside.
    """
    from llama_train.launch.study import ensure_validation
    from llama_train.scaling.plots import plot_study
    from llama_train.scaling.points import collect
    from llama_train.scaling.report import fit_regimes

    with user_errors():
        ensure_validation(directory, log=_say)
        rows = collect(directory)
        if not rows:
            raise LlamaTrainError(f"{directory}: no finished point yet (llama-train study status)")
        fits = fit_regimes(rows, bootstrap=bootstrap, seed=seed, log=_say)
        target = out_dir or Path(directory) / "plots"
        paths = plot_study(directory, fits, target)
        fits_path = target / "fits.json"
        fits_path.write_text(json.dumps([fit.to_dict() for fit in fits], indent=1) + "\n")
    for regime in fits:
        _print_table(_fits_table(regime))
    for path in [*paths, fits_path]:
        console.print(f"wrote {path}", highlight=False)


def _fits_table(regime: Any) -> Table:
    from llama_train.scaling.points import LN2

    table = Table(
        title=f"{regime.regime}: {len(regime.rows)} points, exact entropy {regime.entropy:.4f} "
        f"nats ({regime.entropy / LN2:.4f} bits)",
        title_justify="left",
        caption=f"{regime.free.level:.0%} bootstrap intervals ({regime.free.bootstrap} resamples); "
        "(bound): the fit ended on the edge of its search box (exponents <= 4, log A/B in "
        "[-20, 60], log E >= -20): the data do not determine that parameter",
        caption_justify="left",
    )
    table.add_column("fit")
    for name in ("E", "A", "alpha", "B", "beta", "a = beta/(alpha+beta)"):
        table.add_column(name, justify="right")
    for label, fit in (
        ("E free", regime.free),
        ("E = exact", regime.exact),
        ("excess", regime.excess),
    ):
        optimal = fit.to_dict().get("compute_optimal")
        table.add_row(
            label,
            *(_with_interval(fit, name) for name in ("E", "A", "alpha", "B", "beta")),
            "-" if optimal is None else _interval_text(optimal["a"], optimal["a_interval"]),
        )
    return table


def _with_interval(fit: Fit, name: str) -> str:
    value = fit.parameters[name]
    if value is None:
        return "-"
    bound = " (bound)" if name in fit.at_bound else ""
    return _interval_text(value, fit.intervals.get(name)) + bound


def _interval_text(value: float, interval: list[float] | None) -> str:
    text = f"{value:.4g}"
    if interval is not None:
        text += f" [{interval[0]:.3g}, {interval[1]:.3g}]"
    return text


# ---------------------------------------------------------------------------
# fit


@app.command("fit")
def fit_command(
    points: Annotated[Path, typer.Argument(help="CSV with one row per run (any table).")],
    form: Annotated[
        str, typer.Option(help="ND: E + A/N^alpha + B/D^beta; N: E + A/N^alpha; D: E + B/D^beta.")
    ] = "ND",
    fix_e: Annotated[
        str | None,
        typer.Option(
            "--fix-E",
            help="Fix E to a number, or 'exact': the entropy column (one value: the exact "
            "entropy of the test sequences). Default: E is fitted.",
        ),
    ] = None,
    excess: Annotated[
        bool,
        typer.Option("--excess", help="Fit loss - entropy as a pure power law (no E term)."),
    ] = False,
    bootstrap: Annotated[
        int, typer.Option(min=0, help="Bootstrap resamples of the rows (intervals); 0 = none.")
    ] = 100,
    level: Annotated[float, typer.Option(help="Confidence level of the intervals.")] = 0.95,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    n_col: Annotated[str, typer.Option("--n-col", help="Column of N (parameters).")] = "N",
    d_col: Annotated[str, typer.Option("--d-col", help="Column of D (tokens).")] = "D",
    loss_col: Annotated[str, typer.Option("--loss-col", help="Column of the loss.")] = "loss",
    entropy_col: Annotated[
        str,
        typer.Option(
            "--entropy-col", help="Column of the exact entropy (--fix-E exact, --excess)."
        ),
    ] = "entropy",
    regime: Annotated[
        str | None, typer.Option(help="Fit only the rows whose --regime-col equals this.")
    ] = None,
    regime_col: Annotated[
        str, typer.Option("--regime-col", help="Column naming the regime.")
    ] = "regime",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print A, B, E, alpha, beta, intervals... as JSON.")
    ] = False,
) -> None:
    """Fit a scaling law to a table, as Chinchilla's approach 3 is replicated.

    Parameters in log space, prediction as a log-sum-exp, summed Huber loss
    (delta 1e-3) on log L, L-BFGS-B from a grid of initialisations; intervals by
    resampling rows (whole runs). An ND fit also gives the compute-optimal
    allocation under C = 6ND: N_opt ~ C^a, D_opt ~ C^b.
    """
    from llama_train.scaling.fit import FORMS, fit_law
    from llama_train.scaling.points import numeric_column, read_table
    from llama_train.scaling.report import exact_entropy

    with user_errors():
        if form not in FORMS:
            raise LlamaTrainError(f"--form {form!r}: choose one of {', '.join(FORMS)}")
        if not 0 < level < 1:
            raise LlamaTrainError(f"--level {level}: give a number between 0 and 1, e.g. 0.95")
        if excess and fix_e is not None:
            raise LlamaTrainError("--excess fits loss - entropy without E: leave out --fix-E")
        header, rows = read_table(points)
        rows = _select_regime(rows, header, regime, regime_col, points)
        loss = numeric_column(rows, header, loss_col, points)
        n = numeric_column(rows, header, n_col, points) if form in ("ND", "N") else None
        d = numeric_column(rows, header, d_col, points) if form in ("ND", "D") else None
        fixed: float | None = None
        entropy: float | None = None
        if fix_e == "exact" or excess:
            values = numeric_column(rows, header, entropy_col, points)
            entropy = exact_entropy([{"e": value} for value in values], column="e")
        if fix_e == "exact":
            fixed = entropy
        elif fix_e is not None:
            fixed = _parse_e(fix_e)
        if excess:
            assert entropy is not None
            loss = [value - entropy for value in loss]
            fixed = 0.0
        started = time.perf_counter()
        fit = fit_law(
            n, d, loss, form=form, fixed_e=fixed, bootstrap=bootstrap, level=level, seed=seed
        )  # type: ignore[arg-type]
        seconds = time.perf_counter() - started
    result = {**fit.to_dict(), "target": "excess" if excess else loss_col}
    if entropy is not None:
        result["entropy"] = entropy
    if as_json:
        console.print_json(json.dumps(result))
        return
    _print_table(_fit_table(fit, points, excess, entropy))
    optimal = result.get("compute_optimal")
    if optimal is not None:
        exponent_n = _interval_text(optimal["a"], optimal["a_interval"])
        exponent_d = _interval_text(optimal["b"], optimal["b_interval"])
        console.print(
            f"compute-optimal (C = 6ND): N_opt ~ C^{exponent_n}, D_opt ~ C^{exponent_d}",
            highlight=False,
        )
    console.print(
        f"{fit.n_points} points; rms log residual {fit.rms_log_residual:.4f}; {seconds:.1f} s",
        highlight=False,
    )


def _select_regime(
    rows: list[dict[str, str]], header: list[str], regime: str | None, column: str, path: Path
) -> list[dict[str, str]]:
    if regime is not None:
        if column not in header:
            raise LlamaTrainError(f"{path} has no column {column!r} for --regime")
        chosen = [row for row in rows if row.get(column) == regime]
        if not chosen:
            names = sorted({row.get(column) or "" for row in rows})
            raise LlamaTrainError(f"no row has {column}={regime!r}; it holds {', '.join(names)}")
        return chosen
    if column in header:
        names = sorted({row.get(column) or "" for row in rows})
        if len(names) > 1:
            raise LlamaTrainError(
                f"{path} holds {len(names)} regimes ({', '.join(names)}): one law per regime, "
                "choose one with --regime"
            )
    return rows


def _parse_e(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise LlamaTrainError(f"--fix-E {text!r}: give a number or 'exact'") from None
    if not math.isfinite(value) or value < 0:
        raise LlamaTrainError(f"--fix-E {text}: give a finite, non-negative number or 'exact'")
    return value


def _fit_table(fit: Fit, path: Path, excess: bool, entropy: float | None) -> Table:
    law = {"ND": "E + A/N^alpha + B/D^beta", "N": "E + A/N^alpha", "D": "E + B/D^beta"}[fit.form]
    if excess:
        law = law.removeprefix("E + ") + "  (fitted to loss - entropy)"
    elif fit.e_mode == "fixed":
        law += f"  (E fixed at {fit.parameters['E']:.6g})"
    table = Table(
        title=f"{path}: L = {law}",
        title_justify="left",
        caption=f"{fit.level:.0%} bootstrap intervals from {fit.bootstrap} resamples"
        + ("" if entropy is None else f"; exact entropy {entropy:.6g}"),
        caption_justify="left",
    )
    table.add_column("parameter")
    table.add_column("value", justify="right")
    table.add_column("interval", justify="right")
    for name in ("E", "A", "alpha", "B", "beta"):
        value = fit.parameters[name]
        if value is None or (excess and name == "E"):
            continue
        interval = fit.intervals.get(name)
        table.add_row(
            name + (" (bound)" if name in fit.at_bound else ""),
            f"{value:.6g}",
            "-" if interval is None else f"[{interval[0]:.4g}, {interval[1]:.4g}]",
        )
    return table
