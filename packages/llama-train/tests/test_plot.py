"""`llama-train plot` and `report`: readable axes on any range, several runs, one HTML file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import pytest
from typer.testing import CliRunner

from llama_train.analysis.html_report import nice_ticks
from llama_train.analysis.plot import draw_runs
from llama_train.analysis.runs import load_runs
from llama_train.cli import app
from llama_train.errors import LlamaTrainError

matplotlib.use("Agg")
runner = CliRunner()
TOKENS_PER_STEP = 128
LN2 = math.log(2)
ENTROPY = 2.75  # a narrow loss range: 2.76 .. 2.9 nats


def _write_run(run_dir: Path, scale: float, steps: int = 8) -> Path:
    """A run directory as the trainer writes it: lines, evaluations, summary."""
    (run_dir / "eval").mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        loss = ENTROPY + scale / step
        lines.append({"step": step, "loss": loss, "tokens": step * TOKENS_PER_STEP})
        if step % 4 == 0:
            excess = scale / (step + 1)
            lines.append(
                {
                    "step": step,
                    "eval/loss": ENTROPY + excess,
                    "eval/entropy": ENTROPY,
                    "eval/excess": excess,
                }
            )
            positions = 8
            (run_dir / "eval" / f"step_{step:06d}.json").write_text(
                json.dumps(
                    {
                        "step": step,
                        "split": "test",
                        "n_sequences": 16,
                        "loss": ENTROPY + excess,
                        "entropy": ENTROPY,
                        "entropy_method": "exact",
                        "loss_per_position": [ENTROPY + excess * (9 - t) / 4 for t in range(1, 9)],
                        "entropy_per_position": [ENTROPY] * positions,
                        "excess": excess,
                        "loss_bits": (ENTROPY + excess) / LN2,
                        "entropy_bits": ENTROPY / LN2,
                        "excess_bits": excess / LN2,
                    }
                )
            )
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run_dir / "summary.json").write_text(
        json.dumps({"step": steps, "test_loss": 2.8, "baselines": {"unigram_bits": 4.2}})
    )
    return run_dir


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    for name, scale in (("optim.lr=0.001", 0.15), ("optim.lr=0.003", 0.1)):
        _write_run(tmp_path / "sweep" / name, scale)
    return tmp_path / "sweep"


def _visible_labels(axis, low: float, high: float) -> list[str]:
    ticks = axis.get_majorticklocs()
    labels = [label.get_text() for label in axis.get_majorticklabels()]
    return [text for tick, text in zip(ticks, labels, strict=True) if low <= tick <= high and text]


def test_a_narrow_loss_range_still_has_labelled_ticks_in_nats_and_bits(sweep: Path) -> None:
    runs = load_runs([sweep / "optim.lr=0.001"])
    figure = draw_runs(runs)
    figure.canvas.draw()
    loss_axes, excess_axes, positions = figure.axes
    low, high = loss_axes.get_ylim()
    assert high / low < 1.4  # within one decade: matplotlib alone labels nothing here
    nats = _visible_labels(loss_axes.yaxis, low, high)
    assert len(nats) >= 3, nats
    children = [child for axes in figure.axes for child in axes.child_axes]
    bits_axes = [a for a in children if a.get_ylabel() == "bits"]
    assert len(bits_axes) == 3  # every panel in nats has a bits axis
    assert excess_axes.get_yscale() == "log"
    bits_low, bits_high = low / math.log(2), high / math.log(2)
    assert len(_visible_labels(bits_axes[0].yaxis, bits_low, bits_high)) >= 3
    assert loss_axes.get_xlabel().startswith("predicted tokens")
    assert any(a.get_xlabel() == "step" for a in children)  # steps on top for one run
    # The position panel shows the excess (one curve), not loss and entropy side by side.
    [curve] = [line for line in positions.get_lines() if len(line.get_xdata()) == 8]
    assert curve.get_ydata()[0] == pytest.approx(0.15 / 9 * 2)


def test_several_runs_are_overlaid_from_a_sweep_folder(sweep: Path, tmp_path: Path) -> None:
    runs = load_runs([sweep])
    assert [run.name for run in runs] == ["optim.lr=0.001", "optim.lr=0.003"]
    assert runs[1].eval_tokens == [4 * TOKENS_PER_STEP, 8 * TOKENS_PER_STEP]
    figure = draw_runs(runs, x="steps")
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert "optim.lr=0.001" in legend and "optim.lr=0.003" in legend
    result = runner.invoke(app, ["plot", str(sweep), "--out", str(tmp_path / "all.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "all.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nice_ticks_label_narrow_and_wide_log_ranges() -> None:
    narrow = nice_ticks(2.74, 2.91)
    assert len(narrow) >= 3 and all(2.74 <= t <= 2.91 for t in narrow)
    assert all(abs(t * 100 - round(t * 100)) < 1e-9 for t in narrow)  # round values
    assert nice_ticks(0.003, 0.6) == pytest.approx([0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5])


def test_the_report_is_one_self_contained_html_file(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report" / "runs.html"
    result = runner.invoke(app, ["report", str(sweep), "--html", str(out)])
    assert result.exit_code == 0, result.output
    html = out.read_text()
    assert "<script src=" not in html  # nothing fetched: plotly.js is inlined
    assert "Plotly.newPlot" in html and len(html) > 1_000_000
    assert "optim.lr=0.001" in html and "optim.lr=0.003" in html


def test_a_folder_without_losses_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(LlamaTrainError, match="no run directory"):
        load_runs([tmp_path])
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(LlamaTrainError, match="no loss to plot"):
        load_runs([tmp_path])
    result = runner.invoke(app, ["plot", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "is not a directory" in result.stderr


def test_saving_the_plot_renders_the_figure_once_and_keeps_every_label_inside(
    sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A layout engine left on the figure makes savefig render it twice (a third of the cost)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from llama_train.analysis.plot import plot_runs

    runs = load_runs([sweep / "optim.lr=0.001"])
    figure = draw_runs(runs)
    assert figure.get_layout_engine() is None
    renderer = figure.canvas.get_renderer()
    box = figure.bbox
    for axes in figure.axes:  # tick labels, axis labels and titles inside the image
        extent = axes.get_tightbbox(renderer)
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1, axes.get_title()
        assert box.y0 <= extent.y0 and extent.y1 <= box.y1, axes.get_title()
    matplotlib.pyplot.close(figure)
    draws = []
    original = FigureCanvasAgg.draw
    monkeypatch.setattr(FigureCanvasAgg, "draw", lambda self: draws.append(1) or original(self))
    plot_runs(runs, tmp_path / "loss.png")
    assert len(draws) == 1 and (tmp_path / "loss.png").stat().st_size > 0


def test_every_plot_without_matplotlib_is_one_line_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`plot` (and every other figure, through the one guard) without matplotlib installed."""
    import sys

    for name in [name for name in sys.modules if name.startswith("matplotlib")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    run = _write_run(tmp_path / "run", 1.0)
    result = CliRunner().invoke(app, ["plot", str(run), "--out", str(tmp_path / "p.png")])
    assert result.exit_code != 0
    assert "plotting needs matplotlib: pip install 'llama-train[plot]'" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "p.png").exists()
