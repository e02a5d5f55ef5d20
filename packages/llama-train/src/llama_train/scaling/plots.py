"""The figures of a study (matplotlib, no torch): one PNG per regime and view.

For each regime:

- ``<regime>-loss.png``: test loss against N (one curve per D), against D (one curve
  per N) and against training compute (every point, the frontier of the best loss at
  each compute, and the loss the E-free fit predicts at the compute-optimal N and D);
  each with the fitted law (dashed: E free, dotted: E fixed to the exact entropy) and
  the exact-entropy floor; nats on the left axis, bits on the right;
- ``<regime>-excess.png``: excess loss (loss - exact entropy) against N and D on
  log-log axes with the pure power-law fit, and the residuals of the E-free fit
  (log L observed - log L fitted) against N;
- ``<regime>-isoflop.png``: approach 2's isoFLOP profiles, loss against N at each
  compute level it fits (the points, the parabola in log N, its minimum marked), and
  the minima's N_opt against compute with approach 2's power law; not drawn (and said)
  when no level holds 3 distinct N;
- ``<regime>-epochs.png``: the data-constrained view, test loss against epochs over
  the same unique data (each evaluation of each run), one curve per D, for the
  largest model.

Narrow log ranges (a factor 4 in N, say) get labelled minor ticks (1k, 2k, 5k...)
instead of a single power of ten.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llama_train.errors import LlamaTrainError
from llama_train.rundir import atomic_write, read_metric_records, tokens_per_step
from llama_train.scaling.approaches import approach2, isoflop_profiles
from llama_train.scaling.fit import Fit
from llama_train.scaling.regime_fits import RegimeFits

LN2 = math.log(2.0)


def save_png(figure: Any, path: Path, *, dpi: int) -> Path:
    """A figure as a PNG, written atomically: a full disk leaves no half image.

    zlib level 1: a third of the drawing went into level 6's compression, for a file
    only about a fifth smaller; the pixels are the same.
    """
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=dpi, pil_kwargs={"compress_level": 1})
    return atomic_write(path, image.getvalue())


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, imported when a figure is drawn.

    The one guard of every plotting command: matplotlib is an optional extra, so
    its absence is a one-line user error naming the extra, and no display is needed
    (Slurm nodes, CI).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LlamaTrainError(
            "plotting needs matplotlib: pip install 'llama-train[plot]'"
        ) from None
    return plt


def _si(value: float, _position: Any = None) -> str:
    """1.5k, 20k, 3M: tick labels that stay short on log axes."""
    if value <= 0:
        return ""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def readable_log_axis(axis: Any, values: np.ndarray) -> None:
    """Log scale with labels on 1-2-5 minor ticks when the range spans under two decades."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    values = np.asarray(values, dtype=np.float64)
    values = values[values > 0]
    decades = math.log10(values.max() / values.min()) if len(values) else 3.0
    axis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0) if decades < 2 else (1.0,)))
    axis.set_major_formatter(FuncFormatter(_si))
    axis.set_minor_locator(LogLocator(base=10.0, subs=tuple(np.arange(2, 10)), numticks=100))
    axis.set_minor_formatter(NullFormatter())


def _bits_axis(ax: Any) -> None:
    secondary = ax.secondary_yaxis("right", functions=(lambda x: x / LN2, lambda x: x * LN2))
    secondary.set_ylabel("bits / token")


def _floor(ax: Any, entropy: float) -> None:
    ax.axhline(entropy, color="black", linewidth=1.2, linestyle="-", alpha=0.8)
    ax.annotate(
        f"exact entropy {entropy:.4f} nats",
        xy=(0.01, entropy),
        xycoords=("axes fraction", "data"),
        xytext=(0, 3),
        textcoords="offset points",
        fontsize=8,
    )


def _label_fit(fit: Fit, name: str) -> str:
    p = fit.parameters
    return f"{name}: E={p['E']:.3f}, α={p['alpha']:.2f}, β={p['beta']:.2f}"


