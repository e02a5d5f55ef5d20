"""Fits weighted by the seed noise of each point: closer to the truth when noise differs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from llama_train.cli import app
from llama_train.scaling.fit import fit_law
from llama_train.scaling.noise import FLOOR_FRACTION, relative_scale
from llama_train.scaling.vpnls import fit_vpnls

runner = CliRunner()
N_GRID = np.array([4656.0, 17504.0, 57072.0, 108864.0])
D_GRID = np.array([32768.0, 65536.0, 131072.0, 262144.0])
TRUTH = {"E": 2.0986, "A": 4.0, "alpha": 0.3, "B": 60.0, "beta": 0.5}
SEEDS = 3


def _law(n: np.ndarray, d: np.ndarray) -> np.ndarray:
    return TRUTH["E"] + TRUTH["A"] / n ** TRUTH["alpha"] + TRUTH["B"] / d ** TRUTH["beta"]


# Each point's relative seed noise, fixed over the replicates: from 0.05% to 2%, mixed
# over the grid, so no single region of (N, D) is the noisy one.
RELATIVE_SD = np.geomspace(5e-4, 2e-2, 16)[np.random.default_rng(7).permutation(16)]


def seed_table(replicate: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(N, D, loss, loss_seed_std): one row per seed, the sample sd of its point's seeds."""
    rng = np.random.default_rng(1000 + replicate)
    n = np.repeat(np.repeat(N_GRID, 4), SEEDS)
    d = np.repeat(np.tile(D_GRID, 4), SEEDS)
    sd = np.repeat(RELATIVE_SD, SEEDS)
    loss = _law(n, d) * (1.0 + rng.normal(0.0, 1.0, n.shape) * sd)
    std = np.repeat(loss.reshape(16, SEEDS).std(axis=1, ddof=1), SEEDS)
    return n, d, loss, std


def _errors(fitter, replicates: int, **options) -> tuple[float, float]:
    """RMS error of alpha and beta over replicates, unweighted and weighted."""
    plain, weighted = [], []
    for replicate in range(replicates):
        n, d, loss, std = seed_table(replicate)
        for noise, errors in ((None, plain), (std, weighted)):
            fit = fitter(n, d, loss, fixed_e=TRUTH["E"], noise=noise, **options)
            errors.append([fit.parameters[k] - TRUTH[k] for k in ("alpha", "beta")])
    return (
        float(np.sqrt(np.mean(np.square(plain)))),
        float(np.sqrt(np.mean(np.square(weighted)))),
    )


@pytest.mark.integration
def test_weighted_vpnls_is_closer_to_the_truth_than_unweighted():
    plain, weighted = _errors(fit_vpnls, 24)
    assert weighted < 0.7 * plain, (plain, weighted)


def test_weighted_approach_3_is_closer_to_the_truth_than_unweighted():
    plain, weighted = _errors(fit_law, 8, starts=5)
    assert weighted < 0.8 * plain, (plain, weighted)


def test_noise_proportional_to_the_loss_changes_nothing():
    """Equal relative noise everywhere is the unweighted fit, to rounding."""
    n, d, loss, _ = seed_table(0)
    for fitter in (fit_vpnls, fit_law):
        plain = fitter(n, d, loss, fixed_e=TRUTH["E"])
        weighted = fitter(n, d, loss, fixed_e=TRUTH["E"], noise=0.01 * loss)
        assert weighted.weights == "seed-noise" and plain.weights == "none"
        for name in ("alpha", "beta", "A", "B"):
            assert weighted.parameters[name] == pytest.approx(plain.parameters[name], rel=1e-6)


def test_scales_are_relative_floored_and_missing_ones_get_the_median():
    target = np.array([2.0, 2.0, 4.0, 1.0, 3.0])
    noise = [0.02, 0.002, 0.04, None, 0.0]
    # relative: 0.01, 0.001, 0.01, missing, 0 -> median of the measured (> 0) is 0.01
    expected = np.array([1.0, FLOOR_FRACTION, 1.0, 1.0, FLOOR_FRACTION])
    np.testing.assert_allclose(relative_scale(noise, target), expected)
    np.testing.assert_array_equal(relative_scale(None, target), np.ones(5))
    np.testing.assert_array_equal(relative_scale([None] * 5, target), np.ones(5))


def _write(path: Path, with_noise: bool) -> Path:
    n, d, loss, std = seed_table(0)
    header = ["N", "D", "loss", "entropy", "group"] + (["loss_seed_std"] if with_noise else [])
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for i, row in enumerate(zip(n, d, loss, std, strict=True)):
            cells = [row[0], row[1], row[2], TRUTH["E"], f"run{i}"]
            writer.writerow(cells + ([row[3]] if with_noise else []))
    return path


def test_fit_weights_by_the_seed_noise_column_when_it_exists(tmp_path: Path):
    table = _write(tmp_path / "seeds.csv", with_noise=True)
    common = ["fit", str(table), "--fix-E", "exact", "--bootstrap", "0", "--json"]
    default = runner.invoke(app, common)
    assert default.exit_code == 0, default.output
    data = json.loads(default.output)
    n, d, loss, std = seed_table(0)
    direct = fit_vpnls(n, d, loss, fixed_e=TRUTH["E"], noise=std)
    assert data["weights"] == "seed-noise"
    assert data["alpha"] == pytest.approx(direct.parameters["alpha"], rel=1e-9)
    unweighted = json.loads(runner.invoke(app, [*common, "--weights", "none"]).output)
    assert unweighted["weights"] == "none"
    assert not math.isclose(unweighted["alpha"], data["alpha"], rel_tol=1e-6)


def test_fit_without_the_column_is_unweighted_and_refuses_seed_noise(tmp_path: Path):
    table = _write(tmp_path / "plain.csv", with_noise=False)
    common = ["fit", str(table), "--fix-E", "exact", "--bootstrap", "0"]
    plain = runner.invoke(app, [*common, "--json"])
    assert plain.exit_code == 0 and json.loads(plain.output)["weights"] == "none"
    asked = runner.invoke(app, [*common, "--weights", "seed-noise"])
    assert asked.exit_code != 0
    assert "loss_seed_std" in asked.output and "Traceback" not in asked.output
    bad = runner.invoke(app, [*common, "--weights", "inverse"])
    assert bad.exit_code != 0 and "choose one of seed-noise, none" in bad.output


def test_study_plot_fits_weight_by_the_collected_seed_noise():
    from llama_train.scaling.regime_fits import fit_regimes

    n, d, loss, std = seed_table(1)
    rows = [
        {"regime": "r", "N": a, "D": b, "loss": c, "entropy": TRUTH["E"], "loss_seed_std": s}
        for a, b, c, s in zip(n, d, loss, std, strict=True)
    ]
    (weighted,) = fit_regimes(rows, bootstrap=0)
    direct = fit_vpnls(n, d, loss, fixed_e=TRUTH["E"], noise=std)
    assert weighted.exact.weights == "seed-noise" and weighted.free.weights == "seed-noise"
    assert weighted.exact.parameters["alpha"] == pytest.approx(direct.parameters["alpha"])
    # One seed per point: collect leaves the cell empty, and the fits are unweighted.
    (plain,) = fit_regimes([{**row, "loss_seed_std": None} for row in rows], bootstrap=0)
    assert plain.exact.weights == "none"
    assert plain.exact.parameters["alpha"] != pytest.approx(direct.parameters["alpha"])
