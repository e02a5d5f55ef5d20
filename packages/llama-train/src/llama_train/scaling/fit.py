"""Fitting L(N, D) = E + A / N^alpha + B / D^beta the way Chinchilla's approach 3 is replicated.

Following Hoffmann et al. (2022) and the replication by Besiroglu et al. (2024):

- the parameters live in log space, a = log A, b = log B, e = log E, so every
  term is positive and the optimiser sees scales of order one;
- the prediction is a log-sum-exp, log L = LSE(a - alpha log N, b - beta log D, e),
  which is exact and stable whatever the magnitudes;
- the objective is the *sum* of Huber losses (delta = 1e-3) of log L_pred - log L:
  robust to an outlying run, quadratic near the fit;
- L-BFGS-B (scipy) starts from a grid of initialisations. Chinchilla optimises from
  every grid point; here the objective is evaluated on the whole grid and the
  optimiser starts from the best `starts` of them (20 by default), which finds the
  same optimum on every table we tried at a hundredth of the cost, and keeps
  bootstrapping affordable;
- confidence intervals come from the bootstrap: resample whole run groups (a trunk
  with its cooldown branches; every row its own group without labels, see
  :mod:`llama_train.scaling.bootstrap`), refit, take percentiles. A resample starts
  from the full fit's optimum, except when that optimum sits on the search box: then
  every resample would stay pinned there and the interval would have zero width, so
  each resample is refitted from the best points of the initialisation grid too.
  Intervals are widened for few runs (see :mod:`llama_train.scaling.bootstrap`).

This is the diagnostic for a free E (:mod:`llama_train.scaling.vpnls` is the default
method): its bias against the exact entropy is a measurement of its own.

Forms: ``ND`` (the law above), ``N`` (E + A/N^alpha) and ``D`` (E + B/D^beta). E is
free, fixed to a value (``fixed_e``: the exact entropy of a GSSM store, the true floor),
or absent (``fixed_e=0``: a pure power law, for the excess loss L - entropy).

From an ND fit, :func:`compute_optimal` gives Chinchilla's allocation under C = 6 N D:
N_opt = G (C/6)^a, D_opt = (C/6)^b / G with a = beta/(alpha+beta), b = alpha/(alpha+beta),
G = (alpha A / (beta B))^(1/(alpha+beta)).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np
from scipy.optimize import minimize

from llama_train.errors import LlamaTrainError
from llama_train.scaling.bootstrap import (
    GroupResampler,
    group_codes,
    percentile_intervals,
    small_sample_factor,
)
from llama_train.scaling.noise import relative_scale

Form = Literal["ND", "N", "D"]
FORMS: tuple[Form, ...] = ("ND", "N", "D")
HUBER_DELTA = 1e-3
# Grids of Hoffmann et al. (2022), Appendix D.2 (alpha and beta from 0 to 2 by 0.5,
# e from -1 to 1 by 0.5, a and b from 0 to 25 by 5).
GRID_EXPONENT = np.arange(0.0, 2.01, 0.5)
GRID_LOG_E = np.arange(-1.0, 1.01, 0.5)
GRID_LOG_COEFFICIENT = np.arange(0.0, 25.01, 5.0)
NAMES = ("A", "B", "E", "alpha", "beta")


@dataclass(frozen=True)
class _Layout:
    """Which of (a, b, e, alpha, beta) are free for a form and E mode."""

    form: Form
    free_e: bool
    fixed_log_e: float | None  # None with free E or without an E term

    @cached_property
    def positions(self) -> dict[str, int]:
        return {name: index for index, name in enumerate(self.names)}

    @cached_property
    def names(self) -> list[str]:
        names = []
        if self.form in ("ND", "N"):
            names += ["a", "alpha"]
        if self.form in ("ND", "D"):
            names += ["b", "beta"]
        if self.free_e:
            names.append("e")
        return names

    def grid(self) -> np.ndarray:
        axes = {
            "a": GRID_LOG_COEFFICIENT,
            "b": GRID_LOG_COEFFICIENT,
            "alpha": GRID_EXPONENT,
            "beta": GRID_EXPONENT,
            "e": GRID_LOG_E,
        }
        return np.array(list(itertools.product(*(axes[name] for name in self.names))))

    def terms(self, theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
        """(P, K, M) the terms of the log-sum-exp for P parameter vectors and M points,
        and the derivative layout follows `names`."""
        values = dict(zip(self.names, np.moveaxis(theta, -1, 0), strict=True))
        terms = []
        if "a" in values:
            terms.append(values["a"][:, None] - values["alpha"][:, None] * log_n[None, :])
        if "b" in values:
            terms.append(values["b"][:, None] - values["beta"][:, None] * log_d[None, :])
        if "e" in values:
            terms.append(np.broadcast_to(values["e"][:, None], terms[0].shape))
        elif self.fixed_log_e is not None:
            terms.append(np.full_like(terms[0], self.fixed_log_e))
        return np.stack(terms, axis=1)


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    absolute = np.abs(r)
    return np.where(absolute <= delta, 0.5 * r * r, delta * (absolute - 0.5 * delta))


def _objective(
    theta: np.ndarray,
    layout: _Layout,
    log_n: np.ndarray,
    log_d: np.ndarray,
    log_l: np.ndarray,
    delta: float,
    scale: np.ndarray,
) -> tuple[float, np.ndarray]:
    """Summed Huber loss of log L and its gradient, for one parameter vector.

    Each log residual is divided by its row's relative noise `scale` (median 1,
    :mod:`llama_train.scaling.noise`; ones without seed noise).

    Written out term by term (no generic stacking): L-BFGS-B calls it thousands of
    times per fit, and on a few dozen points the Python overhead is the whole cost.
    """
    position = layout.positions
    terms = []
    if "a" in position:
        terms.append(theta[position["a"]] - theta[position["alpha"]] * log_n)
    if "b" in position:
        terms.append(theta[position["b"]] - theta[position["beta"]] * log_d)
    if "e" in position:
        terms.append(np.full_like(log_l, theta[position["e"]]))
    elif layout.fixed_log_e is not None:
        terms.append(np.full_like(log_l, layout.fixed_log_e))
    stacked = np.vstack(terms)
    peak = stacked.max(axis=0)
    weights = np.exp(stacked - peak)
    total = weights.sum(axis=0)
    residual = (peak + np.log(total) - log_l) / scale
    weights /= total * scale
    absolute = np.abs(residual)
    loss = float(
        np.where(
            absolute <= delta, 0.5 * residual * residual, delta * (absolute - 0.5 * delta)
        ).sum()
    )
    slope = np.clip(residual, -delta, delta)  # Huber's derivative
    gradient = np.empty(len(theta))
    row = 0
    if "a" in position:
        along = slope * weights[row]
        gradient[position["a"]] = along.sum()
        gradient[position["alpha"]] = -(along * log_n).sum()
        row += 1
    if "b" in position:
        along = slope * weights[row]
        gradient[position["b"]] = along.sum()
        gradient[position["beta"]] = -(along * log_d).sum()
        row += 1
    if "e" in position:
        gradient[position["e"]] = (slope * weights[row]).sum()
    return loss, gradient


# Floats held at once by a vectorised grid evaluation (32 MiB): chunks of the grid
# shrink as the table grows, so memory stays bounded whatever the row count.
GRID_CHUNK_FLOATS = 1 << 22


def grid_chunk(per_point: int) -> int:
    """Grid points evaluated at once when each costs `per_point` floats."""
    return max(1, GRID_CHUNK_FLOATS // max(per_point, 1))


def _grid_losses(
    grid: np.ndarray,
    layout: _Layout,
    log_n: np.ndarray,
    log_d: np.ndarray,
    log_l: np.ndarray,
    delta: float,
    scale: np.ndarray,
) -> np.ndarray:
    losses = np.empty(len(grid))
    step = grid_chunk(4 * len(log_l))
    for start in range(0, len(grid), step):
        terms = layout.terms(grid[start : start + step], log_n, log_d)  # (P, K, M)
        peak = terms.max(axis=1)
        prediction = peak + np.log(np.exp(terms - peak[:, None, :]).sum(axis=1))
        residual = (prediction - log_l[None, :]) / scale[None, :]
        losses[start : start + step] = _huber(residual, delta).sum(axis=1)
    return losses


# Box of the search. Exponents are non-negative (a law that rises with scale is not a
# scaling law) and at most 4: when a variable barely moves the loss, the unbounded
# optimum runs off to alpha -> infinity with A -> infinity (a step, not a power law)
# and overflows; a fit that ends on a bound says so (Fit.at_bound).
BOUNDS = {
    "a": (-20.0, 60.0),
    "b": (-20.0, 60.0),
    "e": (-20.0, 5.0),
    "alpha": (0.0, 4.0),
    "beta": (0.0, 4.0),
}


def _bounds(layout: _Layout) -> list[tuple[float, float]]:
    return [BOUNDS[name] for name in layout.names]


def _optimise(
    starts: np.ndarray,
    layout: _Layout,
    log_n: np.ndarray,
    log_d: np.ndarray,
    log_l: np.ndarray,
    delta: float,
    scale: np.ndarray,
) -> tuple[np.ndarray, float]:
    best: tuple[np.ndarray, float] | None = None
    for start in starts:
        result = minimize(
            _objective,
            start,
            args=(layout, log_n, log_d, log_l, delta, scale),
            jac=True,
            method="L-BFGS-B",
            bounds=_bounds(layout),
            # The summed Huber loss is of order delta x points: scipy's default tolerances
            # stop far from the optimum (Besiroglu et al. traced Chinchilla's own
            # estimates to such an early stop), so run until the gradient is negligible.
            options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 20_000},
        )
        if np.all(np.isfinite(result.x)) and (best is None or result.fun < best[1]):
            best = (result.x, float(result.fun))
    assert best is not None
    return best


@dataclass
class Fit:
    """A fitted law: parameters, their bootstrap intervals, and how well it fits."""

    form: Form
    e_mode: Literal["free", "fixed", "none"]
    parameters: dict[str, float | None]  # A, B, E, alpha, beta (None where the form has none)
    intervals: dict[str, list[float] | None]  # the same names: [low, high] or None
    level: float
    n_points: int
    bootstrap: int
    objective: float
    rms_log_residual: float
    fixed_e: float | None = None
    at_bound: list[str] = field(default_factory=list)  # parameters that ended on the box
    samples: dict[str, list[float]] = field(default_factory=dict, repr=False)
    method: str = "lbfgs"
    groups: int = 0  # run groups the bootstrap resampled (0: no bootstrap)
    flags: list[str] = field(default_factory=list)  # what the fit cannot determine, and why
    weights: str = "none"  # "seed-noise": rows weighted by their seed noise

    def predict(self, n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray:
        """L at (N, D) (N or D is ignored by the one-variable forms)."""
        p = self.parameters
        n = np.asarray(n, dtype=np.float64)
        d = np.asarray(d, dtype=np.float64)
        total = np.zeros(np.broadcast(n, d).shape)
        if p["A"] is not None:
            total = total + p["A"] / n ** p["alpha"]
        if p["B"] is not None:
            total = total + p["B"] / d ** p["beta"]
        return total + (p["E"] or 0.0)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "form": self.form,
            "E_mode": self.e_mode,
            **self.parameters,
            "intervals": self.intervals,
            "level": self.level,
            "n_points": self.n_points,
            "bootstrap": self.bootstrap,
            # approach 3: summed Huber of log residuals; vpnls: summed squared relative ones
            ("huber_objective" if self.method == "lbfgs" else "squared_relative_objective"): (
                self.objective
            ),
            "rms_log_residual": self.rms_log_residual,
            "weights": self.weights,
            "at_bound": self.at_bound,
            "method": self.method,
            "groups": self.groups,
            "flags": self.flags,
        }
        if has_compute_optimal(self):
            optimal = compute_optimal(self)
            data["compute_optimal"] = {
                "a": optimal.a,
                "b": optimal.b,
                "G": optimal.g,
                "a_interval": optimal.a_interval,
                "b_interval": optimal.b_interval,
            }
        return data


@dataclass(frozen=True)
class Points:
    """A checked table: log N, log D, the target (loss, or excess with E = 0) and groups."""

    form: Form
    fixed_e: float | None
    log_n: np.ndarray
    log_d: np.ndarray
    target: np.ndarray
    codes: np.ndarray  # run group of each row (see llama_train.scaling.bootstrap)
    scale: np.ndarray  # relative noise of each row, median 1 (llama_train.scaling.noise)

    @property
    def count(self) -> int:
        return len(self.target)

    @property
    def e_mode(self) -> Literal["free", "fixed", "none"]:
        if self.fixed_e is None:
            return "free"
        return "none" if self.fixed_e == 0 else "fixed"

    def take(self, index: np.ndarray) -> Points:
        return Points(
            self.form,
            self.fixed_e,
            self.log_n[index],
            self.log_d[index],
            self.target[index],
            self.codes[index],
            self.scale[index],
        )


def prepare_points(
    n: Sequence[float] | np.ndarray | None,
    d: Sequence[float] | np.ndarray | None,
    loss: Sequence[float] | np.ndarray,
    *,
    form: Form,
    fixed_e: float | None,
    free_parameters: int,
    groups: Sequence[Any] | np.ndarray | None = None,
    noise: Sequence[float | None] | np.ndarray | None = None,
) -> Points:
    """Check a table for a fit (one-line errors) and take logs.

    Refuses what no method can fit: non-finite or non-positive values, and designs that
    cannot identify the law (a single N for a law in N, a single D for a law in D, fewer
    distinct points than free parameters). Twenty copies of one row are one point.
    `noise`: the seed sd of each row's loss, which weights the rows
    (:mod:`llama_train.scaling.noise`); None weighs them alike.
    """
    if form not in FORMS:
        raise LlamaTrainError(f"form {form!r}: choose one of {', '.join(FORMS)}")
    loss_array = np.asarray(loss, dtype=np.float64)
    count = len(loss_array)
    n_array = _column(n, "N", count, needed=form in ("ND", "N"))
    d_array = _column(d, "D", count, needed=form in ("ND", "D"))
    if not np.all(np.isfinite(loss_array)) or np.any(loss_array <= 0):
        raise LlamaTrainError("every loss must be finite and positive (the fit is on log L)")
    if fixed_e is not None and (not math.isfinite(fixed_e) or fixed_e < 0):
        raise LlamaTrainError(f"fixed E {fixed_e!r} must be finite and non-negative")
    for needed, values, label, exponent, other in (
        (form in ("ND", "N"), n_array, "N", "alpha", "D"),
        (form in ("ND", "D"), d_array, "D", "beta", "N"),
    ):
        distinct = np.unique(values)
        if needed and len(distinct) < 2:
            hint = f"; fit --form {other}" if form == "ND" else ""
            raise LlamaTrainError(
                f"every row has {label} = {distinct[0]:.6g}: one {label} cannot determine "
                f"{exponent}{hint}, or add rows at other {label}"
            )
    if fixed_e is not None and fixed_e > 0 and not np.any(loss_array > fixed_e):
        raise LlamaTrainError(
            f"every loss is at or below the fixed E {fixed_e:.6g}: nothing is left above the "
            "floor to fit (check the entropy column and the loss column)"
        )
    distinct_points = len({(a, b, c) for a, b, c in zip(n_array, d_array, loss_array, strict=True)})
    if distinct_points < free_parameters:
        raise LlamaTrainError(
            f"{distinct_points} distinct point(s) ({count} rows) for {free_parameters} free "
            "parameters: give more points"
        )
    return Points(
        form,
        fixed_e,
        np.log(n_array),
        np.log(d_array),
        loss_array,
        group_codes(groups, count),
        relative_scale(noise, loss_array),
    )


def fit_law(
    n: Sequence[float] | np.ndarray | None,
    d: Sequence[float] | np.ndarray | None,
    loss: Sequence[float] | np.ndarray,
    *,
    form: Form = "ND",
    fixed_e: float | None = None,
    bootstrap: int = 0,
    level: float = 0.95,
    seed: int = 0,
    delta: float = HUBER_DELTA,
    starts: int = 20,
    groups: Sequence[Any] | np.ndarray | None = None,
    resample_starts: int = 5,
    noise: Sequence[float | None] | np.ndarray | None = None,
) -> Fit:
    """Fit a law to points (N, D, L); `fixed_e` = None frees E, 0 drops it (pure power law).

    `groups` labels the run group of each row (the bootstrap resamples groups). A
    resample starts from the full fit's optimum, and, when that optimum is on the
    search box, also from the `resample_starts` best grid points of the resample.
    `noise` (the seed sd of each row's loss) weights the log residuals by it.
    Deterministic: the bootstrap draws from `seed`.
    """
    if form not in FORMS:
        raise LlamaTrainError(f"form {form!r}: choose one of {', '.join(FORMS)}")
    layout = _Layout(
        form,
        free_e=fixed_e is None,
        fixed_log_e=math.log(fixed_e) if fixed_e else None,
    )
    free = len(layout.names)
    points = prepare_points(
        n, d, loss, form=form, fixed_e=fixed_e, free_parameters=free, groups=groups, noise=noise
    )
    log_n, log_d, log_l = points.log_n, points.log_d, np.log(points.target)
    scale = points.scale
    grid = layout.grid()

    losses = _grid_losses(grid, layout, log_n, log_d, log_l, delta, scale)
    chosen = grid[np.argsort(losses, kind="stable")[:starts]]
    theta, objective = _optimise(chosen, layout, log_n, log_d, log_l, delta, scale)
    at_bound = _at_bound(layout, theta)
    resampler = GroupResampler(points.codes, seed)
    samples = []
    for _ in range(bootstrap):
        index = resampler.draw()
        args = (log_n[index], log_d[index], log_l[index], delta, scale[index])
        starting = theta[None, :]
        if at_bound:
            # Pinned to the box, the full fit's optimum would hold every resample there
            # (a zero-width interval); search from the resample's own best grid points too.
            own = _grid_losses(grid, layout, *args)
            starting = np.vstack([starting, grid[np.argsort(own, kind="stable")[:resample_starts]]])
        samples.append(_optimise(starting, layout, *args)[0])
    parameters = _natural(layout, theta, fixed_e)
    prediction = np.log(_predict(layout, theta, log_n, log_d))
    fit = Fit(
        form=form,
        e_mode=points.e_mode,
        parameters=parameters,
        intervals={name: None for name in NAMES},
        level=level,
        n_points=points.count,
        bootstrap=bootstrap,
        objective=objective,
        rms_log_residual=float(np.sqrt(np.mean((prediction - log_l) ** 2))),
        fixed_e=fixed_e,
        at_bound=at_bound,
        method="lbfgs",
        groups=resampler.n_groups if bootstrap else 0,
        weights="none" if noise is None else "seed-noise",
    )
    add_intervals(fit, [_natural(layout, sample, fixed_e) for sample in samples])
    return fit


def add_intervals(fit: Fit, natural: list[dict[str, float | None]]) -> None:
    """Bootstrap intervals of the fitted (not fixed, not absent) parameters, widened for
    the number of run groups (:func:`llama_train.scaling.bootstrap.small_sample_factor`)."""
    if not natural:
        return
    names = [
        name
        for name in NAMES
        if fit.parameters[name] is not None and not (name == "E" and fit.fixed_e is not None)
    ]
    widen = small_sample_factor(fit.groups, len(names))
    if widen is None:
        fit.flags.append(
            f"{fit.groups} run group(s) for {len(names)} free parameters: no bootstrap interval"
        )
        return
    intervals, samples, flags = percentile_intervals(
        natural, names, fit.parameters, fit.level, widen
    )
    fit.intervals.update(intervals)
    fit.samples.update(samples)
    fit.flags.extend(flags)


def _at_bound(layout: _Layout, theta: np.ndarray) -> list[str]:
    natural = {"a": "A", "b": "B", "e": "E", "alpha": "alpha", "beta": "beta"}
    return [
        natural[name]
        for name, value in zip(layout.names, theta, strict=True)
        if min(abs(value - BOUNDS[name][0]), abs(value - BOUNDS[name][1])) < 1e-6
    ]


def _column(values: Any, label: str, count: int, *, needed: bool) -> np.ndarray:
    if values is None:
        if needed:
            raise LlamaTrainError(f"the form needs a {label} column")
        return np.ones(count)
    array = np.asarray(values, dtype=np.float64)
    if len(array) != count:
        raise LlamaTrainError(f"{label} has {len(array)} values for {count} losses")
    if needed and (not np.all(np.isfinite(array)) or np.any(array <= 0)):
        raise LlamaTrainError(
            f"every {label} must be finite and positive (the law uses log {label})"
        )
    return array if needed else np.ones(count)


def _natural(layout: _Layout, theta: np.ndarray, fixed_e: float | None) -> dict[str, float | None]:
    values = dict(zip(layout.names, theta, strict=True))
    return {
        "A": float(math.exp(values["a"])) if "a" in values else None,
        "B": float(math.exp(values["b"])) if "b" in values else None,
        "E": float(math.exp(values["e"])) if "e" in values else fixed_e,
        "alpha": float(values["alpha"]) if "alpha" in values else None,
        "beta": float(values["beta"]) if "beta" in values else None,
    }


def _predict(
    layout: _Layout, theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray
) -> np.ndarray:
    terms = layout.terms(theta[None, :], log_n, log_d)[0]
    return np.exp(terms).sum(axis=0)


# ---------------------------------------------------------------------------
# Compute-optimal allocation


@dataclass(frozen=True)
class ComputeOptimal:
    """N_opt = G (C/6)^a and D_opt = (C/6)^b / G, with intervals on a and b."""

    a: float
    b: float
    g: float
    a_interval: list[float] | None
    b_interval: list[float] | None

    def n_opt(self, compute: np.ndarray | float) -> np.ndarray:
        return self.g * (np.asarray(compute, dtype=np.float64) / 6.0) ** self.a

    def d_opt(self, compute: np.ndarray | float) -> np.ndarray:
        return (np.asarray(compute, dtype=np.float64) / 6.0) ** self.b / self.g


def has_compute_optimal(fit: Fit) -> bool:
    """An ND fit whose exponents and coefficients are all positive (both terms present)."""
    p = fit.parameters
    vanished = {"A", "B", "alpha", "beta"} & set(fit.at_bound) - {"alpha", "beta"}
    return (
        fit.form == "ND" and not vanished and all(p[name] for name in ("A", "B", "alpha", "beta"))
    )


def compute_optimal(fit: Fit) -> ComputeOptimal:
    """Chinchilla's allocation of a compute budget C = 6 N D under an ND fit."""
    p = fit.parameters
    if not has_compute_optimal(fit):
        raise LlamaTrainError(
            "the compute-optimal allocation needs an ND fit with A, B, alpha, beta > 0"
        )
    alpha, beta, a_coef, b_coef = p["alpha"], p["beta"], p["A"], p["B"]
    assert alpha is not None and beta is not None and a_coef is not None and b_coef is not None
    g = (alpha * a_coef / (beta * b_coef)) ** (1.0 / (alpha + beta))
    a_interval = b_interval = None
    if "alpha" in fit.samples and "beta" in fit.samples:
        alphas, betas = np.asarray(fit.samples["alpha"]), np.asarray(fit.samples["beta"])
        keep = (alphas + betas) > 0
        a_values = betas[keep] / (alphas[keep] + betas[keep])
        a = beta / (alpha + beta)
        widened = percentile_intervals(
            [{"a": float(value)} for value in a_values],
            ["a"],
            {"a": a},
            fit.level,
            small_sample_factor(fit.groups, len(fit.samples)) or 1.0,
        )[0].get("a")
        if widened is not None:
            low, high = widened[0], min(widened[1], 1.0)
            a_interval = [low, high]
            b_interval = [1.0 - high, 1.0 - low]
    return ComputeOptimal(
        a=beta / (alpha + beta),
        b=alpha / (alpha + beta),
        g=float(g),
        a_interval=a_interval,
        b_interval=b_interval,
    )