def plot_study(
    directory: str | Path,
    fits: list[RegimeFits],
    out_dir: str | Path,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """Write every figure of every regime to `out_dir`; return the paths. A figure the
    table cannot give (no isoFLOP level) is named in `log` with the reason."""
    say = log or (lambda message: None)
    plt = pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for regime in fits:
        paths.append(_loss_figure(plt, regime, out_dir / f"{regime.regime}-loss.png"))
        paths.append(_excess_figure(plt, regime, out_dir / f"{regime.regime}-excess.png"))
        isoflop = _isoflop_figure(plt, regime, out_dir / f"{regime.regime}-isoflop.png")
        if isinstance(isoflop, Path):
            paths.append(isoflop)
        else:
            say(f"{regime.regime}: no isoFLOP figure: {isoflop}")
        epochs = _epochs_figure(plt, regime, out_dir / f"{regime.regime}-epochs.png")
        if epochs is not None:
            paths.append(epochs)
    return paths


def _arrays(regime: RegimeFits) -> dict[str, np.ndarray]:
    keys = ("N", "D", "loss", "flops", "excess")
    return {key: np.asarray([float(row[key]) for row in regime.rows]) for key in keys}


def _n_label(regime: RegimeFits) -> str:
    """The N axis names the count the table's N is (collect's --parameters: total by default)."""
    count = regime.rows[0].get("N_count") if regime.rows else None
    return f"N ({count or 'total'} parameters)"


def _colours(plt: Any, count: int) -> list[Any]:
    cmap = plt.get_cmap("viridis")
    return [cmap(i / max(count - 1, 1) * 0.9) for i in range(count)]


def _curves(
    plt: Any, ax: Any, regime: RegimeFits, data: dict, *, x: str, per: str, marker: str
) -> None:
    """Loss against column `x`, one curve per value of `per`, with both fitted laws."""
    grid = np.geomspace(data[x].min() / 1.3, data[x].max() * 1.3, 100)
    groups = np.unique(data[per])
    for colour, value in zip(_colours(plt, len(groups)), groups, strict=True):
        mask = data[per] == value
        order = np.argsort(data[x][mask])
        label = f"{per}={_si(value)}"
        ax.plot(
            data[x][mask][order], data["loss"][mask][order], f"{marker}-", color=colour, label=label
        )
        n, d = (grid, value) if x == "N" else (value, grid)
        ax.plot(grid, regime.free.predict(n, d), "--", color=colour, linewidth=1)
        ax.plot(grid, regime.exact.predict(n, d), ":", color=colour, linewidth=1)
    ax.set_xscale("log")
    readable_log_axis(ax.xaxis, grid)


def _loss_figure(plt: Any, regime: RegimeFits, path: Path) -> Path:
    data = _arrays(regime)
    figure, axes = plt.subplots(1, 3, figsize=(17, 5), constrained_layout=True)
    # Against N, one curve per D; against D, one curve per N.
    _curves(plt, axes[0], regime, data, x="N", per="D", marker="o")
    axes[0].set_xlabel(_n_label(regime))
    axes[0].set_title("loss against N (dashed: E free, dotted: E = exact)")
    _curves(plt, axes[1], regime, data, x="D", per="N", marker="s")
    axes[1].set_xlabel("D (unique training tokens)")
    axes[1].set_title("loss against D")
    # Against compute: points, frontier, and the fitted compute-optimal loss.
    ax = axes[2]
    flops = data["flops"]
    ax.scatter(
        flops, data["loss"], c=np.log(data["N"]), cmap="viridis", s=25, label="runs (colour: N)"
    )
    order = np.argsort(flops)
    frontier_c, frontier_l, best = [], [], math.inf
    for index in order:
        if data["loss"][index] < best:
            best = data["loss"][index]
            frontier_c.append(flops[index])
            frontier_l.append(best)
    ax.step(frontier_c, frontier_l, where="post", color="crimson", label="frontier (best so far)")
    c_grid = np.geomspace(flops.min() / 1.5, flops.max() * 1.5, 100)
    for fit, style, name in ((regime.free, "--", "E free"), (regime.exact, ":", "E = exact")):
        optimal = _optimal_loss(fit, c_grid)
        if optimal is not None:
            ax.plot(
                c_grid,
                optimal,
                style,
                color="black",
                linewidth=1.2,
                label=f"fit at N_opt, D_opt ({name})",
            )
    ax.set_xscale("log")
    readable_log_axis(ax.xaxis, c_grid)
    ax.set_xlabel("training compute (FLOPs, 6ND + attention)")
    ax.set_title("loss against compute")
    for ax in axes:
        _floor(ax, regime.entropy)
        ax.set_ylabel("test loss (nats / token)")
        _bits_axis(ax)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=8)
    figure.suptitle(
        f"{regime.regime}: {_label_fit(regime.free, 'E free')};  "
        f"{_label_fit(regime.exact, 'E = exact')}",
        fontsize=11,
    )
    save_png(figure, path, dpi=110)
    plt.close(figure)
    return path


