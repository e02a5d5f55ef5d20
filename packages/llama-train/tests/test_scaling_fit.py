"""Scaling-law fits: known laws recovered from noisy points, the forms, fixed E, the CLI."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from llama_train.cli import app
from llama_train.errors import LlamaTrainError
from llama_train.scaling.fit import compute_optimal, fit_law

runner = CliRunner()
TRUTH = {"A": 40.0, "B": 300.0, "E": 0.9, "alpha": 0.4, "beta": 0.5}


def _points(noise: float = 0.005, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 5 x 5 grid over two decades of N and D, multiplicative log-normal noise."""
    rng = np.random.default_rng(seed)
    n = np.repeat(np.geomspace(1e3, 1e5, 5), 5)
    d = np.tile(np.geomspace(5e4, 5e6, 5), 5)
    clean = TRUTH["E"] + TRUTH["A"] / n ** TRUTH["alpha"] + TRUTH["B"] / d ** TRUTH["beta"]
    return n, d, clean * np.exp(rng.normal(0.0, noise, clean.shape))


@pytest.mark.integration
def test_recovers_a_known_law_inside_its_bootstrap_intervals():
    n, d, loss = _points()
    fit = fit_law(n, d, loss, bootstrap=40, seed=0)
    for name, true in TRUTH.items():
        low, high = fit.intervals[name]
        assert low <= true <= high, (name, true, fit.intervals[name])
    assert fit.parameters["alpha"] == pytest.approx(0.4, abs=0.03)
    assert fit.parameters["E"] == pytest.approx(0.9, abs=0.05)
    # The allocation follows from the exponents: N_opt ~ C^(beta/(alpha+beta)).
    optimal = compute_optimal(fit)
    alpha, beta = fit.parameters["alpha"], fit.parameters["beta"]
    assert optimal.a == pytest.approx(beta / (alpha + beta))
    assert optimal.a + optimal.b == pytest.approx(1.0)
    # N_opt * D_opt = C / 6 at every budget.
    assert optimal.n_opt(6e12) * optimal.d_opt(6e12) == pytest.approx(1e12, rel=1e-9)
    low, high = optimal.a_interval
    assert low <= 0.5 / 0.9 <= high


def test_noise_free_points_are_fitted_exactly_and_deterministically():
    n, d, loss = _points(noise=0.0)
    first = fit_law(n, d, loss)
    again = fit_law(n, d, loss)
    assert first.parameters == again.parameters
    for name, true in TRUTH.items():
        assert first.parameters[name] == pytest.approx(true, rel=1e-3)
    assert first.rms_log_residual < 1e-6


@pytest.mark.integration
def test_one_variable_forms_ignore_the_other_column():
    rng = np.random.default_rng(2)
    n = np.geomspace(1e3, 1e6, 12)
    loss = (0.5 + 20.0 / n**0.3) * np.exp(rng.normal(0, 0.002, n.shape))
    fit = fit_law(n, None, loss, form="N", bootstrap=30)
    assert fit.parameters["B"] is None and fit.parameters["beta"] is None
    for name, true in (("A", 20.0), ("alpha", 0.3), ("E", 0.5)):
        low, high = fit.intervals[name]
        assert low <= true <= high
    d = np.geomspace(1e4, 1e8, 12)
    loss = 1.2 + 50.0 / d**0.35
    fit = fit_law(None, d, loss, form="D")
    assert fit.parameters["A"] is None
    assert fit.parameters["beta"] == pytest.approx(0.35, rel=1e-3)
    assert fit.parameters["E"] == pytest.approx(1.2, rel=1e-3)


@pytest.mark.integration
def test_fixed_e_is_kept_and_zero_fits_a_pure_power_law():
    n, d, loss = _points()
    fixed = fit_law(n, d, loss, fixed_e=0.9, bootstrap=20)
    assert fixed.parameters["E"] == 0.9 and fixed.e_mode == "fixed"
    assert fixed.intervals["E"] is None
    assert fixed.parameters["alpha"] == pytest.approx(0.4, abs=0.02)
    assert fixed.parameters["beta"] == pytest.approx(0.5, abs=0.03)
    # With the true floor given, the exponents are tighter than with E free.
    free = fit_law(n, d, loss, bootstrap=20)
    width = lambda fit, name: fit.intervals[name][1] - fit.intervals[name][0]  # noqa: E731
    assert width(fixed, "beta") < width(free, "beta")
    excess = loss - 0.9
    pure = fit_law(n, d, np.clip(excess, 1e-6, None), fixed_e=0.0)
    assert pure.e_mode == "none" and pure.parameters["E"] == 0.0
    assert pure.parameters["alpha"] == pytest.approx(0.4, abs=0.05)


