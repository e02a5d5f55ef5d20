"""Chinchilla's approaches 1 and 2: compute-optimal model size read off the runs directly.

Both estimate the exponent a of N_opt(C) ~ C^a without assuming the law's form, to be
set beside a = beta / (alpha + beta) of a parametric fit (approach 3 or variable
projection). Compute is C = 6 N D here, the convention of the parametric allocation
(:func:`llama_train.scaling.fit.compute_optimal`), so the three are comparable.

- Approach 1, the frontier: a run is on the frontier when no run of at most its compute
  reaches a lower loss (the lower envelope of loss against compute); log N of the
  frontier runs against log C is fitted by least squares. Chinchilla took the envelope
  of training curves; with final losses only, the envelope is over runs.
- Approach 2, IsoFLOP profiles: runs are binned into compute levels, each level a run of
  sorted compute values within a factor ``LEVEL_SPAN`` (1.2) of its smallest member
  (a study grid whose N and D are geometric with one ratio lines its points up on exact
  isoFLOP diagonals; other designs get levels that are nearly iso). At each level with
  at least 3 distinct N, a parabola in log N is fitted to the loss; its vertex is that
  level's N_opt when the parabola opens upwards and the vertex lies inside the sampled
  N (else the level is skipped, and said). log N_opt against the level's log C
  (geometric mean) gives a.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LEVEL_SPAN = 1.2
MIN_LEVEL_SIZES = 3


@dataclass
class Allocation:
    """N_opt(C) = k C^a from one approach: the exponent and the (C, N_opt) it used."""

    approach: str
    a: float | None  # None: not enough points; `notes` says why
    coefficient: float | None
    compute: list[float] = field(default_factory=list)
    n_opt: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "approach": self.approach,
            "a": self.a,
            "b": None if self.a is None else 1.0 - self.a,
            "coefficient": self.coefficient,
            "compute": self.compute,
            "N_opt": self.n_opt,
            "notes": self.notes,
        }


def _power_law(
    approach: str, compute: np.ndarray, n_opt: np.ndarray, notes: list[str]
) -> Allocation:
    """Least squares of log N_opt on log C; needs two distinct compute values."""
    allocation = Allocation(
        approach,
        None,
        None,
        [float(c) for c in compute],
        [float(value) for value in n_opt],
        notes,
    )
    if len(np.unique(compute)) < 2:
        if len(compute):
            notes.append(f"{len(compute)} optima at one compute value: an exponent needs two")
        return allocation
    slope, intercept = np.polyfit(np.log(compute), np.log(n_opt), 1)
    allocation.a = float(slope)
    allocation.coefficient = float(math.exp(intercept))
    return allocation


def frontier(n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of the frontier runs, by increasing compute (ties: the lower loss first)."""
    compute = 6.0 * np.asarray(n) * np.asarray(d)
    order = np.lexsort((loss, compute))
    chosen, best = [], math.inf
    for index in order:
        if loss[index] < best:
            chosen.append(int(index))
            best = float(loss[index])
    return np.asarray(chosen, dtype=np.int64)


def approach1(n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> Allocation:
    """Approach 1: N of the frontier runs against their compute."""
    n, d, loss = (np.asarray(values, dtype=np.float64) for values in (n, d, loss))
    chosen = frontier(n, d, loss)
    return _power_law("1: frontier", 6.0 * n[chosen] * d[chosen], n[chosen], [])


def compute_levels(compute: np.ndarray) -> list[np.ndarray]:
    """Indices of each compute level (see the module docstring), smallest compute first."""
    order = np.argsort(compute, kind="stable")
    levels: list[list[int]] = []
    floor = -math.inf
    for index in order:
        if compute[index] > floor * LEVEL_SPAN:
            levels.append([])
            floor = float(compute[index])
        levels[-1].append(int(index))
    return [np.asarray(level, dtype=np.int64) for level in levels]


@dataclass(frozen=True)
class Profile:
    """One isoFLOP level's parabola: loss = c2 x^2 + c1 x + c0 with x = log N."""

    compute: float
    c2: float
    c1: float
    c0: float
    log_n_range: tuple[float, float]
    members: tuple[int, ...] = ()  # the rows of the level, indices into the table

    @property
    def n_opt(self) -> float | None:
        """The vertex, when the parabola opens upwards and the vertex is inside the data."""
        if self.c2 <= 0:
            return None
        vertex = -self.c1 / (2.0 * self.c2)
        low, high = self.log_n_range
        return math.exp(vertex) if low <= vertex <= high else None


def isoflop_profiles(n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> list[Profile]:
    """A parabola in log N per compute level with at least 3 distinct N."""
    n, d, loss = (np.asarray(values, dtype=np.float64) for values in (n, d, loss))
    compute = 6.0 * n * d
    profiles = []
    for level in compute_levels(compute):
        x = np.log(n[level])
        if len(np.unique(x)) < MIN_LEVEL_SIZES:
            continue
        c2, c1, c0 = np.polyfit(x, loss[level], 2)
        profiles.append(
            Profile(
                compute=float(np.exp(np.mean(np.log(compute[level])))),
                c2=float(c2),
                c1=float(c1),
                c0=float(c0),
                log_n_range=(float(x.min()), float(x.max())),
                members=tuple(int(index) for index in level),
            )
        )
    return profiles


def approach2(n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> Allocation:
    """Approach 2: the vertices of the isoFLOP parabolas against their compute."""
    profiles = isoflop_profiles(n, d, loss)
    notes = []
    kept = [profile for profile in profiles if profile.n_opt is not None]
    for profile in profiles:
        if profile.n_opt is None:
            notes.append(
                f"level C = {profile.compute:.3g}: the parabola has no minimum inside its N "
                "range; skipped"
            )
    if not profiles:
        notes.append(
            f"no compute level holds {MIN_LEVEL_SIZES} distinct N (levels span a factor "
            f"{LEVEL_SPAN}); approach 2 needs an isoFLOP grid"
        )
    compute = np.asarray([profile.compute for profile in kept])
    n_opt = np.asarray([profile.n_opt for profile in kept])
    return _power_law("2: isoFLOP", compute, n_opt, notes)