def _isoflop_figure(plt: Any, regime: RegimeFits, path: Path) -> Path | str:
    """Approach 2 drawn: the figure's path, or why there is none.

    Left: loss against N at each compute level approach 2 fits (points, the parabola in
    log N over the level's N range, a star at its minimum when it has one inside the
    range). Right: the minima's N_opt against compute with approach 2's power law.
    """
    data = _arrays(regime)
    profiles = isoflop_profiles(data["N"], data["D"], data["loss"])
    if not profiles:
        return (
            "no compute level holds 3 distinct N (approach 2 needs an isoFLOP grid: N and D "
            "geometric with one ratio)"
        )
    allocation = approach2(data["N"], data["D"], data["loss"])
    figure, axes = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    ax = axes[0]
    for colour, profile in zip(_colours(plt, len(profiles)), profiles, strict=True):
        members = np.asarray(profile.members)
        label = f"C={_si(profile.compute)}"
        ax.scatter(data["N"][members], data["loss"][members], color=colour, s=25, label=label)
        low, high = profile.log_n_range
        x = np.linspace(low - 0.1 * (high - low), high + 0.1 * (high - low), 100)
        ax.plot(np.exp(x), profile.c2 * x * x + profile.c1 * x + profile.c0, color=colour)
        if profile.n_opt is not None:
            x_opt = math.log(profile.n_opt)
            loss_opt = profile.c2 * x_opt * x_opt + profile.c1 * x_opt + profile.c0
            ax.plot(profile.n_opt, loss_opt, "*", color=colour, markersize=14, mec="black")
    ax.set_xscale("log")
    readable_log_axis(ax.xaxis, data["N"])
    ax.set_xlabel(_n_label(regime))
    _floor(ax, regime.entropy)
    ax.set_ylabel("test loss (nats / token)")
    _bits_axis(ax)
    ax.set_title("isoFLOP profiles (C = 6ND; star: the parabola's minimum)")
    ax.legend(fontsize=8)
    ax = axes[1]
    if allocation.compute:
        ax.plot(allocation.compute, allocation.n_opt, "*", markersize=12, color="crimson")
        ax.set_xscale("log")
        ax.set_yscale("log")
        readable_log_axis(ax.xaxis, np.asarray(allocation.compute))
        readable_log_axis(ax.yaxis, np.asarray(allocation.n_opt))
    if allocation.a is not None and allocation.coefficient is not None:
        grid = np.geomspace(min(allocation.compute) / 1.5, max(allocation.compute) * 1.5, 50)
        ax.plot(grid, allocation.coefficient * grid**allocation.a, "--", color="black")
        ax.set_title(f"approach 2: N_opt ~ C^{allocation.a:.3f}")
    else:
        ax.set_title("approach 2: " + "; ".join(allocation.notes or ["no exponent"]), fontsize=8)
    ax.set_xlabel("compute C = 6ND (FLOPs)")
    ax.set_ylabel("N_opt")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.25)
    figure.suptitle(f"{regime.regime}: isoFLOP profiles (approach 2)", fontsize=11)
    save_png(figure, path, dpi=110)
    plt.close(figure)
    return path


def _optimal_loss(fit: Fit, compute: np.ndarray) -> np.ndarray | None:
    """L(N_opt(C), D_opt(C)) with C = 6ND (the 6ND part of the compute only)."""
    from llama_train.scaling.fit import compute_optimal

    try:
        optimal = compute_optimal(fit)
    except LlamaTrainError:
        return None
    return fit.predict(optimal.n_opt(compute), optimal.d_opt(compute))


