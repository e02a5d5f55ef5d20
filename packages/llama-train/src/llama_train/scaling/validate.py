"""Validation of a scaling-law fit by prediction and by recovery, on the study's own design.

- Holdout of the largest model: refit without the largest N and predict the held-out
  losses. The error is printed in nats, as a fraction of the loss and of the excess
  over the floor; the check passes when every held-out loss is predicted within
  ``TOLERANCE`` (1%) of itself (the goal of the study; OLMo-core's ladder and Marin
  validate the same way).
- Leave-future-out over compute: refit on the runs below the largest quarter of the
  compute and predict that quarter, with the same threshold.
- Recovery: simulate tables from the fitted law on the study's own (N, D) rows, with
  log-normal noise of the measured residual spread, refit each with bootstrap
  intervals, and report the bias of alpha and beta and how often their intervals hold
  the simulated truth. A grid that cannot identify its exponents shows it here before
  more compute is spent on it.

:func:`validate` runs all three; :meth:`Validation.lines` is what `llama-train fit`
and `llama-train study plot` print.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from llama_train.errors import LlamaTrainError
from llama_train.scaling.fit import Fit, Form
from llama_train.scaling.methods import DEFAULT_METHOD, fit_points
from llama_train.scaling.noise import table_noise

TOLERANCE = 0.01  # of the loss: the prediction goal
FUTURE_FRACTION = 0.25  # leave-future-out: the largest quarter of the compute
EXPONENTS = ("alpha", "beta")


@dataclass(frozen=True)
class Design:
    """What a validation refits: the table, and how the fit was made.

    `target` is what the fit saw (the loss, or the excess with ``fixed_e=0``); the loss
    is ``target + offset`` (offset: the entropy in the excess mode, else 0); `floor` is
    the exact entropy when known, the floor the excess is measured against.
    """

    n: np.ndarray
    d: np.ndarray
    target: np.ndarray
    form: Form = "ND"
    fixed_e: float | None = None
    method: str = DEFAULT_METHOD
    groups: np.ndarray | None = None
    level: float = 0.95
    offset: float = 0.0
    floor: float | None = None
    noise: np.ndarray | None = None  # the seed sd of each row's loss: the fit's weights

    def refit(
        self,
        index: np.ndarray,
        *,
        target: np.ndarray | None = None,
        bootstrap: int = 0,
        seed: int = 0,
    ) -> Fit:
        values = self.target if target is None else target
        return fit_points(
            self.n[index],
            self.d[index],
            values[index],
            method=self.method,
            form=self.form,
            fixed_e=self.fixed_e,
            bootstrap=bootstrap,
            level=self.level,
            seed=seed,
            groups=None if self.groups is None else self.groups[index],
            noise=None if self.noise is None else self.noise[index],
        )


@dataclass
class Prediction:
    """A fit on some rows predicting the others."""

    name: str
    held_out: str  # which rows, in words
    error: list[float] = field(default_factory=list)  # predicted - observed loss, nats
    loss: list[float] = field(default_factory=list)
    excess: list[float] = field(default_factory=list)  # observed loss - floor
    reason: str | None = None  # why there is no prediction

    @property
    def worst_fraction(self) -> float | None:
        if not self.error:
            return None
        return float(np.max(np.abs(self.error) / np.asarray(self.loss)))

    @property
    def passed(self) -> bool | None:
        worst = self.worst_fraction
        return None if worst is None else worst <= TOLERANCE

    def line(self) -> str:
        if self.reason is not None:
            return f"{self.name} ({self.held_out}): not checked: {self.reason}"
        error = np.asarray(self.error)
        worst = int(np.argmax(np.abs(error)))
        excess = self.excess[worst]
        of_excess = (
            f"{abs(error[worst]) / excess:.1%} of the excess" if excess > 0 else "excess <= 0"
        )
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"{self.name} ({self.held_out}): mean error {error.mean():+.4f} nats, worst "
            f"{error[worst]:+.4f} nats = {self.worst_fraction:.2%} of the loss, {of_excess}; "
            f"{verdict} (threshold {TOLERANCE:.0%} of the loss)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "held_out": self.held_out,
            "error_nats": self.error,
            "loss": self.loss,
            "excess": self.excess,
            "worst_fraction_of_loss": self.worst_fraction,
            "threshold": TOLERANCE,
            "passed": self.passed,
            "reason": self.reason,
        }


def _predict_rows(
    design: Design, train: np.ndarray, test: np.ndarray, prediction: Prediction
) -> Prediction:
    if not test.any() or not train.any():
        prediction.reason = "nothing to hold out" if not test.any() else "nothing left to fit"
        return prediction
    try:
        fit = design.refit(np.flatnonzero(train))
    except LlamaTrainError as error:
        prediction.reason = str(error)
        return prediction
    predicted = fit.predict(design.n[test], design.d[test]) + design.offset
    observed = design.target[test] + design.offset
    floor = (
        design.floor if design.floor is not None else (fit.parameters["E"] or 0.0) + design.offset
    )
    prediction.error = [float(value) for value in predicted - observed]
    prediction.loss = [float(value) for value in observed]
    prediction.excess = [float(value) for value in observed - floor]
    return prediction


def holdout_largest(design: Design) -> Prediction:
    """Fit without the largest N; predict its rows."""
    largest = float(design.n.max())
    test = design.n == largest
    prediction = Prediction(
        "holdout of the largest model", f"N = {largest:,.0f}, {int(test.sum())} row(s)"
    )
    if design.form == "D":
        prediction.reason = "the law has no N"
        return prediction
    return _predict_rows(design, ~test, test, prediction)


def leave_future_out(design: Design) -> Prediction:
    """Fit on the runs below the largest quarter of the compute; predict that quarter."""
    compute = 6.0 * design.n * design.d
    order = np.argsort(compute, kind="stable")
    count = max(1, round(FUTURE_FRACTION * len(order)))
    cutoff = float(compute[order[-count]])
    test = compute >= cutoff
    prediction = Prediction(
        "leave-future-out over compute", f"C = 6ND >= {cutoff:.3g}, {int(test.sum())} row(s)"
    )
    return _predict_rows(design, ~test, test, prediction)


@dataclass
class Recovery:
    """Refits of tables simulated from the fit on its own design."""

    replicates: int
    bootstrap: int
    noise: float  # sd of the log-normal noise, from the residuals
    truth: dict[str, float]
    bias: dict[str, float] = field(default_factory=dict)
    spread: dict[str, float] = field(default_factory=dict)  # sd of the estimates
    coverage: dict[str, float] = field(default_factory=dict)  # of the intervals that exist
    no_interval: dict[str, int] = field(default_factory=dict)
    failed: int = 0  # replicates whose fit was refused
    level: float = 0.95

    def lines(self) -> list[str]:
        lines = [
            f"recovery: {self.replicates} tables simulated from the fit on its own (N, D) rows, "
            f"log-normal noise sd {self.noise:.4g} (the residuals'), {self.bootstrap} bootstrap "
            "resamples each" + (f"; {self.failed} refused" if self.failed else "")
        ]
        for name in self.bias:
            lines.append(
                f"  {name}: truth {self.truth[name]:.4g}, bias {self.bias[name]:+.4f}, sd "
                f"{self.spread[name]:.4f}, {self.level:.0%} intervals hold the truth in "
                f"{self.coverage[name]:.0%} of replicates"
                + (
                    f" ({self.no_interval[name]} without an interval)"
                    if self.no_interval[name]
                    else ""
                )
            )
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "replicates": self.replicates,
            "bootstrap": self.bootstrap,
            "noise": self.noise,
            "truth": self.truth,
            "bias": self.bias,
            "sd": self.spread,
            "coverage": self.coverage,
            "no_interval": self.no_interval,
            "failed": self.failed,
            "level": self.level,
        }


def recovery(
    design: Design, fit: Fit, replicates: int, *, bootstrap: int, seed: int = 0
) -> Recovery:
    """Simulate `replicates` tables from `fit` at the design's rows and refit each.

    The noise is log-normal with the fit's residual spread, corrected for the fitted
    parameters (rms * sqrt(M / (M - p))); a replicate without an interval (the fit
    could not bound the exponent) counts as not covering.
    """
    names = [name for name in EXPONENTS if fit.parameters[name] is not None]
    count = len(design.target)
    free = sum(fit.parameters[name] is not None for name in ("A", "B", "alpha", "beta")) + (
        fit.e_mode == "free"
    )
    noise = fit.rms_log_residual * math.sqrt(count / max(count - free, 1))
    truth = {name: float(fit.parameters[name]) for name in names}  # type: ignore[arg-type]
    clean = fit.predict(design.n, design.d)
    rng = np.random.default_rng(seed)
    everything = np.arange(count)
    estimates: dict[str, list[float]] = {name: [] for name in names}
    covered = dict.fromkeys(names, 0)
    missing = dict.fromkeys(names, 0)
    failed = 0
    for replicate in range(replicates):
        simulated = clean * np.exp(rng.normal(0.0, noise, count))
        try:
            refit = design.refit(
                everything, target=simulated, bootstrap=bootstrap, seed=seed + replicate
            )
        except LlamaTrainError:
            failed += 1
            continue
        for name in names:
            estimates[name].append(float(refit.parameters[name]))  # type: ignore[arg-type]
            interval = refit.intervals.get(name)
            if interval is None:
                missing[name] += 1
            elif interval[0] <= truth[name] <= interval[1]:
                covered[name] += 1
    result = Recovery(replicates, bootstrap, noise, truth, failed=failed, level=design.level)
    done = replicates - failed
    for name in names:
        values = np.asarray(estimates[name])
        result.bias[name] = float(values.mean() - truth[name]) if done else math.nan
        result.spread[name] = float(values.std()) if done else math.nan
        result.coverage[name] = covered[name] / done if done else math.nan
        result.no_interval[name] = missing[name]
    return result


@dataclass
class Validation:
    """Holdout, leave-future-out and (optionally) recovery of one fit."""

    holdout: Prediction
    future: Prediction
    recovery: Recovery | None = None

    def lines(self) -> list[str]:
        lines = [self.holdout.line(), self.future.line()]
        if self.recovery is not None:
            lines += self.recovery.lines()
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "holdout_largest": self.holdout.to_dict(),
            "leave_future_out": self.future.to_dict(),
            "recovery": None if self.recovery is None else self.recovery.to_dict(),
        }


def validate(
    design: Design, fit: Fit, *, recovery_replicates: int = 0, bootstrap: int = 100, seed: int = 0
) -> Validation:
    """Holdout of the largest N, leave-future-out, and recovery when replicates > 0."""
    result = Validation(holdout_largest(design), leave_future_out(design))
    if recovery_replicates > 0:
        result.recovery = recovery(design, fit, recovery_replicates, bootstrap=bootstrap, seed=seed)
    return result


def design_of(fit: Fit, n: Any, d: Any, target: Any, **options: Any) -> Design:
    """The design of a fit (same form, E mode, method and level) over its table."""
    design = Design(
        n=np.asarray(n, dtype=np.float64) if n is not None else np.ones(len(target)),
        d=np.asarray(d, dtype=np.float64) if d is not None else np.ones(len(target)),
        target=np.asarray(target, dtype=np.float64),
        form=fit.form,
        fixed_e=fit.fixed_e,
        method=fit.method,
        level=fit.level,
    )
    return replace(design, **options)


def validate_table(
    rows: list[dict[str, Any]],
    fit: Fit,
    *,
    entropy: float | None = None,
    recovery_replicates: int = 0,
    bootstrap: int = 20,
    seed: int = 0,
) -> Validation:
    """:func:`validate` for a fit of a study's rows (``N``, ``D``, ``loss``, ``group``).

    What `llama-train study plot` prints under each regime. `fit` was made on these
    rows' losses (E free or fixed); `entropy` is the exact floor the excess is measured
    against.
    """
    n = np.asarray([float(row["N"]) for row in rows])
    d = np.asarray([float(row["D"]) for row in rows])
    loss = np.asarray([float(row["loss"]) for row in rows])
    groups = np.asarray([str(row.get("group") or index) for index, row in enumerate(rows)])
    noise = table_noise(rows) if fit.weights == "seed-noise" else None
    design = design_of(fit, n, d, loss, groups=groups, floor=entropy, noise=noise)
    return validate(
        design, fit, recovery_replicates=recovery_replicates, bootstrap=bootstrap, seed=seed
    )
