"""Linear probes: softmax regression with an L2 penalty chosen by cross-validation.

One model serves both probes of ``llama_train.recipe.probe``: a linear map of the
(standardised) features followed by a softmax, fitted to *soft* targets by
minimising the cross-entropy -sum_s q_s log p_s plus (penalty / 2) |W|^2.

- the latent-state classifier is the case of one-hot targets (the true state);
- the belief probe regresses onto the exact posterior q = p(z_t | x_<=t): its
  loss is KL(q || p) plus the posterior's entropy (a constant), so it fits the
  belief vector in the geometry of distributions and its prediction is always a
  distribution (KL is defined), while R^2 measures it as a regression.

Fitted by full-batch L-BFGS (scipy; values and gradients by torch, on the
features' device) from zero weights and the targets' mean as
bias; with a strictly convex objective the optimum does not depend on the
start, and the result is deterministic for a given device and thread count.
The penalty is chosen among :data:`PENALTIES` by K-fold cross-validation whose
folds are whole *sequences* (positions of one sequence are never split between
fitting and scoring: neighbouring positions share most of their context).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.optimize
import torch
from torch import Tensor

# Penalties tried by cross-validation, on standardised features (strongest first, so
# each fit starts from the previous, smoother solution).
PENALTIES = (1e-2, 1e-3, 1e-4, 1e-5)
# L-BFGS converges in a few dozen iterations on these convex problems; the cap only
# bounds the cost of a badly conditioned one.
MAX_ITERATIONS = 50
# Objective evaluations per L-BFGS-B iteration, its line search included: 1.12 measured over
# the 270 fits of a default probe of a 2-layer model (15,101 evaluations, 13,457 iterations).
EVALUATIONS_PER_ITERATION = 1.15
# A feature whose spread is below this is constant for the probe (e.g. a dead unit).
MIN_SCALE = 1e-6
# Probabilities are floored here before a log: a probe is never infinitely surprised.
MIN_PROBABILITY = 1e-12


@dataclass(frozen=True)
class SoftmaxProbe:
    """A fitted probe: standardisation, then softmax(x W + b)."""

    mean: Tensor  # (D,)
    scale: Tensor  # (D,)
    weight: Tensor  # (D, C)
    bias: Tensor  # (C,)
    penalty: float

    def log_probs(self, features: Tensor) -> Tensor:
        """log p(state | features), (N, C), float64."""
        x = (features.double() - self.mean) / self.scale
        return torch.log_softmax(x @ self.weight + self.bias, dim=1)


def fit(
    features: Tensor,
    targets: Tensor,
    penalty: float,
    *,
    start: SoftmaxProbe | None = None,
    max_iterations: int = MAX_ITERATIONS,
) -> SoftmaxProbe:
    """Fit softmax(x W + b) to target distributions (N, C) with penalty (penalty / 2) |W|^2.

    `start` (a probe fitted on the same rows) warm-starts the weights.
    """
    features = features.double()
    targets = targets.to(features)
    mean = features.mean(dim=0)
    scale = features.std(dim=0).clamp_min(MIN_SCALE)
    x = (features - mean) / scale
    n_features, n_states = x.shape[1], targets.shape[1]
    if start is None:
        weight = torch.zeros(n_features, n_states, dtype=x.dtype, device=x.device)
        bias = targets.mean(dim=0).clamp_min(MIN_PROBABILITY).log()
    else:
        weight, bias = start.weight.to(x), start.bias.to(x)
    n_weights = weight.numel()
    objective = _objective(x, targets, penalty)

    # scipy's L-BFGS-B rather than torch.optim.LBFGS: the same method, without the
    # seconds torch.optim spends importing its compiler on first use.
    start_theta = torch.cat([weight.reshape(-1), bias]).cpu().numpy()
    with torch.enable_grad():
        solution = scipy.optimize.minimize(
            objective,
            start_theta,
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": max_iterations, "gtol": 1e-6},
        )
    theta = torch.from_numpy(solution.x).to(x.device)
    fitted_weight = theta[:n_weights].view(n_features, n_states)
    return SoftmaxProbe(mean, scale, fitted_weight, theta[n_weights:], penalty)


def _objective(
    x: Tensor, targets: Tensor, penalty: float
) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
    """The penalised cross-entropy and its gradient, of the flat parameters (W, b)."""
    n_features, n_states = x.shape[1], targets.shape[1]
    n_weights = n_features * n_states
    # The (N, D) x (D, C) product dominates: float32 (3x faster on CPUs); the softmax, the
    # loss and the parameters stay float64, which L-BFGS's line search needs.
    x32 = x.float()

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        parameters = torch.from_numpy(theta).to(x.device).requires_grad_(True)
        w = parameters[:n_weights].view(n_features, n_states)
        logits = (x32 @ w.float()).double() + parameters[n_weights:]
        log_p = torch.log_softmax(logits, dim=1)
        loss = -(targets * log_p).sum(dim=1).mean() + 0.5 * penalty * w.square().sum()
        (gradient,) = torch.autograd.grad(loss, parameters)
        return float(loss.detach()), gradient.cpu().numpy()

    return objective


def evaluation_seconds(
    n_rows: int, n_features: int, n_states: int, device: torch.device, span: float = 0.25
) -> float:
    """Wall seconds one evaluation of :func:`fit`'s objective takes at this size, with
    the current threads: the mean over at least `span` seconds (and 3 evaluations)
    after one warm-up, on random features.

    Timing over a span rather than the fastest of a few lets the machine's load show:
    on a busy CPU the process is descheduled for part of it, as it will be while
    fitting. A fit costs at most `max_iterations` L-BFGS iterations of about
    :data:`EVALUATIONS_PER_ITERATION` evaluations each, which is what
    `llama-train probe` announces before it starts.
    """
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n_rows, n_features, generator=generator, dtype=torch.float64).to(device)
    targets = torch.full((n_rows, n_states), 1 / n_states, dtype=torch.float64, device=device)
    objective = _objective(x, targets, PENALTIES[0])
    theta = np.zeros(n_features * n_states + n_states)
    with torch.enable_grad():
        objective(theta)  # warm-up: first-call allocations
        count, started = 0, time.perf_counter()
        while count < 3 or time.perf_counter() - started < span:
            objective(theta)
            count += 1
    return (time.perf_counter() - started) / count


def soft_cross_entropy(log_p: Tensor, targets: Tensor) -> float:
    """Mean over rows of -sum_s q_s log p_s."""
    return float(-(targets.to(log_p) * log_p).sum(dim=1).mean())


def cross_validate(
    features: Tensor,
    targets: Tensor,
    folds: np.ndarray,
    penalties: Sequence[float] = PENALTIES,
) -> tuple[float, dict[float, float]]:
    """The penalty with the lowest held-out cross-entropy, and every penalty's mean score.

    `folds[i]` is the fold of row i (all rows of a sequence share one fold).
    """
    fold_ids = np.unique(folds)
    scores = dict.fromkeys(penalties, 0.0)
    for fold in fold_ids:
        held_out = torch.as_tensor(folds == fold, device=features.device)
        fitted: SoftmaxProbe | None = None
        for penalty in sorted(penalties, reverse=True):
            fitted = fit(features[~held_out], targets[~held_out], penalty, start=fitted)
            score = soft_cross_entropy(fitted.log_probs(features[held_out]), targets[held_out])
            scores[penalty] += score / len(fold_ids)
    best = min(penalties, key=lambda penalty: (scores[penalty], -penalty))
    return best, scores


# --- metrics -------------------------------------------------------------------------


def accuracy(log_p: Tensor, labels: Tensor) -> float:
    return float((log_p.argmax(dim=1) == labels).double().mean())


def label_cross_entropy(log_p: Tensor, labels: Tensor) -> float:
    """Mean -log p(true state), nats."""
    picked = log_p.gather(1, labels[:, None]).squeeze(1)
    return float(-picked.clamp_min(np.log(MIN_PROBABILITY)).mean())


def r_squared(predicted: Tensor, beliefs: Tensor) -> float:
    """1 - SSE / SST pooled over every position and state (SST around the mean belief)."""
    predicted, beliefs = predicted.double(), beliefs.double()
    residual = (predicted - beliefs).square().sum()
    total = (beliefs - beliefs.mean(dim=0)).square().sum()
    return float(1.0 - residual / total) if float(total) > 0 else float("nan")


def kl_divergence(log_p: Tensor, beliefs: Tensor) -> float:
    """Mean KL(belief || probe) in nats (0 log 0 = 0)."""
    log_p, beliefs = log_p.double().clamp_min(np.log(MIN_PROBABILITY)), beliefs.double()
    return float((torch.xlogy(beliefs, beliefs) - beliefs * log_p).sum(dim=1).mean())