def _excess_figure(plt: Any, regime: RegimeFits, path: Path) -> Path:
    data = _arrays(regime)
    figure, axes = plt.subplots(1, 3, figsize=(17, 5), constrained_layout=True)
    ns, ds = np.unique(data["N"]), np.unique(data["D"])
    fit = regime.excess
    n_grid = np.geomspace(ns.min() / 1.3, ns.max() * 1.3, 100)
    d_grid = np.geomspace(ds.min() / 1.3, ds.max() * 1.3, 100)
    for colour, d in zip(_colours(plt, len(ds)), ds, strict=True):
        mask = data["D"] == d
        order = np.argsort(data["N"][mask])
        axes[0].plot(
            data["N"][mask][order],
            data["excess"][mask][order],
            "o",
            color=colour,
            label=f"D={_si(d)}",
        )
        axes[0].plot(n_grid, fit.predict(n_grid, d), "-", color=colour, linewidth=1)
    for colour, n in zip(_colours(plt, len(ns)), ns, strict=True):
        mask = data["N"] == n
        order = np.argsort(data["D"][mask])
        axes[1].plot(
            data["D"][mask][order],
            data["excess"][mask][order],
            "s",
            color=colour,
            label=f"N={_si(n)}",
        )
        axes[1].plot(d_grid, fit.predict(n, d_grid), "-", color=colour, linewidth=1)
    p = fit.parameters
    for ax, label, grid in (
        (axes[0], _n_label(regime), n_grid),
        (axes[1], "D (unique training tokens)", d_grid),
    ):
        ax.set_xscale("log")
        ax.set_yscale("log")
        readable_log_axis(ax.xaxis, grid)
        readable_log_axis(ax.yaxis, data["excess"])
        ax.set_xlabel(label)
        ax.set_ylabel("excess loss = test loss - exact entropy (nats)")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=8)
    axes[0].set_title(f"excess = A/N^α + B/D^β: α={p['alpha']:.2f}, β={p['beta']:.2f}")
    axes[1].set_title("excess against D")
    # Residuals of the E-free fit.
    residual = np.log(data["loss"]) - np.log(regime.free.predict(data["N"], data["D"]))
    residual_exact = np.log(data["loss"]) - np.log(regime.exact.predict(data["N"], data["D"]))
    ax = axes[2]
    ax.axhline(0.0, color="black", linewidth=1)
    ax.scatter(
        data["N"],
        residual,
        c=np.log(data["D"]),
        cmap="viridis",
        marker="o",
        label="E free (colour: D)",
    )
    ax.scatter(
        data["N"] * 1.04,
        residual_exact,
        c=np.log(data["D"]),
        cmap="viridis",
        marker="x",
        label="E = exact",
    )
    ax.set_xscale("log")
    readable_log_axis(ax.xaxis, n_grid)
    ax.set_xlabel(_n_label(regime))
    ax.set_ylabel("log L observed - log L fitted")
    ax.set_title(
        f"residuals (rms {regime.free.rms_log_residual:.4f} free, "
        f"{regime.exact.rms_log_residual:.4f} exact)"
    )
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    figure.suptitle(f"{regime.regime}: excess loss over the exact entropy", fontsize=11)
    save_png(figure, path, dpi=110)
    plt.close(figure)
    return path


def _epochs_figure(plt: Any, regime: RegimeFits, path: Path) -> Path | None:
    """Test loss at every evaluation against epochs, largest model, one curve per D."""
    largest = max(float(row["N"]) for row in regime.rows)
    rows = sorted(
        (row for row in regime.rows if float(row["N"]) == largest), key=lambda row: float(row["D"])
    )
    curves = []
    for row in rows:
        points = _eval_curve(Path(row["run_dir"]), float(row["D"]))
        if len(points) >= 2:
            curves.append((row, points))
    if not curves:
        return None
    figure, ax = plt.subplots(figsize=(7, 5), constrained_layout=True)
    for colour, (row, points) in zip(_colours(plt, len(curves)), curves, strict=True):
        epochs, losses = zip(*points, strict=True)
        ax.plot(epochs, losses, "o-", color=colour, label=f"D={_si(float(row['D']))}")
    _floor(ax, regime.entropy)
    ax.set_xlabel("epochs over the same unique data")
    ax.set_ylabel("test loss (nats / token)")
    _bits_axis(ax)
    ax.grid(True, alpha=0.25)
    ax.legend(fontsize=8)
    ax.set_title(f"{regime.regime}: data-constrained view, N={_si(largest)} (best lr)")
    save_png(figure, path, dpi=110)
    plt.close(figure)
    return path


def _eval_curve(run_dir: Path, unique_tokens: float) -> list[tuple[float, float]]:
    """(epochs, test loss) at every evaluation of a run, from its metrics.jsonl."""
    try:
        records = read_metric_records(run_dir)
    except LlamaTrainError:
        return []
    per_step = tokens_per_step(records)
    if per_step is None or unique_tokens <= 0:
        return []
    return [
        (record.step * per_step / unique_tokens, record.eval_loss)
        for record in records
        if record.eval_loss is not None
    ]


# ---------------------------------------------------------------------------
# Learning rate per size


def fit_lr_rule(parameters: np.ndarray, lrs: np.ndarray) -> tuple[float, float]:
    """(c, k) of lr* = c N^k, least squares in log-log (the rule that centres the next sweep)."""
    n, lr = np.log(np.asarray(parameters, float)), np.log(np.asarray(lrs, float))
    if len(np.unique(n)) < 2:
        raise LlamaTrainError("an lr rule needs optima at two model sizes or more")
    slope, intercept = np.polyfit(n, lr, 1)
    return float(math.exp(intercept)), float(slope)


