"""`llama-train report DIR... --html OUT.html`: the plot's figures, interactive, in one file.

The same three panels as `llama-train plot` (loss against tokens with the
exact entropy, excess loss against tokens, excess loss by position), every
run overlaid and toggled from the legend, hover giving nats and bits, and a
table of each run's final figures and throughput. The HTML inlines plotly.js,
so it opens offline and can be mailed or attached as is. The notebook
`notebooks/runs.ipynb` draws the same figure with :func:`report_figure`.

A study directory among the paths also marks its lr sweeps (:func:`lr_marks`): the run
that won each point's sweep gets "best of K lr" in the table's "lr sweep" column, and
when that best is the smallest or largest lr tried (collect's ``lr_edge``) the column
says which edge and the run's legend name carries "[lr edge: low]" or "[lr edge: high]":
the optimum may lie outside the sweep, so the point's loss may not be its tuned loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_train.analysis.runs import LN2, RunData, load_runs
from llama_train.errors import LlamaTrainError
from llama_train.rundir import RunSummary, atomic_write

PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
HOVER = "%{x:.4g}: %{y:.5f} nats = %{customdata:.5f} bits<extra>%{fullData.name}</extra>"


def nice_ticks(low: float, high: float) -> list[float]:
    """Tick values for a log axis over low..high (> 0): 1-2-5 per decade, or round steps within one.

    Within about a decade plotly's log axis labels few or no ticks; round
    linear steps (0.05, 0.1, 0.25 ...) keep at least three labels there.
    """
    if high / low >= 8:
        ticks = []
        for exponent in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1):
            ticks += [m * 10.0**exponent for m in (1, 2, 5)]
        return [t for t in ticks if low <= t <= high]
    raw = (high - low) / 5
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def _log_axis(values: list[float], pad: float) -> dict[str, Any]:
    """Plotly settings of a log axis covering `values`, ticks labelled in nats and bits."""
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    if not positive:
        return {"type": "log"}
    low, high = min(positive) / pad, max(positive) * pad
    ticks = nice_ticks(low, high)
    return {
        "type": "log",
        "range": [math.log10(low), math.log10(high)],
        "tickvals": ticks,
        "ticktext": [f"{t:.4g} ({t / LN2:.3g} b)" for t in ticks],
    }


@dataclass(frozen=True)
class LrMark:
    """A run that won its point's lr sweep: how many lr were tried, and the edge the best
    is on ("low", "high", or "" inside the sweep)."""

    tried: int
    edge: str

    def text(self) -> str:
        note = f"best of {self.tried} lr"
        return note + (f"; on the {self.edge} edge: widen the sweep" if self.edge else "")


def lr_marks(paths: list[str | Path]) -> dict[Path, LrMark]:
    """The winning run of each lr sweep in the study directories among `paths`, by
    resolved run directory.

    A folder that is not a readable study (no study.json, or one collect refuses) marks
    nothing: the report still draws its runs.
    """
    from llama_train.scaling.points import collect

    marks: dict[Path, LrMark] = {}
    for path in map(Path, paths):
        if not (path / "study.json").is_file():
            continue
        try:
            rows = collect(path)
        except LlamaTrainError:
            continue
        for row in rows:
            tried = int(row.get("lr_tried") or 1)
            if tried < 2:
                continue
            marks[Path(row["run_dir"]).resolve()] = LrMark(tried, str(row.get("lr_edge") or ""))
    return marks


def report_figure(
    runs: list[RunData], *, x: str = "tokens", marks: dict[Path, LrMark] | None = None
) -> Any:
    """The plotly figure: three panels and a table of final figures, every run overlaid.

    `marks` (:func:`lr_marks`): a note per run directory for the table's "lr sweep" column;
    a run whose sweep optimum is on an edge says so in its legend name.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    figure = make_subplots(
        rows=2,
        cols=3,
        row_heights=[0.7, 0.3],
        specs=[[{}, {}, {}], [{"type": "table", "colspan": 3}, None, None]],
        subplot_titles=(
            "loss; dashed: exact entropy (the floor)",
            "excess loss (test loss - exact entropy)",
            "excess loss by position, latest evaluation",
        ),
        vertical_spacing=0.12,
    )
    found = [(marks or {}).get(run.path.resolve()) for run in runs]
    losses: list[float] = []
    excesses: list[float] = []
    for index, (run, mark) in enumerate(zip(runs, found, strict=True)):
        color = PALETTE[index % len(PALETTE)]
        name = run.name + (f" [lr edge: {mark.edge}]" if mark and mark.edge else "")
        train_x = run.train_tokens if x == "tokens" else run.train_steps
        eval_x = run.eval_tokens if x == "tokens" else run.eval_steps
        common = {"legendgroup": run.name, "hovertemplate": HOVER}
        figure.add_trace(
            go.Scatter(
                x=train_x,
                y=run.train_loss,
                customdata=[v / LN2 for v in run.train_loss],
                name=name,
                mode="lines",
                line={"color": color, "width": 1},
                **common,
            ),
            row=1,
            col=1,
        )
        figure.add_trace(
            go.Scatter(
                x=eval_x,
                y=run.eval_loss,
                customdata=[v / LN2 for v in run.eval_loss],
                name=f"{name} (test)",
                mode="markers",
                marker={"color": color, "size": 6},
                showlegend=False,
                **common,
            ),
            row=1,
            col=1,
        )
        figure.add_trace(
            go.Scatter(
                x=eval_x,
                y=run.eval_excess,
                customdata=[v / LN2 for v in run.eval_excess],
                name=name,
                mode="lines+markers",
                marker={"color": color, "size": 5},
                line={"color": color},
                showlegend=False,
                **common,
            ),
            row=1,
            col=2,
        )
        figure.add_trace(
            go.Scatter(
                x=list(range(1, len(run.position_excess) + 1)),
                y=run.position_excess,
                customdata=[v / LN2 for v in run.position_excess],
                name=name,
                mode="lines",
                line={"color": color},
                showlegend=False,
                **common,
            ),
            row=1,
            col=3,
        )
        losses += run.train_loss + run.eval_loss
        excesses += run.eval_excess
        if run.entropy is not None:
            figure.add_hline(
                y=run.entropy, line={"color": "black", "dash": "dash", "width": 1}, row=1, col=1
            )
            losses.append(run.entropy)
    figure.add_trace(_table(runs, found), row=2, col=1)
    x_title = "predicted tokens" if x == "tokens" else "step"
    figure.update_xaxes(type="log", title_text=x_title, row=1, col=1)
    figure.update_xaxes(type="log", title_text=x_title, row=1, col=2)
    figure.update_xaxes(title_text="position t", row=1, col=3)
    figure.update_yaxes(title_text="nats (bits)", **_log_axis(losses, 1.03), row=1, col=1)
    figure.update_yaxes(title_text="nats (bits)", **_log_axis(excesses, 1.15), row=1, col=2)
    figure.update_yaxes(title_text="nats", zeroline=True, row=1, col=3)
    title = runs[0].name if len(runs) == 1 else f"{len(runs)} runs"
    figure.update_layout(
        title=f"{title}: loss against the exact entropy",
        height=820,
        template="plotly_white",
        legend={"title": "runs (click to hide)"},
    )
    return figure


