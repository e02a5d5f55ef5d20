"""Choose a Dirichlet concentration so that a graph's entropy hits a target.

Small alpha gives peaked rows and low entropy, large alpha near-uniform rows
and high entropy. :func:`calibrate` searches log(alpha) for the value whose
exact entropy (mean bits per predicted token at the given sequence length,
the figure `gssm-data entropy` reports) is within a tolerance of the target.

Every evaluation is a pure function of (graph, alpha, seed, seq_len): the
kernels are drawn with the seed, and the entropy is measured on a fixed
sample of sequences from a stream of their own (:data:`CALIBRATION_STREAM`),
so a calibration is reproducible. That sample is not the store's test split:
a store generated with the calibrated alpha reports its own figure, which
differs from `achieved_bits` by about the sample's standard error.

The search first scans :data:`SCAN_POINTS` alphas evenly spaced in log(alpha)
over :data:`ALPHA_RANGE` (the exact entropy of the fixed sample at each), then:

- a scanned alpha within the tolerance is the answer (the closest one);
- otherwise every pair of neighbouring scan points whose entropies straddle
  the target is a bracket; the brackets are refined best first (the one with
  an end closest to the target), each by false position on log(alpha) with
  the Illinois correction (a bisection step whenever interpolation would not
  shrink the bracket enough), until one lands within the tolerance;
- no bracket means the target is outside every entropy seen: the error gives
  the lowest and highest entropy over the scan, the range actually observed.

Entropy need not be monotone in alpha, so bracketing only the ends of the
range could miss reachable targets (or report a range that is only the two
ends). The fixed kernels are drawn from fixed uniforms transformed
continuously in alpha (``gamma-inverse-cdf``, see :mod:`gssm_data.kernels`),
so for a fixed seed the tables, and the entropy of the fixed sample, move
smoothly with alpha; the sample's tokens still change where a draw crosses a
bucket edge, which leaves small steps that a bracket may close on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from gssm_data.entropy import Device, auto_device, entropy_stats, sequence_entropy
from gssm_data.errors import GssmDataError
from gssm_data.graph import GraphSpec
from gssm_data.kernels import draw_kernels
from gssm_data.preflight import MAX_SEQ_LEN, check_generatable, check_memory, finite
from gssm_data.sampler import STREAMS, BlockSampler

Target = Literal["latent", "observed"]

# Random stream of the calibration sample: none of the data splits' streams.
CALIBRATION_STREAM = 4
assert CALIBRATION_STREAM not in STREAMS.values()

# Sequences the entropy is measured on at each evaluation: 256 (a standard
# error of about a hundredth of a bit on the presets), fewer for large joint
# latent spaces so that one evaluation stays within a few seconds on a CPU.
MAX_SEQUENCES = 256
MIN_SEQUENCES = 32
_STATE_SEQUENCES_BUDGET = 1 << 18  # joint latent states x sequences per evaluation
# A fixed seed makes the entropy a jumpy function of alpha: the Dirichlet
# samplers are rejection methods, so nudging alpha can change which draws are
# accepted and hence every row after them. Near a jump no alpha may land within
# a very tight tolerance; 0.05 bits is finer than entropy regimes need.
DEFAULT_TOLERANCE_BITS = 0.05
# The search stops when the bracket on log(alpha) is narrower than this: it has
# closed on a jump of the entropy, and nothing in between lands closer.
MIN_BRACKET = 1e-4
# Searched concentrations: from nearly deterministic rows to nearly uniform ones.
ALPHA_RANGE = (1e-4, 1e2)
# Scanned alphas: two per decade over ALPHA_RANGE, ends included. Finer scans
# find narrower dips of a jumpy entropy curve, but each point costs a full
# evaluation (seconds on large graphs), and with the smooth kernel draw the
# curve between neighbours is nearly monotone.
SCAN_POINTS = 13
# Evaluations in all, scan included.
MAX_EVALUATIONS = 45
# Names the search, so recorded calibrations (scaling recipes) made by another are redone.
CALIBRATION_SEARCH = "log-scan-then-brackets"


@dataclass(frozen=True)
class Calibration:
    """The outcome: the graph with its new alpha, and the entropy it achieves.

    `achieved_bits` (and `stderr_bits`) are measured on the calibration sample;
    `evaluations` lists every (alpha, bits) tried, in order.
    """

    graph: GraphSpec
    alpha: float
    achieved_bits: float
    tolerance_bits: float
    target_bits: float
    target: Target
    stderr_bits: float
    evaluations: tuple[tuple[float, float], ...]
    # Lowest and highest entropy over the scan (bits per token).
    scanned_range_bits: tuple[float, float] = (math.nan, math.nan)


def scan_alphas() -> tuple[float, ...]:
    """The scanned alphas: :data:`SCAN_POINTS` evenly spaced in log over :data:`ALPHA_RANGE`."""
    low, high = (math.log(a) for a in ALPHA_RANGE)
    step = (high - low) / (SCAN_POINTS - 1)
    return tuple(math.exp(low + i * step) for i in range(SCAN_POINTS))


def calibration_sequences(graph: GraphSpec) -> int:
    """Size of the calibration sample: 256 sequences, fewer (>= 32) for large latent spaces."""
    budget = _STATE_SEQUENCES_BUDGET // graph.joint_latent_states
    return max(MIN_SEQUENCES, min(MAX_SEQUENCES, budget))


def entropy_bits(
    graph: GraphSpec,
    *,
    seed: int,
    seq_len: int,
    n_sequences: int | None = None,
    device: Device | None = None,
) -> tuple[float, float]:
    """(mean bits per predicted token, its standard error) on the calibration sample.

    The sample is the first `n_sequences` (default :func:`calibration_sequences`)
    of :data:`CALIBRATION_STREAM`; a `transition` graph gives its known-kernel
    figure (see gssm_data.entropy). `device` defaults to the GPU when there is one.
    """
    n_sequences = n_sequences or calibration_sequences(graph)
    conditionals = draw_kernels(graph, seed)
    sampler = BlockSampler(graph, conditionals, seq_len, seed, block_size=n_sequences)
    tokens = sampler.block(CALIBRATION_STREAM, 0).tokens
    kernels = sampler.transition_kernels(CALIBRATION_STREAM, 0)
    nats = sequence_entropy(
        graph,
        conditionals,
        tokens,
        transition_kernels=kernels or None,
        device=device or auto_device(),
    )
    stats = entropy_stats(nats, transition=graph.has_transition)
    return stats.bits_per_token, stats.stderr / math.log(2)


def calibrate(
    graph: GraphSpec,
    *,
    seed: int,
    seq_len: int,
    target_bits: float,
    target: Target = "latent",
    tolerance_bits: float = DEFAULT_TOLERANCE_BITS,
    n_sequences: int | None = None,
    device: Device | None = None,
    log: Callable[[str], None] | None = None,
) -> Calibration:
    """Set the alpha of every latent node (or of the observed one) to hit `target_bits`.

    Raises GssmDataError when the target is outside what alpha in
    :data:`ALPHA_RANGE` reaches (the message gives the reachable range), or
    when no alpha lands within `tolerance_bits` in :data:`MAX_EVALUATIONS`.
    `log` receives one line per evaluation. `n_sequences` defaults to
    :func:`calibration_sequences`.
    """
    _check_arguments(
        graph,
        seq_len=seq_len,
        target=target,
        target_bits=target_bits,
        tolerance_bits=tolerance_bits,
    )
    check_memory(
        graph,
        seq_len=seq_len,
        block_size=n_sequences or calibration_sequences(graph),
        workers=1,
    )
    say = log or (lambda message: None)
    history: list[tuple[float, float, float]] = []  # (alpha, bits, stderr)

    def excess(log_alpha: float) -> float:
        alpha = math.exp(log_alpha)
        bits, stderr = entropy_bits(
            graph.with_alpha(alpha, target=target),
            seed=seed,
            seq_len=seq_len,
            n_sequences=n_sequences,
            device=device,
        )
        history.append((alpha, bits, stderr))
        say(f"alpha {alpha:.4g}: {bits:.4f} bits/token")
        return bits - target_bits

    points = [math.log(alpha) for alpha in scan_alphas()]
    scanned = [excess(point) for point in points]
    lowest, highest = min(scanned) + target_bits, max(scanned) + target_bits
    if min(abs(value) for value in scanned) > tolerance_bits:
        brackets = [
            (points[i], points[i + 1], scanned[i], scanned[i + 1])
            for i in range(len(points) - 1)
            if (scanned[i] < 0) != (scanned[i + 1] < 0)
        ]
        if not brackets:
            other = "observed" if target == "latent" else "latent"
            raise GssmDataError(
                f"--target-bits {target_bits:g} is out of reach: varying the {target} alpha over "
                f"{ALPHA_RANGE[0]:g} .. {ALPHA_RANGE[1]:g} gives {lowest:.3f} .. {highest:.3f} "
                f"bits/token (lowest and highest of {len(points)} alphas); choose a target in "
                f"that range or tune the {other} alpha (--target {other})"
            )
        # Best first: the bracket with an end closest to the target.
        brackets.sort(key=lambda b: min(abs(b[2]), abs(b[3])))
        for low, high, low_excess, high_excess in brackets:
            if low_excess > 0:  # entropy falls across this bracket: search on -excess
                found = _bracket_search(
                    lambda u: -excess(u),
                    low,
                    high,
                    -low_excess,
                    -high_excess,
                    tolerance_bits,
                    budget=MAX_EVALUATIONS - len(history),
                )
            else:
                found = _bracket_search(
                    excess,
                    low,
                    high,
                    low_excess,
                    high_excess,
                    tolerance_bits,
                    budget=MAX_EVALUATIONS - len(history),
                )
            if found or len(history) >= MAX_EVALUATIONS:
                break
    alpha, bits, stderr = min(history, key=lambda item: abs(item[1] - target_bits))
    if abs(bits - target_bits) > tolerance_bits:
        raise GssmDataError(
            f"no alpha within {tolerance_bits:g} bits of {target_bits:g} after {len(history)} "
            f"evaluations (closest: alpha {alpha:.4g} gives {bits:.4f}): with a fixed seed the "
            "entropy steps with alpha near there; try another --seed or a wider --tolerance-bits"
        )
    return Calibration(
        graph=graph.with_alpha(alpha, target=target),
        alpha=alpha,
        achieved_bits=bits,
        tolerance_bits=tolerance_bits,
        target_bits=target_bits,
        target=target,
        stderr_bits=stderr,
        evaluations=tuple((a, b) for a, b, _ in history),
        scanned_range_bits=(lowest, highest),
    )


def _check_arguments(
    graph: GraphSpec, *, seq_len: int, target: str, target_bits: float, tolerance_bits: float
) -> None:
    finite(target_bits, "--target-bits")
    finite(tolerance_bits, "--tolerance-bits")
    if target not in ("latent", "observed"):
        raise GssmDataError(f"--target {target!r}: choose latent or observed")
    if target == "latent" and not graph.latents:
        raise GssmDataError("the graph has no latent node: calibrate --target observed")
    if seq_len < 2:
        raise GssmDataError("--seq-len must be at least 2 (a start token and one target)")
    if seq_len > MAX_SEQ_LEN:
        raise GssmDataError(f"--seq-len {seq_len:,} is more than the limit of {MAX_SEQ_LEN:,}")
    check_generatable(graph)
    if tolerance_bits <= 0:
        raise GssmDataError(f"the tolerance must be positive, got {tolerance_bits:g} bits")


def _bracket_search(
    excess: Callable[[float], float],
    low: float,
    high: float,
    low_excess: float,
    high_excess: float,
    tolerance: float,
    *,
    budget: int = MAX_EVALUATIONS - 2,
) -> bool:
    """Narrow [low, high] (excess < 0 at low, > 0 at high) until |excess| <= tolerance.

    Returns whether a point within the tolerance was found, using at most
    `budget` evaluations.

    False position with the Illinois correction: when the same end survives
    twice, its excess is halved so the next point moves towards it. A point
    too close to either end is replaced by the midpoint, which guarantees the
    bracket shrinks.
    """
    if abs(low_excess) <= tolerance or abs(high_excess) <= tolerance:
        return True
    last_moved = ""
    for _ in range(max(budget, 0)):
        width = high - low
        if width < MIN_BRACKET:
            return False
        point = high - high_excess * width / (high_excess - low_excess)
        if not low + 0.05 * width <= point <= high - 0.05 * width:
            point = 0.5 * (low + high)
        value = excess(point)
        if abs(value) <= tolerance:
            return True
        if value < 0:
            low, low_excess = point, value
            if last_moved == "low":
                high_excess /= 2
            last_moved = "low"
        else:
            high, high_excess = point, value
            if last_moved == "high":
                low_excess /= 2
            last_moved = "high"
    return False