def plot_lr_sweeps(
    runs: list[dict[str, Any]], best: list[dict[str, Any]], out_dir: str | Path
) -> list[Path]:
    """`<regime>-lr.png` per regime with an lr sweep: validation loss against lr per model
    size (largest data size, mean over seeds; a star at the interpolated optimum), and the
    optimum lr*(N) at each data size with its power-law fit over the largest data size
    (hollow: an optimum on the sweep's edge, left out of the fit).

    `runs`: collect's rows with every lr; `best`: the best-lr rows (lr_opt, lr_edge).
    """
    plt = pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for regime in dict.fromkeys(row["regime"] for row in runs):
        mine = [row for row in runs if row["regime"] == regime]
        if len({row["lr"] for row in mine}) < 2:
            continue  # one lr: no sweep to draw
        optima = [row for row in best if row["regime"] == regime]
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        _sweep_panel(plt, left, mine, optima)
        _lr_rule_panel(plt, right, optima)
        figure.suptitle(f"{regime}: learning rate per model size")
        figure.tight_layout()
        paths.append(save_png(figure, out_dir / f"{regime}-lr.png", dpi=130))
        plt.close(figure)
    return paths


def _sweep_panel(
    plt: Any, ax: Any, runs: list[dict[str, Any]], optima: list[dict[str, Any]]
) -> None:
    largest = max(row["n_train"] for row in runs)
    models = sorted({row["model"] for row in runs}, key=lambda m: _size_of(runs, m))
    for model, colour in zip(models, _colours(plt, len(models)), strict=True):
        rows = [r for r in runs if r["model"] == model and r["n_train"] == largest]
        by_lr: dict[float, list[float]] = {}
        for row in rows:
            if isinstance(row["val_loss"], int | float):
                by_lr.setdefault(row["lr"], []).append(row["val_loss"])
        if not by_lr:
            continue
        lrs = np.asarray(sorted(by_lr))
        losses = np.asarray([np.mean(by_lr[lr]) for lr in lrs])
        ax.plot(lrs, losses, "o-", color=colour, label=f"{model} (N={_si(_size_of(runs, model))})")
        best = [r for r in optima if r["model"] == model and r["n_train"] == largest]
        if best:
            lr_opt = math.exp(np.mean([math.log(r["lr_opt"]) for r in best]))
            ax.plot([lr_opt], [losses.min()], "*", color=colour, markersize=12)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("validation loss (nats / token)")
    ax.set_title(f"sweeps at n_train={largest:,} (star: interpolated optimum)", fontsize=9)
    ax.legend(fontsize=8)


def _lr_rule_panel(plt: Any, ax: Any, optima: list[dict[str, Any]]) -> None:
    sizes = sorted({row["n_train"] for row in optima})
    for n_train, colour in zip(sizes, _colours(plt, len(sizes)), strict=True):
        rows = [r for r in optima if r["n_train"] == n_train]
        for edge in (False, True):
            chosen = [r for r in rows if bool(r.get("lr_edge")) == edge]
            if chosen:
                ax.scatter(
                    [float(r["N"]) for r in chosen],
                    [r["lr_opt"] for r in chosen],
                    facecolors="none" if edge else colour,
                    edgecolors=colour,
                    label=None if edge else f"n_train={n_train:,}",
                )
    interior = [r for r in optima if r["n_train"] == sizes[-1] and not r.get("lr_edge")]
    if len({r["N"] for r in interior}) >= 2:
        n = np.asarray([float(r["N"]) for r in interior])
        c, k = fit_lr_rule(n, np.asarray([r["lr_opt"] for r in interior]))
        grid = np.geomspace(n.min(), n.max(), 50)
        ax.plot(grid, c * grid**k, "k--", label=f"lr* = {c:.3g} N^{k:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    readable_log_axis(ax.xaxis, np.asarray([float(r["N"]) for r in optima]))
    ax.set_xlabel(f"N ({optima[0].get('N_count', 'total')} parameters)" if optima else "N")
    ax.set_ylabel("optimal learning rate lr*")
    ax.set_title("lr*(N), fit over the largest data size (hollow: on the sweep's edge)", fontsize=9)
    ax.legend(fontsize=8)


def _size_of(rows: list[dict[str, Any]], model: str) -> float:
    return float(next(row["N"] for row in rows if row["model"] == model))