def test_bad_inputs_are_one_line_errors():
    n, d, loss = _points()
    # A point at the floor (sampling noise) is a residual, not an error; its excess has no log.
    assert fit_law(n, d, loss, fixed_e=float(loss.min())).n_points == len(loss)
    with pytest.raises(LlamaTrainError, match="finite and positive"):
        fit_law(n, d, loss - float(loss.min()), fixed_e=0.0)
    with pytest.raises(LlamaTrainError, match="finite and positive"):
        fit_law(n, d, np.where(np.arange(len(loss)) == 3, -1.0, loss))
    pick = [0, 6, 12]  # three distinct N and D
    with pytest.raises(LlamaTrainError, match="free parameters"):
        fit_law(n[pick], d[pick], loss[pick])
    with pytest.raises(LlamaTrainError, match="every row has N = 1000"):
        fit_law(n[:5], d[:5], loss[:5])


# ---------------------------------------------------------------------------
# llama-train fit


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def table(tmp_path: Path) -> Path:
    """Someone else's table: other column names, and an entropy column."""
    n, d, loss = _points()
    rows = [[f"run{i}", a, b, c, 0.9] for i, (a, b, c) in enumerate(zip(n, d, loss, strict=True))]
    return _write_csv(tmp_path / "runs.csv", ["run", "params", "tokens", "val", "floor"], rows)


@pytest.mark.integration
def test_fit_reads_any_csv_and_prints_json_with_intervals(table: Path):
    columns = ["--n-col", "params", "--d-col", "tokens", "--loss-col", "val"]
    result = runner.invoke(app, ["fit", str(table), *columns, "--bootstrap", "10", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    for name in ("A", "B", "E", "alpha", "beta"):
        assert isinstance(data[name], float)
        low, high = data["intervals"][name]
        assert low <= data[name] <= high
    assert data["E"] == pytest.approx(0.9, abs=0.05)
    assert data["compute_optimal"]["a"] == pytest.approx(
        data["beta"] / (data["alpha"] + data["beta"])
    )
    few = ["--bootstrap", "10", "--json"]
    exact = runner.invoke(
        app, ["fit", str(table), *columns, "--entropy-col", "floor", "--fix-E", "exact", *few]
    )
    assert exact.exit_code == 0, exact.output
    assert json.loads(exact.output)["E"] == 0.9
    value = runner.invoke(app, ["fit", str(table), *columns, "--fix-E", "0.85", *few])
    assert json.loads(value.output)["E"] == 0.85
    one = runner.invoke(app, ["fit", str(table), *columns, "--form", "N", *few])
    assert json.loads(one.output)["B"] is None
    shown = runner.invoke(app, ["fit", str(table), *columns, "--bootstrap", "5"])
    assert shown.exit_code == 0 and "alpha" in shown.output and "N_opt ~ C^" in shown.output


@pytest.mark.parametrize(
    ("content", "options", "message"),
    [
        (None, [], "table not found"),
        ("", [], "is empty"),
        ("N,D,loss\n", [], "has a header but no rows"),
        ("N,D,val\n1,2,3\n", [], "has no column 'loss'"),
        ("N,D,loss\n1000,5e4,abc\n", [], "line 2: loss='abc' is not a number"),
        ("N,D,loss\n1000,5e4,nan\n", [], "line 2: loss=nan is not finite"),
        ("N,D,loss\n1000,5e4,2\n", ["--fix-E", "exact"], "has no column 'entropy'"),
        ("N,D,loss\n1000,5e4,2\n", ["--fix-E", "low"], "give a number or 'exact'"),
        ("N,D,loss\n1000,5e4,2\n", ["--form", "X"], "--form 'X'"),
        ("N,D,loss,regime\n1,2,3,a\n1,2,3,b\n", [], "holds 2 regimes (a, b)"),
    ],
)
def test_bad_tables_are_one_line_errors(tmp_path: Path, content, options, message):
    path = tmp_path / "points.csv"
    if content is not None:
        path.write_text(content)
    result = runner.invoke(app, ["fit", str(path), *options])
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) <= 2  # one message (rich may wrap it once)


def test_regime_selects_rows(tmp_path: Path):
    n, d, loss = _points()
    rows = [[a, b, c, "x"] for a, b, c in zip(n, d, loss, strict=True)]
    rows += [[a, b, 2 * c, "y"] for a, b, c in zip(n, d, loss, strict=True)]
    path = _write_csv(tmp_path / "two.csv", ["N", "D", "loss", "regime"], rows)
    x = json.loads(
        runner.invoke(app, ["fit", str(path), "--regime", "x", "--bootstrap", "0", "--json"]).output
    )
    y = json.loads(
        runner.invoke(app, ["fit", str(path), "--regime", "y", "--bootstrap", "0", "--json"]).output
    )
    assert x["n_points"] == y["n_points"] == 25
    assert y["E"] == pytest.approx(2 * x["E"], rel=0.05)
    assert math.isfinite(x["alpha"])