def _table(runs: list[RunData], marks: list[LrMark | None]) -> Any:
    import plotly.graph_objects as go

    def column(figure: Callable[[RunSummary], float | None], fmt: str) -> list[str]:
        values = [figure(run.summary) if run.summary else None for run in runs]
        return ["-" if value is None else format(value, fmt) for value in values]

    columns = {
        "run": [run.name for run in runs],
        "step": column(lambda summary: summary.step, "d"),
        "test loss (nats)": column(lambda summary: summary.test_loss, ".5f"),
        "exact entropy": column(lambda summary: summary.test_entropy, ".5f"),
        "excess (nats)": column(lambda summary: summary.excess_loss, ".5f"),
        "excess (bits)": column(lambda summary: summary.excess_loss_bits, ".5f"),
        "parameters": column(lambda summary: summary.parameters, ","),
        "tokens": column(lambda summary: summary.tokens, ","),
        "tokens/s": column(lambda summary: summary.tokens_per_s, ",.0f"),
    }
    if any(marks):
        columns["lr sweep"] = [mark.text() if mark else "-" for mark in marks]
    return go.Table(
        header={"values": list(columns), "align": "left"},
        cells={"values": list(columns.values()), "align": "left"},
    )


def write_report(paths: list[str | Path], out: str | Path, *, x: str = "tokens") -> Path:
    """Write the self-contained HTML report of the runs under `paths`."""
    figure = report_figure(load_runs(paths), x=x, marks=lr_marks(paths))
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    html = figure.to_html(include_plotlyjs=True, full_html=True)
    return atomic_write(target, html)  # a full disk leaves no half report
