"""`llama-train plot`: one PNG that reads on any range, for one run or many.

Three panels, every run overlaid (a folder of runs or a sweep directory):

1. loss against predicted tokens (training lines, evaluations as dots) with
   the exact entropy of the evaluation set as the floor, log-scaled y in nats
   with a bits axis on the right, and for a single run a steps axis on top;
2. the excess loss (evaluation loss minus exact entropy) against tokens,
   log-log: the approach to the floor, which a loss curve flattens away;
3. the excess loss at each position of the latest evaluation (one curve per
   run rather than a loss and an entropy curve that differ by a hair).

Log axes get labelled ticks however narrow their range: within a decade
matplotlib's default labels no tick at all, so there ticks are placed at
round values.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from llama_train.analysis.runs import LN2, RunData, load_runs
from llama_train.errors import LlamaTrainError


def readable_log_axis(axis: Any, low: float, high: float) -> None:
    """Labelled ticks on a log axis spanning `low`..`high` (> 0), at least three of them.

    Across decades: 1, 2, 5 x 10^k. Within about a decade: round values from
    MaxNLocator (a log axis may carry linearly spaced ticks), so a loss
    between 2.7 and 2.9 nats reads 2.70, 2.75, 2.80, ...
    """
    from matplotlib import ticker

    if high / low >= 8:
        axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    else:
        axis.set_major_locator(ticker.MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
        axis.set_major_formatter(ticker.ScalarFormatter(useOffset=False))
    axis.set_minor_formatter(ticker.NullFormatter())


def _limits(values: list[float], pad: float = 1.15) -> tuple[float, float] | None:
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    if not positive:
        return None
    return min(positive) / pad, max(positive) * pad


def plot_runs(runs: list[RunData], out: str | Path, *, x: str = "tokens") -> Path:
    """Draw the three panels for `runs` into `out` (PNG); x is `tokens` or `steps`."""
    from llama_train.scaling.plots import pyplot, save_png

    plt = pyplot()
    figure = draw_runs(runs, x=x)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_png(figure, target, dpi=120)
    plt.close(figure)
    return target


def draw_runs(runs: list[RunData], *, x: str = "tokens") -> Any:
    """The matplotlib figure of :func:`plot_runs` (the caller closes it)."""
    if x not in ("tokens", "steps"):
        raise LlamaTrainError(f"--x {x!r}: choose tokens or steps")
    from llama_train.scaling.plots import pyplot

    plt = pyplot()
    figure, (curve, excess, positions) = plt.subplots(1, 3, figsize=(17, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    losses: list[float] = []
    excesses: list[float] = []
    for index, run in enumerate(runs):
        color = colors[index % len(colors)]
        label = run.name if len(runs) > 1 else None
        train_x = run.train_tokens if x == "tokens" else run.train_steps
        eval_x = run.eval_tokens if x == "tokens" else run.eval_steps
        if run.train_loss:
            curve.plot(train_x, run.train_loss, color=color, linewidth=1, alpha=0.8, label=label)
            losses += run.train_loss
        if run.eval_loss:
            curve.plot(eval_x, run.eval_loss, "o", color=color, markersize=3.5)
            losses += run.eval_loss
            excess.plot(eval_x, run.eval_excess, "o-", color=color, markersize=3, label=label)
            excesses += run.eval_excess
        if run.position_excess:
            positions.plot(
                range(1, len(run.position_excess) + 1),
                run.position_excess,
                color=color,
                label=f"{run.name}, step {run.position_step}" if len(runs) > 1 else None,
            )
    floors = sorted({run.entropy for run in runs if run.entropy is not None})
    for floor in floors:
        curve.axhline(floor, color="black", linestyle="--", linewidth=1)
        losses.append(floor)
    if len(floors) == 1:
        curve.plot([], [], color="black", linestyle="--", label=f"exact entropy {floors[0]:.4f}")
    if len(runs) == 1:
        for key, name, style in (("unigram_bits", "unigram", ":"), ("zstd_bits", "zstd", "-.")):
            nats = runs[0].baseline_nats(key)
            if nats is not None:
                curve.axhline(nats, color="grey", linestyle=style, label=f"{name} {nats:.4f}")
                losses.append(nats)
    x_label = "predicted tokens" if x == "tokens" else "step"
    _loss_panel(curve, losses, x_label, runs, x)
    _excess_panel(excess, excesses, x_label)
    positions.axhline(0.0, color="black", linewidth=0.8)
    positions.set_xlabel("position t (predicting x_t from x_<t)")
    positions.set_ylabel("excess loss, nats (model - exact entropy)")
    positions.set_title("excess loss by position, latest evaluation")
    _bits_axis(positions)
    positions.grid(alpha=0.3)
    if len(runs) > 1:
        positions.legend(fontsize="x-small")
    title = runs[0].name if len(runs) == 1 else f"{len(runs)} runs"
    figure.suptitle(f"{title}: loss against the exact entropy")
    # Fixed margins, not tight_layout: that measures every tick label once more, and
    # leaves a layout engine behind that makes savefig render the whole figure twice
    # (about 2.5x the drawing). These fit the labels above on any range (the tick
    # labels are short: readable_log_axis), the top axis of steps included.
    figure.subplots_adjust(**_MARGINS)
    return figure


_MARGINS = {"left": 0.05, "right": 0.955, "bottom": 0.125, "top": 0.77, "wspace": 0.34}


def _bits_axis(axes: Any) -> Any:
    bits = axes.secondary_yaxis("right", functions=(lambda n: n / LN2, lambda b: b * LN2))
    bits.set_ylabel("bits")
    return bits


def _log_log_nats(
    axes: Any, limits: tuple[float, float] | None, x_label: str, y_label: str
) -> None:
    """Log-log axes in nats with labelled ticks on any range, and a bits axis on the right."""
    axes.set_xscale("log")
    axes.set_yscale("log")
    if limits:
        axes.set_ylim(*limits)
        readable_log_axis(axes.yaxis, *limits)
    bits = _bits_axis(axes)
    if limits:
        readable_log_axis(bits.yaxis, limits[0] / LN2, limits[1] / LN2)
    axes.set_xlabel(f"{x_label} (log scale)")
    axes.set_ylabel(f"{y_label} (log scale)")


def _loss_panel(axes: Any, losses: list[float], x_label: str, runs: list[RunData], x: str) -> None:
    _log_log_nats(axes, _limits(losses, pad=1.03), x_label, "loss, nats per token")
    axes.set_title("loss; dashed: exact entropy (the floor)")
    per_step = runs[0].tokens_per_step if len(runs) == 1 else None
    if x == "tokens" and per_step:
        steps = axes.secondary_xaxis(
            "top", functions=(lambda t: t / per_step, lambda s: s * per_step)
        )
        steps.set_xlabel("step")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize="x-small")


def _excess_panel(axes: Any, excesses: list[float], x_label: str) -> None:
    _log_log_nats(axes, _limits(excesses), x_label, "excess loss, nats")
    axes.set_title("test loss - exact entropy")
    axes.grid(alpha=0.3, which="both")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="x-small")


def plot(paths: list[str | Path], out: str | Path | None = None, *, x: str = "tokens") -> Path:
    """`llama-train plot`: the runs under `paths`; by default into `<first path>/loss.png`."""
    runs = load_runs(paths)
    if out is None:
        out = Path(paths[0]) / "loss.png"
    return plot_runs(runs, out, x=x)
