"""Per-point weights of a fit from the seed noise a study measured.

A study with 2+ seeds knows, per (N, D) point, the standard deviation of the loss over
its seeds (`loss_seed_std`, written by ``study collect``). Both fitters minimise
relative residuals (vpnls: (L_pred - L) / L; approach 3: log L_pred - log L, the same to
first order), so the natural weight of a row is the inverse of its *relative* noise,
sd / target: the fit is then weighted least squares, the maximum-likelihood fit under
Gaussian seed noise, and a point whose seeds disagree pulls less than one whose seeds
agree. Without weights every point counts as if its noise were the same fraction of
its loss, which over-weights small-D points, whose seed spread is largest.

The sd of a point comes from a handful of seeds (two, typically): with two seeds its
relative error is about 75%, and a pair that agrees by chance would get an unbounded
weight. So every relative sd is floored at FLOOR_FRACTION of the median over the table,
which bounds any row's weight at (1 / FLOOR_FRACTION)^2 = 16 times the typical row's; a
row without a measured sd (one seed: an empty cell) gets the median. The scales are
divided by their median, so an objective keeps the units of the unweighted one (and
approach 3's Huber delta the meaning it has there).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from llama_train.errors import LlamaTrainError

FLOOR_FRACTION = 0.25


def relative_scale(
    noise: Sequence[float | None] | np.ndarray | None, target: np.ndarray
) -> np.ndarray:
    """Each row's relative noise sd / target, floored and divided by the median (ones
    without noise, or when no row has a measured sd)."""
    count = len(target)
    if noise is None:
        return np.ones(count)
    values = np.array([np.nan if v is None else float(v) for v in noise], dtype=np.float64)
    if len(values) != count:
        raise LlamaTrainError(f"{len(values)} seed-noise values for {count} rows")
    if np.any(values[np.isfinite(values)] < 0) or np.any(np.isinf(values)):
        raise LlamaTrainError("every seed noise (loss_seed_std) must be finite and >= 0")
    relative = values / target
    measured = relative[np.isfinite(relative) & (relative > 0)]
    if not len(measured):
        return np.ones(count)
    median = float(np.median(measured))
    relative = np.where(np.isfinite(relative), relative, median)
    return np.maximum(relative, FLOOR_FRACTION * median) / median


def table_noise(rows: Sequence[dict[str, Any]], column: str = "loss_seed_std") -> np.ndarray | None:
    """The seed sd of each collected row (NaN where empty), or None when no row has one:
    the weights ``study plot`` fits with (a study with one seed per point is unweighted)."""
    values = []
    for row in rows:
        cell = row.get(column)
        text = "" if cell is None else str(cell).strip()
        values.append(float(text) if text else np.nan)
    array = np.asarray(values, dtype=np.float64)
    return array if np.isfinite(array).any() else None
