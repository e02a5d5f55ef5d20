"""Variable projection: search the exponents, solve the coefficients by NNLS.

For fixed exponents (alpha, beta) the law L = E + A/N^alpha + B/D^beta is linear in
its coefficients, so the nonlinear search needs only the exponents: an exhaustive grid
over (alpha, beta) with A, B >= 0 (and E >= 0 when E is free) solved by non-negative
least squares at every grid point, then a bounded pattern search from the best local
minima of the grid on the same projected objective (A, B, E re-solved at every point),
polished by Nelder-Mead. The 5-parameter problem of approach 3 is badly conditioned;
the 2-parameter one is not, and a grid cannot start in the wrong basin (Open-Athena's
scaling-law analysis; with E fixed to the exact entropy, only the exponents remain).

The loss: squared *relative* residuals, sum ((L_pred - L) / L)^2, i.e. the squared
log residual to first order, so the fit weighs points the way approach 3's
log-space objective does near its optimum (:mod:`llama_train.scaling.fit`: Huber on
log residuals, quadratic within delta). It is least squares, not Huber: NNLS is what
makes the inner problem exact, and on a study's table (no outlying run) the two
agree. With seed noise each relative residual is divided by its row's relative noise
(weighted least squares, :mod:`llama_train.scaling.noise`). In the ``--excess`` mode
(E = 0, target L - entropy) the residual is relative to the excess, as the log-excess
fit of approach 3 is.

The inner NNLS is solved exactly and vectorised over the grid by enumerating the
supports: with at most three columns, the NNLS optimum is the least-squares solution
on some linearly independent subset of columns whose coefficients are all
non-negative (Caratheodory), so the best feasible subset solution is the optimum.

Every bootstrap resample is refitted from the whole grid, so an optimum on the edge
of the grid cannot pin the resamples (no zero-width intervals from a bound).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize

from llama_train.scaling.bootstrap import GroupResampler
from llama_train.scaling.fit import (
    NAMES,
    Fit,
    Form,
    Points,
    add_intervals,
    grid_chunk,
    prepare_points,
)

# The exponent grid: 0 to 4 by 0.05 (the box of approach 3's exponents).
EXPONENT_MAX = 4.0
EXPONENT_GRID = np.linspace(0.0, EXPONENT_MAX, 81)


@dataclass(frozen=True)
class Projection:
    """The best coefficients at each of P exponent pairs: (P, K) and the objective (P,)."""

    coefficients: np.ndarray
    objective: np.ndarray


def _columns(points: Points, alphas: np.ndarray, betas: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(P, K, M) the design columns (before weighting) and their coefficient names."""
    columns, names = [], []
    count = points.count
    if points.form in ("ND", "N"):
        columns.append(np.exp(-alphas[:, None] * points.log_n[None, :]))
        names.append("A")
    if points.form in ("ND", "D"):
        columns.append(np.exp(-betas[:, None] * points.log_d[None, :]))
        names.append("B")
    if points.fixed_e is None:
        columns.append(np.ones((len(alphas), count)))
        names.append("E")
    return np.stack(columns, axis=1), names


def coefficient_names(points: Points) -> list[str]:
    return _columns(points, np.zeros(1), np.zeros(1))[1]


def project(
    points: Points, alphas: np.ndarray, betas: np.ndarray, *, exact: bool = True
) -> Projection:
    """Exact NNLS of the weighted target on the columns, at every exponent pair.

    `exact=False` computes the objective from the normal equations (faster on many rows,
    to about 1e-16 of the target's norm): good enough to rank a grid.
    """
    alphas = np.asarray(alphas, dtype=np.float64)
    betas = np.asarray(betas, dtype=np.float64)
    weight = 1.0 / (points.target * points.scale)
    y = (points.target - (points.fixed_e or 0.0)) * weight  # (M,)
    n_columns = len(coefficient_names(points))
    step = grid_chunk(4 * n_columns * points.count)
    coefficients = np.empty((len(alphas), n_columns))
    objective = np.empty(len(alphas))
    for start in range(0, len(alphas), step):
        part = slice(start, start + step)
        x = _columns(points, alphas[part], betas[part])[0] * weight  # (P, K, M)
        coefficients[part], objective[part] = _nnls_by_support(x, y, exact)
    return Projection(coefficients, objective)


