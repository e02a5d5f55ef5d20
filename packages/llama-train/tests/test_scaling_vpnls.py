"""Variable projection against a brute-force grid, and the bootstrap by run group."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.optimize import nnls

from llama_train.scaling.bootstrap import GroupResampler, group_codes
from llama_train.scaling.fit import prepare_points
from llama_train.scaling.vpnls import fit_vpnls, project

# The shape of the shipped small study: 4 model sizes x 4 data sizes.
N_STUDY = np.array([4656.0, 17504.0, 57072.0, 108864.0])
D_STUDY = np.array([32768.0, 65536.0, 131072.0, 262144.0])
TRUTH = {"E": 2.0986, "A": 4.0, "alpha": 0.3, "B": 60.0, "beta": 0.5}


def study_table(noise: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = np.repeat(N_STUDY, 4)
    d = np.tile(D_STUDY, 4)
    clean = TRUTH["E"] + TRUTH["A"] / n ** TRUTH["alpha"] + TRUTH["B"] / d ** TRUTH["beta"]
    rng = np.random.default_rng(seed)
    return n, d, clean * np.exp(rng.normal(0.0, noise, clean.shape))


def brute_force(n, d, loss, fixed_e, alphas, betas):
    """scipy's NNLS at every grid point, on the relative residuals; (objective, alpha, beta)."""
    best = (np.inf, None, None)
    for alpha, beta in itertools.product(alphas, betas):
        columns = [n**-alpha, d**-beta] + ([np.ones_like(n)] if fixed_e is None else [])
        x = np.stack(columns, axis=1) / loss[:, None]
        y = (loss - (fixed_e or 0.0)) / loss
        _, residual = nnls(x, y)
        best = min(best, (residual**2, alpha, beta), key=lambda item: item[0])
    return best


