"""Bootstrap by run: resample whole groups of rows, and intervals that admit ignorance.

Rows of a study are not independent: a trunk and the cooldown branches forked from it
share every step before the fork, and seeds of one point share their design. Resampling
rows would count one trunk's luck several times as if it were several observations and
give intervals that are too narrow; resampling groups (a trunk with its branches) keeps
what is shared together. Without group labels every row is its own group, which is the
ordinary row bootstrap.

A percentile interval of zero width does not mean the parameter is known: it means the
resamples did not vary (identical rows, a single group, or a fit pinned to a bound in
every resample). :func:`percentile_intervals` reports no interval then, and says why.

With few runs the percentile bootstrap is too narrow: each resample refits residuals
that the fit has already shrunk, by a factor (G - p) / G in variance for G groups and p
free parameters, the correction ordinary least squares makes with G - p degrees of
freedom. :func:`small_sample_factor` widens both sides of the interval about the
estimate by sqrt(G / (G - p)) (1.15 on a 16-run study with A, B, alpha, beta free).
On the 4 x 4 study grid with 0.5% noise, 95% intervals of alpha and beta held the truth
in about 82-91% of replicates without it and 91% or more with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from llama_train.errors import LlamaTrainError


def group_codes(groups: Sequence[Any] | np.ndarray | None, count: int) -> np.ndarray:
    """One integer per row naming its group (0..G-1); None: every row its own group."""
    if groups is None:
        return np.arange(count)
    labels = [str(label) for label in groups]
    if len(labels) != count:
        raise LlamaTrainError(f"{len(labels)} group labels for {count} rows")
    _, codes = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    return codes.astype(np.int64)


class GroupResampler:
    """Draws bootstrap resamples of row indices, whole groups at a time."""

    def __init__(self, codes: np.ndarray, seed: int) -> None:
        order = np.argsort(codes, kind="stable")
        counts = np.bincount(codes)
        self.members = np.split(order, np.cumsum(counts)[:-1])
        self.rng = np.random.default_rng(seed)

    @property
    def n_groups(self) -> int:
        return len(self.members)

    def draw(self) -> np.ndarray:
        """Row indices of one resample: G groups drawn with replacement."""
        chosen = self.rng.integers(0, self.n_groups, size=self.n_groups)
        return np.concatenate([self.members[index] for index in chosen])


def small_sample_factor(groups: int, free: int) -> float | None:
    """sqrt(G / (G - p)): how much wider than the percentiles an interval is drawn; None
    when there are no more groups than free parameters (no interval at all)."""
    if groups <= free:
        return None
    return math.sqrt(groups / (groups - free))


def percentile_intervals(
    samples: list[dict[str, float | None]],
    names: Sequence[str],
    estimates: dict[str, float | None],
    level: float,
    widen: float = 1.0,
) -> tuple[dict[str, list[float] | None], dict[str, list[float]], list[str]]:
    """Percentile intervals of `names` over resamples, the samples, and flags.

    Each side is widened by `widen` about the estimate (every parameter of these laws is
    non-negative, so the lower end stops at 0). A parameter whose resamples all agree
    (relative spread under 1e-6) gets no interval and a flag: identical resamples
    measure the design, not the uncertainty.
    """
    intervals: dict[str, list[float] | None] = {}
    kept: dict[str, list[float]] = {}
    flags: list[str] = []
    tail = (1.0 - level) / 2.0 * 100.0
    for name in names:
        values = [sample[name] for sample in samples if sample.get(name) is not None]
        if not values:
            continue
        array = np.asarray(values, dtype=np.float64)
        kept[name] = [float(value) for value in array]
        low, high = np.percentile(array, [tail, 100.0 - tail])
        scale = max(abs(float(estimates.get(name) or 0.0)), abs(float(low)), abs(float(high)))
        if high - low <= 1e-6 * max(scale, 1e-300):
            intervals[name] = None
            flags.append(
                f"{name}: every resample gave the same value, so no interval "
                "(identical rows, one run group, or a parameter pinned to a bound)"
            )
            continue
        estimate = float(estimates.get(name) or 0.0)
        low = max(0.0, estimate - widen * (estimate - float(low)))
        high = estimate + widen * (float(high) - estimate)
        intervals[name] = [low, high]
    return intervals, kept, flags