def _nnls_by_support(
    x: np.ndarray, y: np.ndarray, exact: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """min ||y - c x||^2 over c >= 0 for each of P problems with K <= 3 columns."""
    p, k, _ = x.shape
    best = np.full(p, float(y @ y))  # the empty support: every coefficient 0
    best_c = np.zeros((p, k))
    gram = np.einsum("pkm,pjm->pkj", x, x)
    rhs = x @ y  # (P, K)
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            index = list(support)
            g = gram[:, index][:, :, index]
            solvable = _well_conditioned(g)
            if not solvable.any():
                continue
            c = np.zeros((p, size))
            c[solvable] = np.linalg.solve(g[solvable], rhs[solvable][:, index][..., None])[..., 0]
            if exact:
                residual = y[None, :] - np.einsum("pk,pkm->pm", c, x[:, index])
                value = np.einsum("pm,pm->p", residual, residual)
            else:
                # At a least-squares solution ||y - c x||^2 = y.y - c.(x y): no pass over
                # the rows, but it cancels to about 1e-16 y.y; the refinement uses `exact`.
                value = np.maximum(float(y @ y) - np.einsum("pk,pk->p", c, rhs[:, index]), 0.0)
            better = solvable & np.all(c >= 0.0, axis=1) & (value < best)
            best[better] = value[better]
            full = np.zeros((int(better.sum()), k))
            full[:, index] = c[better]
            best_c[better] = full
    return best_c, best


def _well_conditioned(gram: np.ndarray) -> np.ndarray:
    """Which Gram matrices have linearly independent columns (to 1e-10 in their scale).

    A dependent support adds nothing: its span is covered by a smaller independent one.
    """
    size = gram.shape[-1]
    if size == 1:
        return gram[:, 0, 0] > 0
    scale = np.sqrt(np.einsum("pii->pi", gram))
    ok = np.all(scale > 0, axis=1)
    safe = np.where(scale > 0, scale, 1.0)
    correlation = gram / safe[:, :, None] / safe[:, None, :]
    return ok & (np.abs(np.linalg.det(correlation)) > 1e-10)


# Refinements start from the best grid points that are local minima of the grid (a
# curved valley, or a term near zero, can give the grid several basins).
STARTS = 3


def _grid_starts(objective: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Flat indices of the best local minima of the objective on the grid (at most STARTS)."""
    values = objective.reshape(shape)
    padded = np.pad(values, 1, constant_values=np.inf)
    neighbours = np.stack(
        [
            padded[1 + i : 1 + i + shape[0], 1 + j : 1 + j + shape[1]]
            for i in (-1, 0, 1)
            for j in (-1, 0, 1)
            if (i, j) != (0, 0)
        ]
    )
    minima = np.flatnonzero(values <= neighbours.min(axis=0))
    return minima[np.argsort(objective[minima], kind="stable")[:STARTS]]


def _search(points: Points) -> tuple[float, float, np.ndarray, float]:
    """Grid, then refinement: alpha, beta, coefficients, objective."""
    uses_n = points.form in ("ND", "N")
    uses_d = points.form in ("ND", "D")
    a_axis = EXPONENT_GRID if uses_n else np.zeros(1)
    b_axis = EXPONENT_GRID if uses_d else np.zeros(1)
    alphas, betas = (axis.ravel() for axis in np.meshgrid(a_axis, b_axis, indexing="ij"))
    grid = project(points, alphas, betas, exact=False)
    starts = _grid_starts(grid.objective, (len(a_axis), len(b_axis)))
    centres = np.stack([alphas[starts], betas[starts]], axis=1)
    values = project(points, centres[:, 0], centres[:, 1]).objective
    centres, values = _pattern_search(points, centres, values, uses_n, uses_d)
    best = centres[int(np.argmin(values))]
    best = _polish(points, best, np.array([uses_n, uses_d]), float(values.min()))
    final = project(points, best[:1], best[1:])
    return float(best[0]), float(best[1]), final.coefficients[0], float(final.objective[0])


def _polish(points: Points, origin: np.ndarray, free: np.ndarray, value: float) -> np.ndarray:
    """Nelder-Mead from the pattern search's optimum: its simplex turns with a narrow
    valley that no fixed stencil direction follows (a term near zero makes one)."""

    def objective(x: np.ndarray) -> float:
        trial = origin.copy()
        trial[free] = np.clip(x, 0.0, EXPONENT_MAX)
        return float(project(points, trial[:1], trial[1:]).objective[0])

    x0 = origin[free]
    size = 1e-3
    simplex = [x0] + [
        x0 + np.eye(len(x0))[i] * (size if x0[i] + size <= EXPONENT_MAX else -size)
        for i in range(len(x0))
    ]
    result = minimize(
        objective,
        x0,
        method="Nelder-Mead",
        bounds=[(0.0, EXPONENT_MAX)] * len(x0),
        options={"initial_simplex": np.array(simplex), "xatol": 1e-9, "fatol": 1e-18},
    )
    polished = origin.copy()
    if result.fun < value:
        polished[free] = np.clip(result.x, 0.0, EXPONENT_MAX)
    return polished


# The refinement stops when its step is below this (exponents are then known far
# better than any bootstrap interval resolves).
FINEST_STEP = 1e-7
MAX_ITERATIONS = 400


def _pattern_search(
    points: Points, centres: np.ndarray, values: np.ndarray, uses_n: bool, uses_d: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Refine every start at once by a bounded 5 x 5 pattern search.

    Each round evaluates the 25 points at -2..2 steps around every centre in one
    vectorised projection; a centre moves to the best of them, its step doubles when
    that is on the rim (a long valley) and quarters when the centre stays best. This
    follows the curved valley of (alpha, beta) that a grid step can straddle.
    """
    ticks = np.arange(-2, 3)
    offsets = np.stack(
        [
            np.repeat(ticks, 5) if uses_n else np.zeros(25),
            np.tile(ticks, 5) if uses_d else np.zeros(25),
        ],
        axis=1,
    )
    rim = np.abs(offsets).max(axis=1) == 2
    centres = centres.copy()
    values = values.copy()
    step = np.full(len(centres), float(EXPONENT_GRID[1] - EXPONENT_GRID[0]) / 2)
    for _ in range(MAX_ITERATIONS):
        active = np.flatnonzero(step > FINEST_STEP)
        if not len(active):
            break
        trial = centres[active, None, :] + step[active, None, None] * offsets[None]
        trial = np.clip(trial, 0.0, EXPONENT_MAX)
        found = project(points, trial[..., 0].ravel(), trial[..., 1].ravel()).objective
        found = found.reshape(len(active), len(offsets))
        best = np.argmin(found, axis=1)
        lowest = found[np.arange(len(active)), best]
        moved = lowest < values[active]
        centres[active[moved]] = trial[moved, best[moved]]
        values[active[moved]] = lowest[moved]
        step[active[moved & rim[best]]] *= 2.0
        step[active[~moved]] /= 4.0
    return centres, values


def _natural(
    points: Points, alpha: float, beta: float, coefficients: np.ndarray
) -> dict[str, float | None]:
    values = dict(zip(coefficient_names(points), (float(c) for c in coefficients), strict=True))
    uses_n = points.form in ("ND", "N")
    uses_d = points.form in ("ND", "D")
    return {
        "A": values["A"] if uses_n else None,
        "B": values["B"] if uses_d else None,
        "E": values.get("E", points.fixed_e),
        "alpha": alpha if uses_n else None,
        "beta": beta if uses_d else None,
    }


# A term smaller than this fraction of the loss at every row is absent: NNLS leaves such
# a coefficient at 0 or at rounding-level values, and its exponent is then arbitrary.
NEGLIGIBLE = 1e-9


def _bound_flags(
    points: Points, parameters: dict[str, float | None]
) -> tuple[list[str], list[str]]:
    """Parameters on the edge of the search, and what that leaves undetermined."""
    at_bound, flags = [], []
    floor = float(points.target.min())
    for coefficient, exponent, variable, logs in (
        ("A", "alpha", "N", points.log_n),
        ("B", "beta", "D", points.log_d),
    ):
        value, power = parameters[coefficient], parameters[exponent]
        if value is None or power is None:
            continue
        largest = value * float(np.exp(-power * logs).max())
        if largest <= NEGLIGIBLE * floor:
            at_bound.append(coefficient)
            flags.append(
                f"{exponent}: {coefficient} = {value:.3g}, the {variable} term vanished, so "
                f"{exponent} is not determined"
            )
        if min(power, EXPONENT_MAX - power) < 1e-6:
            at_bound.append(exponent)
            flags.append(f"{exponent}: on the edge of the search [0, {EXPONENT_MAX:g}]")
    if points.fixed_e is None and (parameters["E"] or 0.0) <= NEGLIGIBLE * floor:
        at_bound.append("E")
        flags.append("E: at its bound 0")
    return at_bound, flags


def fit_vpnls(
    n: Sequence[float] | np.ndarray | None,
    d: Sequence[float] | np.ndarray | None,
    loss: Sequence[float] | np.ndarray,
    *,
    form: Form = "ND",
    fixed_e: float | None = None,
    bootstrap: int = 0,
    level: float = 0.95,
    seed: int = 0,
    groups: Sequence[Any] | np.ndarray | None = None,
    noise: Sequence[float | None] | np.ndarray | None = None,
) -> Fit:
    """Fit L = E + A/N^alpha + B/D^beta by variable projection (E free, fixed, or 0).

    Same arguments and result as :func:`llama_train.scaling.fit.fit_law`; the bootstrap
    resamples run groups and refits each from the whole grid; `noise` (the seed sd of
    each row's loss) weights the rows. Deterministic.
    """
    free = (form in ("ND", "N")) * 2 + (form in ("ND", "D")) * 2 + (fixed_e is None)
    points = prepare_points(
        n, d, loss, form=form, fixed_e=fixed_e, free_parameters=free, groups=groups, noise=noise
    )
    alpha, beta, coefficients, objective = _search(points)
    parameters = _natural(points, alpha, beta, coefficients)
    at_bound, flags = _bound_flags(points, parameters)
    resampler = GroupResampler(points.codes, seed)
    natural = []
    for _ in range(bootstrap):
        sample = points.take(resampler.draw())
        natural.append(_natural(sample, *_search(sample)[:3]))
    fit = Fit(
        form=form,
        e_mode=points.e_mode,
        parameters=parameters,
        intervals={name: None for name in NAMES},
        level=level,
        n_points=points.count,
        bootstrap=bootstrap,
        objective=objective,
        rms_log_residual=0.0,
        fixed_e=fixed_e,
        at_bound=at_bound,
        method="vpnls",
        groups=resampler.n_groups if bootstrap else 0,
        flags=flags,
        weights="none" if noise is None else "seed-noise",
    )
    prediction = fit.predict(np.exp(points.log_n), np.exp(points.log_d))
    with np.errstate(divide="ignore"):
        log_residual = np.log(np.maximum(prediction, 1e-300)) - np.log(points.target)
    fit.rms_log_residual = float(math.sqrt(np.mean(log_residual**2)))
    add_intervals(fit, natural)
    return fit
