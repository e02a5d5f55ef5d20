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
    widen_edges: Annotated[
        bool,
        typer.Option(
            "--widen-edges",
            help="For each model size whose lr optimum is on the edge of its sweep, add one "
            "multiplier beyond that edge (lr rule only), then train what is missing.",
        ),
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
    the best learning rate. Without --slurm, points run here, --parallel at a time,
    after the stores of the study's regimes are built where missing (its `stores`
    recipe; only those regimes); points that share regime, model and data train as
    one stack (--no-stack: alone).
    """
    from llama_train.launch.study import (
        plan_study,
        run_local,
        slurm_ranks,
        submit_slurm,
    )
    from llama_train.launch.study import (
        widen_edges as widen,
    )

    with user_errors():
        if slurm and local:
            raise LlamaTrainError("choose --slurm or --local, not both")
        if not (slurm or dry_run):
            from llama_train.launch.study_stores import ensure_stores

            ensure_stores(study, log=_say)
        expanded = plan_study(study)
        if widen_edges and widen(expanded, log=_say):
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
    branches = len(expanded.branch_points)
    title = f"{expanded.directory}: {len(expanded.points)} point(s)"
    if branches:
        title += f" and {branches} cooldown branches (trained by their trunks)"
    table = Table(title=title, title_justify="left")
    for column in ("point", "regime", "model", "n_train", "lr", "seed", "steps"):
        table.add_column(
            column, justify="left" if column in ("point", "regime", "model") else "right"
        )
    for point in expanded.all_points:
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
    from llama_train.analysis.status import point_status, sweep_status
    from llama_train.cli.submit import status_table
    from llama_train.launch.study import edge_optima, read_study_record
    from llama_train.rundir import read_validation

    with user_errors():
        record = read_study_record(directory)
        statuses = sweep_status(directory)
        for point in record["points"]:
            if point.get("trunk"):  # cooldown branches: trained by their trunk's point
                statuses.append(
                    point_status(
                        Path(directory) / point["name"],
                        index=len(statuses),
                        name=point["name"],
                        steps=point["steps"],
                    )
                )
    if as_json:
        points = []
        for status in statuses:
            validation = read_validation(status.run_dir)
            loss = None if validation is None else validation.loss
            points.append({**status.to_dict(), "val_loss": loss})
        console.print_json(json.dumps(points, default=str))
        return
    _print_table(status_table(statuses, title=f"{directory}: "))
    for row in edge_optima(directory):
        console.print(
            f"lr optimum on the {row['lr_edge']} edge of the sweep: {row['regime']} "
            f"{row['model']} n_train {row['n_train']} seed {row['seed']} (lr {row['lr']:g}); "
            "widen it with llama-train study run STUDY --widen-edges",
            highlight=False,
        )


@study_app.command("collect")
def study_collect_command(
    directory: Annotated[Path, typer.Argument(help="Study directory.")],
    out: Annotated[
        Path | None, typer.Option(help="CSV to write; default <study dir>/points.csv.")
    ] = None,
    every_lr: Annotated[
        bool, typer.Option("--every-lr", help="One row per run, not only the best lr per point.")
    ] = False,
    parameters: Annotated[
        str, typer.Option(help="What N counts: total (embeddings and head) or non-embedding.")
    ] = "total",
) -> None:
    """Write the study's table: one row per finished point, its best learning rate.

    Columns: regime, model, N (the count fits use: --parameters, total by default),
    N_total, N_non_embedding, N_count, D (unique training tokens), n_train, tokens
    (seen), epochs, flops_6nd, flops_attention, flops, lr, seed, steps, val_loss, loss,
    entropy, excess (nats) and *_bits. Points without a
    validation.json are validated first (that needs their checkpoints).
    """
    from llama_train.launch.study import ensure_validation
    from llama_train.scaling.points import collect, write_csv

    with user_errors():
        ensure_validation(directory, log=_say)
        rows = collect(directory, every_lr=every_lr, parameters=parameters)
        _say_missing(directory)
        if not rows:
            raise LlamaTrainError(f"{directory}: no finished point yet (llama-train study status)")
        path = write_csv(rows, out or Path(directory) / "points.csv")
    _print_table(_points_table(rows))
    console.print(f"wrote {path} ({len(rows)} rows)", highlight=False)


def _say_missing(directory: Path) -> None:
    """Name the points a table leaves out, so a partial table is never taken for a whole."""
    from llama_train.launch.study import describe_missing, missing_from_table

    missing = missing_from_table(directory)
    if missing:
        _say(describe_missing(missing, directory))


def _points_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(
        caption="nats/token; excess = test loss - exact entropy; lr*: the optimum interpolated "
        "in log lr (edge: the best lr is the sweep's smallest or largest, widen the sweep with "
        "study run --widen-edges); ± seeds: the test loss's standard deviation over seeds",
        caption_justify="left",
    )
    columns = ("regime", "model", "N", "D", "epochs", "lr", "lr*", "val loss", "test loss")
    for column in (*columns, "± seeds", "excess"):
        table.add_column(column, justify="left" if column in ("regime", "model") else "right")
    for row in rows:
        edge = f" (edge {row['lr_edge']})" if row.get("lr_edge") else ""
        noise = row.get("loss_seed_std")
        table.add_row(
            row["regime"],
            row["model"],
            f"{row['N']:,}",
            f"{row['D']:,}",
            f"{row['epochs']:.2f}",
            f"{row['lr']:g}",
            f"{row['lr_opt']:.3g}{edge}",
            f"{row['val_loss']:.4f}",
            f"{row['loss']:.4f}",
            "-" if noise is None else f"{noise:.4f}",
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
    parameters: Annotated[
        str, typer.Option(help="What N counts: total (embeddings and head) or non-embedding.")
    ] = "total",
    recovery: Annotated[
        int,
        typer.Option(
            min=0,
            help="Tables simulated from the E = exact fit on the study's own grid and refitted "
            "(bias and interval coverage of alpha and beta); 0 = skip.",
        ),
    ] = 10,
    recovery_bootstrap: Annotated[
        int, typer.Option(min=2, help="Bootstrap resamples per recovery refit.")
    ] = 20,
) -> None:
    """Fit every regime (E free, E = exact entropy, excess), validate, draw the figures.

    Per regime: loss against N (one curve per D) and against D (one per N), loss
    against compute with the frontier, each with the fitted law and the exact-entropy
    floor; excess loss on log-log axes; residuals. Also the data-constrained view
    (test loss against epochs over the same unique data). Under each table: the E = exact
    fit predicting the largest model and the largest compute from the rest (pass within
    1% of the loss) and its recovery on the study's own grid. Writes fits.json beside.
    """
    from llama_train.launch.study import ensure_validation
    from llama_train.rundir import atomic_write
    from llama_train.scaling.plots import plot_lr_sweeps, plot_study
    from llama_train.scaling.points import collect
    from llama_train.scaling.regime_fits import fit_regimes
    from llama_train.scaling.validate import validate_table

    with user_errors():
        ensure_validation(directory, log=_say)
        rows = collect(directory, parameters=parameters)
        _say_missing(directory)
        if not rows:
            raise LlamaTrainError(f"{directory}: no finished point yet (llama-train study status)")
        fits = fit_regimes(rows, bootstrap=bootstrap, seed=seed, log=_say)
        validations = [
            validate_table(
                regime.rows,
                regime.exact,
                entropy=regime.entropy,
                recovery_replicates=recovery,
                bootstrap=recovery_bootstrap,
                seed=seed,
            )
            for regime in fits
        ]
        approaches = [
            _approaches(
                regime.exact,
                [row["N"] for row in regime.rows],
                [row["D"] for row in regime.rows],
                [row["loss"] for row in regime.rows],
            )
            for regime in fits
        ]
        target = out_dir or Path(directory) / "plots"
        paths = plot_study(directory, fits, target, log=_say)
        every_lr = collect(directory, every_lr=True, parameters=parameters)
        paths += plot_lr_sweeps(every_lr, rows, target)
        fits_path = target / "fits.json"
        records = [
            {
                **fit.to_dict(),
                "approaches": [allocation.to_dict() for allocation in allocations],
                "validation": validation.to_dict(),
            }
            for fit, allocations, validation in zip(fits, approaches, validations, strict=True)
        ]
        atomic_write(fits_path, json.dumps(records, indent=1) + "\n")
    for regime, allocations, validation in zip(fits, approaches, validations, strict=True):
        _print_table(_fits_table(regime))
        _print_table(_approaches_table(regime.exact, allocations))
        for flag in regime.exact.flags:
            console.print(f"E = exact: unidentified: {flag}", highlight=False)
        for line in validation.lines():
            console.print(f"{regime.regime}, E = exact: {line}", highlight=False)
    for path in [*paths, fits_path]:
        console.print(f"wrote {path}", highlight=False)


def _fits_table(regime: Any) -> Table:
    from llama_train.scaling.points import LN2

    table = Table(
        title=f"{regime.regime}: {len(regime.rows)} points, exact entropy {regime.entropy:.4f} "
        f"nats ({regime.entropy / LN2:.4f} bits)",
        title_justify="left",
        caption=f"{regime.free.level:.0%} bootstrap intervals ({regime.free.bootstrap} resamples "
        f"of {regime.exact.groups} run groups); (bound): the fit ended on the edge of its search "
        "(exponents 0..4; approach 3: log A/B in [-20, 60], log E >= -20; vpnls: a coefficient "
        "at 0): the data do not determine that parameter; weights: "
        + ("seed noise (loss_seed_std)" if regime.exact.weights == "seed-noise" else "none"),
        caption_justify="left",
    )
    table.add_column("fit")
    for name in ("E", "A", "alpha", "B", "beta", "a = beta/(alpha+beta)"):
        table.add_column(name, justify="right")
    for label, fit in (
        ("E free (approach 3)", regime.free),
        ("E = exact (vpnls)", regime.exact),
        ("excess (vpnls)", regime.excess),
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
    method: Annotated[
        str,
        typer.Option(
            help="vpnls: exponent grid with A, B (and a free E) by non-negative least squares, "
            "refined; lbfgs: Chinchilla's approach 3 (Huber on log L, L-BFGS-B), the "
            "diagnostic for a free E.",
        ),
    ] = "vpnls",
    bootstrap: Annotated[
        int, typer.Option(min=0, help="Bootstrap resamples of the run groups; 0 = none.")
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
    group_col: Annotated[
        str,
        typer.Option(
            "--group-col",
            help="Column of the run group the bootstrap resamples together (a trunk and its "
            "cooldown branches); without it, or in an empty cell, every row is its own group.",
        ),
    ] = "group",
    weights: Annotated[
        str | None,
        typer.Option(
            help="seed-noise: weight each row by the inverse of its seed noise relative to "
            "its loss (--noise-col, written by study collect with 2+ seeds; floored at a "
            "quarter of the median); none: all rows alike. Default: seed-noise when the "
            "column has values, else none.",
        ),
    ] = None,
    noise_col: Annotated[
        str,
        typer.Option("--noise-col", help="Column of the seed sd of the loss (--weights)."),
    ] = "loss_seed_std",
    regime: Annotated[
        str | None, typer.Option(help="Fit only the rows whose --regime-col equals this.")
    ] = None,
    regime_col: Annotated[
        str, typer.Option("--regime-col", help="Column naming the regime.")
    ] = "regime",
    holdout_largest: Annotated[
        bool,
        typer.Option(
            "--holdout-largest",
            help="Refit without the largest N and predict it; also leave-future-out over "
            "compute. Errors in nats and as fractions; pass within 1% of the loss.",
        ),
    ] = False,
    recovery: Annotated[
        int,
        typer.Option(
            min=0,
            help="Simulate K tables from the fit on this table's (N, D) rows with its residual "
            "noise, refit each with --bootstrap resamples: bias and interval coverage of "
            "alpha and beta.",
        ),
    ] = 0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print A, B, E, alpha, beta, intervals... as JSON.")
    ] = False,
) -> None:
    """Fit a scaling law to a table; compare compute-optimal exponents; validate.

    vpnls (default): variable projection, an exhaustive grid over the exponents with
    the coefficients by non-negative least squares, refined (squared relative errors).
    lbfgs: Chinchilla's approach 3 as replicated (log-space parameters, Huber on log L,
    L-BFGS-B from a grid). Intervals by resampling run groups. An ND fit also gives the
    compute-optimal N_opt ~ C^a (C = 6ND) beside approaches 1 (frontier) and 2
    (isoFLOP parabolas).
    """
    import numpy as np

    from llama_train.scaling.fit import FORMS
    from llama_train.scaling.methods import METHODS, fit_points
    from llama_train.scaling.points import numeric_column, read_table
    from llama_train.scaling.validate import design_of, validate

    with user_errors():
        if form not in FORMS:
            raise LlamaTrainError(f"--form {form!r}: choose one of {', '.join(FORMS)}")
        if method not in METHODS:
            raise LlamaTrainError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
        if not 0 < level < 1:
            raise LlamaTrainError(f"--level {level}: give a number between 0 and 1, e.g. 0.95")
        if excess and fix_e is not None:
            raise LlamaTrainError("--excess fits loss - entropy without E: leave out --fix-E")
        header, rows = read_table(points)
        rows = _select_regime(rows, header, regime, regime_col, points)
        loss = numeric_column(rows, header, loss_col, points)
        n = numeric_column(rows, header, n_col, points) if form in ("ND", "N") else None
        d = numeric_column(rows, header, d_col, points) if form in ("ND", "D") else None
        groups = _groups(rows, header, group_col)
        noise = _noise(weights, rows, header, noise_col, points)
        fixed, entropy, target = _target(fix_e, excess, rows, header, entropy_col, loss, points)
        started = time.perf_counter()
        fit = fit_points(
            n,
            d,
            target,
            method=method,
            form=form,  # type: ignore[arg-type]
            fixed_e=fixed,
            bootstrap=bootstrap,
            level=level,
            seed=seed,
            groups=groups,
            noise=noise,
        )
        validation = None
        if holdout_largest or recovery:
            design = design_of(
                fit,
                n,
                d,
                target,
                groups=None if groups is None else np.asarray(groups, dtype=object),
                offset=entropy if excess else 0.0,
                floor=entropy,
                noise=None if noise is None else np.asarray(noise, dtype=np.float64),
            )
            validation = validate(
                design, fit, recovery_replicates=recovery, bootstrap=bootstrap, seed=seed
            )
        seconds = time.perf_counter() - started
    approaches = _approaches(fit, n, d, target)
    result = {**fit.to_dict(), "target": "excess" if excess else loss_col}
    if entropy is not None:
        result["entropy"] = entropy
    if approaches:
        result["approaches"] = [allocation.to_dict() for allocation in approaches]
    if validation is not None:
        result["validation"] = validation.to_dict()
    if as_json:
        console.print_json(json.dumps(result))
        return
    _print_table(_fit_table(fit, points, excess, entropy))
    for flag in fit.flags:
        console.print(f"unidentified: {flag}", highlight=False)
    if approaches:
        _print_table(_approaches_table(fit, approaches))
    if validation is not None:
        for line in validation.lines():
            console.print(line, highlight=False)
    console.print(
        f"{fit.n_points} points; rms log residual {fit.rms_log_residual:.4f}; weights "
        f"{fit.weights}; {seconds:.1f} s",
        highlight=False,
    )


def _groups(rows: list[dict[str, str]], header: list[str], column: str) -> list[str] | None:
    """The run group of each row; an empty cell is a group of its own."""
    if column not in header:
        return None
    return [(row.get(column) or "").strip() or f"\0row{index}" for index, row in enumerate(rows)]


WEIGHTS = ("seed-noise", "none")


def _noise(
    weights: str | None, rows: list[dict[str, str]], header: list[str], column: str, path: Path
) -> list[float] | None:
    """The seed sd of each row's loss (NaN where a cell is empty), or None: unweighted.

    Default (`weights` None): the column's values when it has any, else None.
    """
    if weights is not None and weights not in WEIGHTS:
        raise LlamaTrainError(f"--weights {weights!r}: choose one of {', '.join(WEIGHTS)}")
    if weights == "none" or (weights is None and column not in header):
        return None
    if column not in header:
        raise LlamaTrainError(
            f"--weights seed-noise: {path} has no column {column!r} (study collect writes it "
            "for a study with 2+ seeds; name another with --noise-col)"
        )
    from llama_train.scaling.points import numeric_column

    values = numeric_column(rows, header, column, path, empty=math.nan)
    for line, value in enumerate(values, start=2):
        if value < 0:
            raise LlamaTrainError(f"{path} line {line}: {column}={value!r} must be >= 0")
    if all(math.isnan(value) for value in values):
        if weights is None:
            return None
        raise LlamaTrainError(
            f"--weights seed-noise: every {column} cell is empty (one seed per point)"
        )
    return values


def _target(
    fix_e: str | None,
    excess: bool,
    rows: list[dict[str, str]],
    header: list[str],
    entropy_col: str,
    loss: list[float],
    path: Path,
) -> tuple[float | None, float | None, list[float]]:
    """(fixed E, exact entropy, the values fitted): the loss, or the excess with E = 0."""
    from llama_train.scaling.points import numeric_column
    from llama_train.scaling.regime_fits import exact_entropy

    entropy: float | None = None
    if fix_e == "exact" or excess:
        values = numeric_column(rows, header, entropy_col, path)
        entropy = exact_entropy([{"e": value} for value in values], column="e")
    if excess:
        assert entropy is not None
        target = [value - entropy for value in loss]
        below = [index for index, value in enumerate(target) if value <= 0]
        if below:
            first = below[0]
            raise LlamaTrainError(
                f"{path} line {first + 2}: excess = loss - entropy = {target[first]:.4g} "
                f"(loss {loss[first]:.6g}, exact entropy {entropy:.6g}) is not positive, and "
                f"--excess fits log(excess); {len(below)} row(s) are at or below the floor: "
                "drop them or fit with --fix-E exact"
            )
        return 0.0, entropy, target
    if fix_e == "exact":
        return entropy, entropy, loss
    return (None if fix_e is None else _parse_e(fix_e)), entropy, loss


def _approaches(fit: Fit, n: Any, d: Any, target: list[float]) -> list[Any]:
    """Approaches 1 and 2 on the same table, for an ND fit."""
    import numpy as np

    from llama_train.scaling.approaches import approach1, approach2

    if fit.form != "ND":
        return []
    arrays = [np.asarray(values, dtype=np.float64) for values in (n, d, target)]
    return [approach1(*arrays), approach2(*arrays)]


def _approaches_table(fit: Fit, approaches: list[Any]) -> Table:
    from llama_train.scaling.fit import compute_optimal, has_compute_optimal

    table = Table(
        title="compute-optimal allocation, C = 6ND: N_opt ~ C^a, D_opt ~ C^(1-a)",
        title_justify="left",
        caption="1: the runs on the loss-compute frontier; 2: vertices of parabolas in log N "
        "at compute levels (runs within a factor 1.2); parametric: a = beta/(alpha+beta)",
        caption_justify="left",
    )
    for column in ("approach", "a", "1 - a", "from"):
        table.add_column(column, justify="left" if column in ("approach", "from") else "right")
    if has_compute_optimal(fit):
        optimal = compute_optimal(fit)
        table.add_row(
            f"3: {fit.method} fit",
            _interval_text(optimal.a, optimal.a_interval),
            _interval_text(optimal.b, optimal.b_interval),
            f"{fit.n_points} points",
        )
    else:
        table.add_row(f"3: {fit.method} fit", "-", "-", "A, B, alpha or beta is 0")
    for allocation in approaches:
        used = f"{len(allocation.compute)} optima"
        if allocation.notes:
            used += "; " + "; ".join(allocation.notes)
        if allocation.a is None:
            table.add_row(allocation.approach, "-", "-", used)
        else:
            table.add_row(
                allocation.approach, f"{allocation.a:.4g}", f"{1 - allocation.a:.4g}", used
            )
    return table


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
        caption=f"{fit.method}, weights {fit.weights}; {fit.level:.0%} bootstrap intervals "
        f"from {fit.bootstrap} "
        f"resamples of {fit.groups} run groups; -: none (fixed, or not identified)"
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