@pytest.mark.parametrize("fixed_e", [TRUTH["E"], None])
def test_the_inner_solve_is_exact_nnls(fixed_e):
    n, d, loss = study_table(0.01, seed=3)
    points = prepare_points(n, d, loss, form="ND", fixed_e=fixed_e, free_parameters=4)
    rng = np.random.default_rng(0)
    alphas, betas = rng.uniform(0, 3, 40), rng.uniform(0, 3, 40)
    alphas[:3] = 0.0  # a column of ones: collinear with E when E is free
    ours = project(points, alphas, betas)
    for k, (alpha, beta) in enumerate(zip(alphas, betas, strict=True)):
        columns = [n**-alpha, d**-beta] + ([np.ones_like(n)] if fixed_e is None else [])
        design = np.stack(columns, axis=1)
        coefficients, residual = nnls(design / loss[:, None], (loss - (fixed_e or 0.0)) / loss)
        assert ours.objective[k] == pytest.approx(residual**2, rel=1e-7, abs=1e-14)
        assert np.all(ours.coefficients[k] >= 0)
        # The same fitted values (coefficients may differ where columns are collinear).
        fitted = design @ ours.coefficients[k]
        assert fitted == pytest.approx(design @ coefficients, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("fixed_e", [TRUTH["E"], None])
def test_the_fit_is_at_least_as_good_as_a_brute_force_grid(fixed_e):
    n, d, loss = study_table(0.005, seed=1)
    fit = fit_vpnls(n, d, loss, fixed_e=fixed_e)
    step = 0.02
    objective, alpha, beta = brute_force(
        n, d, loss, fixed_e, np.arange(0.0, 1.5, step), np.arange(0.0, 1.5, step)
    )
    assert fit.objective <= objective * (1 + 1e-9)
    assert fit.parameters["alpha"] == pytest.approx(alpha, abs=step)
    assert fit.parameters["beta"] == pytest.approx(beta, abs=step)


def test_noise_free_laws_are_recovered_in_every_basin():
    """Exponents off the grid and terms near zero (several basins): the refinement finds
    the exact law each time."""
    n = np.repeat(np.geomspace(1e3, 1e5, 5), 5)
    d = np.tile(np.geomspace(5e4, 5e6, 5), 5)
    rng = np.random.default_rng(5)
    for _ in range(8):
        alpha, beta = rng.uniform(0.1, 1.2, 2)
        loss = 0.9 + 40.0 / n**alpha + 300.0 / d**beta
        for fixed_e in (0.9, None):
            fit = fit_vpnls(n, d, loss, fixed_e=fixed_e)
            assert fit.parameters["alpha"] == pytest.approx(alpha, abs=1e-4)
            assert fit.parameters["beta"] == pytest.approx(beta, abs=1e-4)


def test_a_term_the_data_do_not_show_is_flagged_or_left_wide():
    n, d, _ = study_table(0.0, seed=0)
    exact = 2.0 + 60.0 / d**0.5  # no N dependence at all
    fit = fit_vpnls(n, d, exact, fixed_e=2.0)
    assert "A" in fit.at_bound
    assert any(flag.startswith("alpha: A = ") for flag in fit.flags)
    assert "compute_optimal" not in fit.to_dict()
    rng = np.random.default_rng(0)
    noisy = exact * np.exp(rng.normal(0.0, 0.003, d.shape))
    fit = fit_vpnls(n, d, noisy, fixed_e=2.0, bootstrap=20)
    low, high = fit.intervals["alpha"]
    assert high - low > 0.5  # the noise is fitted by some N term, of any exponent
    low, high = fit.intervals["beta"]
    assert low <= 0.5 <= high and high - low < 0.2


def test_resamples_draw_whole_groups():
    codes = group_codes(["t1", "t1", "t1", "t2", "t2", "t3"], 6)
    resampler = GroupResampler(codes, seed=0)
    assert resampler.n_groups == 3
    sizes = {0: 3, 1: 2, 2: 1}
    for _ in range(50):
        drawn = codes[resampler.draw()]
        counts = np.bincount(drawn, minlength=3)
        for group, size in sizes.items():
            assert counts[group] % size == 0  # a group comes whole, or not at all
        assert sum(counts[g] // s for g, s in sizes.items()) == 3  # three groups drawn
    assert np.array_equal(group_codes(None, 4), np.arange(4))


@pytest.mark.integration
def test_a_run_counted_three_times_is_one_run_to_the_bootstrap():
    """Three rows sharing one run's noise (a trunk and its branches, say): resampling the
    groups gives the interval of the 16 runs; resampling rows pretends to 48 and is
    narrower."""
    n, d, loss = study_table(0.01, seed=7)
    width = lambda fit, name: fit.intervals[name][1] - fit.intervals[name][0]  # noqa: E731
    options = {"fixed_e": TRUTH["E"], "bootstrap": 40, "seed": 1}
    single = fit_vpnls(n, d, loss, **options)
    many = [np.repeat(values, 3) for values in (n, d, loss)]
    groups = np.repeat(np.arange(16), 3)
    grouped = fit_vpnls(*many, groups=groups, **options)
    rows = fit_vpnls(*many, **options)
    assert grouped.groups == 16 and rows.groups == 48
    for name in ("alpha", "beta"):
        assert 0.6 < width(grouped, name) / width(single, name) < 1.6
        assert width(rows, name) < 0.8 * width(grouped, name)


def test_one_group_gives_no_interval_and_says_why():
    n, d, loss = study_table(0.005, seed=2)
    fit = fit_vpnls(n, d, loss, fixed_e=TRUTH["E"], bootstrap=5, groups=["one"] * 16)
    assert fit.intervals["alpha"] is None and fit.intervals["beta"] is None
    assert any("1 run group(s) for 4 free parameters" in flag for flag in fit.flags)


def test_collected_rows_carry_their_run_group(tmp_path):
    """A point's record may name its group (a cooldown branch names its trunk); otherwise
    the point is its own group. The column reaches points.csv, where `fit` reads it."""
    import csv
    import json

    from llama_train.scaling.points import point_rows, write_csv

    base = {"regime": "r", "model": "m", "n_train": 8, "lr": 0.01, "seed": 0, "steps": 4}
    record = {
        "points": [
            {**base, "name": "trunk-a-b1", "group": "trunk-a"},
            {**base, "name": "solo"},
        ]
    }
    for point in record["points"]:
        run_dir = tmp_path / point["name"]
        run_dir.mkdir()
        summary = {"step": 4, "test_loss": 2.5, "test_entropy": 2.0}
        (run_dir / "summary.json").write_text(json.dumps(summary))
    rows = point_rows(tmp_path, record)
    assert [row["group"] for row in rows] == ["trunk-a", "solo"]
    path = write_csv(rows, tmp_path / "points.csv")
    with path.open() as handle:
        assert [row["group"] for row in csv.DictReader(handle)] == ["trunk-a", "solo"]
