"""Study figures: every view is written, axes stay readable on narrow log ranges."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from llama_train.scaling.plots import plot_study, readable_log_axis
from llama_train.scaling.regime_fits import fit_regimes

matplotlib = pytest.importorskip("matplotlib")


def _rows(tmp_path: Path) -> list[dict]:
    """A 4 x 4 study on a known law, with eval curves for the largest model."""
    rows = []
    entropy = 0.8
    for n in (4e3, 1e4, 3e4, 1e5):
        for d in (3e4, 6e4, 1.2e5, 2.4e5):
            loss = entropy + 30 / n**0.4 + 200 / d**0.5
            run_dir = tmp_path / f"n{n:g}-d{d:g}"
            run_dir.mkdir()
            lines = [{"step": 10, "tokens": 10 * 4096, "loss": loss + 0.2}]
            lines += [{"step": 10, "eval/loss": loss + 0.1}, {"step": 20, "eval/loss": loss}]
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
            rows.append(
                {
                    "regime": "r",
                    "N": n,
                    "D": d,
                    "n_train": d / 256,
                    "loss": loss,
                    "entropy": entropy,
                    "excess": loss - entropy,
                    "flops": 6 * n * d * 2,
                    "run_dir": str(run_dir),
                }
            )
    return rows


def test_every_view_is_written(tmp_path: Path):
    fits = fit_regimes(_rows(tmp_path), bootstrap=0)
    assert fits[0].free.parameters["alpha"] == pytest.approx(0.4, rel=1e-2)
    assert fits[0].exact.parameters["E"] == pytest.approx(0.8)
    paths = plot_study(tmp_path, fits, tmp_path / "plots")
    assert [path.name for path in paths] == ["r-loss.png", "r-excess.png", "r-epochs.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 20_000


def test_a_narrow_log_range_gets_several_labels():
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots()
    values = np.array([3e3, 1.2e4])
    ax.plot(values, [1, 2])
    ax.set_xscale("log")
    readable_log_axis(ax.xaxis, values)
    figure.canvas.draw()
    labels = [tick.get_text() for tick in ax.get_xticklabels() if tick.get_text()]
    visible = [text for text in labels if text in ("5k", "10k", "2k", "20k")]
    assert {"5k", "10k"} <= set(visible), labels
    plt.close(figure)


def test_regimes_without_enough_points_are_skipped_and_floor_points_leave_the_excess_fit(
    tmp_path: Path,
):
    rows = _rows(tmp_path)
    rows[0] = {**rows[0], "loss": 0.8}  # at the floor: no log excess
    few = [{**row, "regime": "few"} for row in rows[:3]]
    said: list[str] = []
    fits = fit_regimes(rows + few, bootstrap=0, log=said.append)
    assert [fit.regime for fit in fits] == ["r"]
    assert fits[0].excess.n_points == len(rows) - 1 and fits[0].free.n_points == len(rows)
    assert any("few: 3 finished point(s)" in line for line in said)
    assert any("1 point(s) at or below the floor" in line for line in said)


@pytest.mark.integration
def test_study_plot_prints_the_validation_and_writes_it(tmp_path: Path, monkeypatch):
    """`study plot` on a study's table: the E = exact fit is validated by holdout,
    leave-future-out and recovery, printed under its table and kept in fits.json."""
    from typer.testing import CliRunner

    from llama_train.cli import app
    from llama_train.cli import study as cli_study
    from llama_train.launch import study
    from llama_train.scaling import points

    rows = _rows(tmp_path)
    rng = np.random.default_rng(0)
    for row in rows:
        row["loss"] = 0.8 + (row["loss"] - 0.8) * math.exp(rng.normal(0.0, 0.002))
        row["group"] = row["run_dir"]
        row["lr"] = 0.01  # one lr: no sweep figure
    monkeypatch.setattr(study, "ensure_validation", lambda directory, log=None: 0)
    monkeypatch.setattr(points, "collect", lambda directory, **_: rows)
    monkeypatch.setattr(cli_study, "_say_missing", lambda directory: None)  # no study.json here
    result = CliRunner().invoke(
        app,
        ["study", "plot", str(tmp_path), "--bootstrap", "5", "--recovery", "2"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "r, E = exact: holdout of the largest model (N = 100,000, 4 row(s))" in text
    assert "r, E = exact: leave-future-out over compute" in text
    assert "threshold 1% of the loss" in text and "recovery: 2 tables" in text
    assert "3: vpnls fit" in text and "2: isoFLOP" in text
    record = json.loads((tmp_path / "plots" / "fits.json").read_text())[0]
    assert record["exact_E"]["method"] == "vpnls" and record["free_E"]["method"] == "lbfgs"
    assert record["validation"]["holdout_largest"]["passed"] is True
    assert record["validation"]["recovery"]["replicates"] == 2
    assert [item["approach"] for item in record["approaches"]] == ["1: frontier", "2: isoFLOP"]


def test_a_regime_that_cannot_be_fitted_is_named_and_the_others_are_fitted(tmp_path: Path):
    rows = _rows(tmp_path)
    single = [{**row, "regime": "one-size", "N": 1e4} for row in rows]
    below = [{**row, "regime": "under", "loss": 0.5} for row in rows]
    said: list[str] = []
    fits = fit_regimes(rows + single + below, bootstrap=0, log=said.append)
    assert [fit.regime for fit in fits] == ["r"]
    assert any(line.startswith("one-size: not fitted: every row has N = 10000") for line in said)
    assert any(line.startswith("under: not fitted:") for line in said), said


def test_the_n_axis_names_the_count_the_table_uses():
    from types import SimpleNamespace

    from llama_train.scaling.plots import _n_label

    assert _n_label(SimpleNamespace(rows=[{"N_count": "total"}])) == "N (total parameters)"
    assert _n_label(SimpleNamespace(rows=[{"N_count": "non-embedding"}])) == (
        "N (non-embedding parameters)"
    )


def _isoflop_rows(tmp_path: Path) -> list[dict]:
    """A 5 x 5 grid with N and D doubling: its diagonals are exact isoFLOP levels."""
    rows: list[dict] = []
    entropy = 0.8
    for i in range(5):
        for j in range(5):
            n, d = 1e4 * 2**i, 3e4 * 2**j
            loss = entropy + 30 / n**0.4 + 200 / d**0.5
            rows.append(
                {
                    "regime": "r",
                    "N": n,
                    "D": d,
                    "n_train": d / 256,
                    "loss": loss,
                    "entropy": entropy,
                    "excess": loss - entropy,
                    "flops": 6 * n * d,
                    "run_dir": str(tmp_path / f"missing-{i}-{j}"),
                }
            )
    return rows


@pytest.mark.integration
def test_the_isoflop_figure_is_drawn_for_isoflop_levels_and_skipped_with_a_reason(
    tmp_path: Path,
):
    from llama_train.scaling.approaches import approach2

    rows = _isoflop_rows(tmp_path)
    allocation = approach2(*(np.asarray([row[k] for row in rows]) for k in ("N", "D", "loss")))
    assert len(allocation.n_opt) >= 2  # levels with minima inside their N range to draw
    said: list[str] = []
    paths = plot_study(tmp_path, fit_regimes(rows, bootstrap=0), tmp_path / "iso", log=said.append)
    figure = tmp_path / "iso" / "r-isoflop.png"
    assert figure in paths and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure.stat().st_size > 20_000 and not said
    said.clear()
    plain = tmp_path / "plain"
    plain.mkdir()
    paths = plot_study(
        tmp_path, fit_regimes(_rows(plain), bootstrap=0), tmp_path / "no", log=said.append
    )
    assert not (tmp_path / "no" / "r-isoflop.png").exists()
    assert not any(path.name.endswith("isoflop.png") for path in paths)
    assert said == [
        "r: no isoFLOP figure: no compute level holds 3 distinct N (approach 2 needs an "
        "isoFLOP grid: N and D geometric with one ratio)"
    ]
