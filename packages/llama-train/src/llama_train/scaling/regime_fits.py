"""The fits every study gets, per regime: E free, E fixed to the exact entropy, excess loss.

E free is what any scaling-law tool can do, fitted as Chinchilla's approach 3 (the
diagnostic: comparing the free E, with its bootstrap interval, to the exact entropy
checks the fitted asymptote against the truth); E fixed to the exact entropy of the
test sequences uses what only a GSSM store knows, fitted by variable projection (only
the exponents are searched); the excess loss L - entropy is fitted as a pure power law
A/N^alpha + B/D^beta, also by variable projection. Bootstraps resample run groups (the
``group`` column of the study's table).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from llama_train.errors import LlamaTrainError
from llama_train.scaling.fit import Fit, fit_law
from llama_train.scaling.noise import table_noise
from llama_train.scaling.vpnls import fit_vpnls


@dataclass
class RegimeFits:
    regime: str
    entropy: float  # nats per token, the exact floor
    rows: list[dict[str, Any]]
    free: Fit
    exact: Fit
    excess: Fit

    def to_dict(self) -> dict[str, Any]:
        return {
            "regime": self.regime,
            "entropy": self.entropy,
            "points": len(self.rows),
            "free_E": self.free.to_dict(),
            "exact_E": self.exact.to_dict(),
            "excess": self.excess.to_dict(),
        }


def by_regime(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(str(row["regime"]), []).append(row)
    return groups


def exact_entropy(rows: list[dict[str, Any]], column: str = "entropy") -> float:
    """The regime's exact entropy: one value shared by its rows (same test sequences)."""
    values = np.asarray([float(row[column]) for row in rows])
    middle = float(np.mean(values))
    if np.max(np.abs(values - middle)) > 1e-6 * max(abs(middle), 1.0):
        raise LlamaTrainError(
            f"the {column} column varies within the fitted rows ({values.min():.6g} to "
            f"{values.max():.6g}): --fix-E exact needs one floor; select one regime"
        )
    return middle


MIN_POINTS = 5  # free parameters of the ND law with E free


def fit_regimes(
    rows: list[dict[str, Any]],
    *,
    bootstrap: int = 100,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[RegimeFits]:
    """The three fits of every regime with enough points (others are named in `log`, as
    are regimes whose table cannot identify the law).

    A point whose loss is not above the exact entropy (possible by sampling noise on a
    small evaluation set, once a model is at the floor) has no log excess: it is left
    out of the excess fit only. A regime with seed noise (`loss_seed_std`, 2+ seeds) is
    fitted weighted by it (:mod:`llama_train.scaling.noise`).
    """
    say = log or (lambda message: None)
    results = []
    for regime, members in by_regime(rows).items():
        if len(members) < MIN_POINTS:
            say(f"{regime}: {len(members)} finished point(s), a fit needs {MIN_POINTS}; skipped")
            continue
        n = np.asarray([float(row["N"]) for row in members])
        d = np.asarray([float(row["D"]) for row in members])
        loss = np.asarray([float(row["loss"]) for row in members])
        entropy = exact_entropy(members)
        above = loss > entropy
        if not above.all():
            say(
                f"{regime}: {int((~above).sum())} point(s) at or below the floor are left "
                "out of the excess fit"
            )
        groups = np.asarray([str(row.get("group") or index) for index, row in enumerate(members)])
        noise = table_noise(members)
        common = {"bootstrap": bootstrap, "seed": seed}
        try:
            fits = RegimeFits(
                regime=regime,
                entropy=entropy,
                rows=members,
                free=fit_law(n, d, loss, groups=groups, noise=noise, **common),
                exact=fit_vpnls(n, d, loss, fixed_e=entropy, groups=groups, noise=noise, **common),
                excess=fit_vpnls(
                    n[above],
                    d[above],
                    loss[above] - entropy,
                    fixed_e=0.0,
                    groups=groups[above],
                    noise=None if noise is None else noise[above],
                    **common,
                ),
            )
        except LlamaTrainError as error:
            # A single N, every loss under the floor...: this regime says why, the others fit.
            say(f"{regime}: not fitted: {error}")
            continue
        results.append(fits)
    if not results:
        raise LlamaTrainError(f"no regime has the {MIN_POINTS} finished points a fit needs yet")
    return results
