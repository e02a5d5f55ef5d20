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

The search visits alphas in a fixed order, so its answer depends only on
(graph, seed, seq_len, target, tolerance), never on a cache:

1. a coarse scan, level by level, of the :data:`SCAN_POINTS` alphas evenly
   spaced in log(alpha) over :data:`ALPHA_RANGE` (two per decade): first every
   second decade (1e-4, 1e-2, 1, 1e2), then the decades between, then the
   half decades (:data:`SCAN_LEVELS`);
2. after each level, a visited alpha within the tolerance is the answer (the
   closest); otherwise every pair of neighbouring visited alphas whose
   entropies straddle the target is a bracket, refined best first (an end
   closest to the target) by Brent's method on log(alpha), until one lands
   within the tolerance. The entropy is searched through a logit of its
   position between the lowest and highest entropy visited: the curve is an
   S in log(alpha) (a floor where rows are nearly deterministic, a ceiling
   where they are nearly uniform), nearly a straight line after that
   transform, so a two-decade bracket closes in two or three evaluations;
3. with the whole scan visited and no bracket, the search refines around the
   visited alphas closest to the target (midpoints in log(alpha) of their
   neighbouring gaps, down to :data:`MIN_GAP`) before it gives up: a dip or
   bump narrower than the scan spacing is found there.

Only a target that no entropy can have (at or below 0, or at or above
log2 of the vocabulary, the entropy of a uniform token) is refused as out of
reach; any other miss says the target was not found among the alphas
visited, with the closest one and the range seen.

Entropy need not be monotone in alpha (tuning base's latent alphas, it swings
by more than half a bit within a decade). The fixed kernels are drawn from
fixed uniforms transformed continuously in alpha (``gamma-inverse-cdf``, see
:mod:`gssm_data.kernels`), so for a fixed seed the tables move continuously
with alpha; the calibration sample's tokens still change where a draw
crosses a bucket edge, which leaves small steps in the entropy that a
bracket may close on (then the next bracket, or level, is tried).

`calibrate` takes a `cache` of evaluations (alpha -> bits and standard
error) of the same graph, tuned node, seed, seq_len and sample size:
`gssm-data scaling` keeps one on disk beside its stores, so regimes sharing a
graph share their scan, and re-running a grid evaluates nothing twice.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
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
# With a fixed seed the entropy can still step where the sample's tokens change
# (module docstring); near a step no alpha may land within a very tight
# tolerance. 0.05 bits is finer than entropy regimes need.
DEFAULT_TOLERANCE_BITS = 0.05
# A bracket narrower than this on log(alpha) has closed on a step of the
# entropy: nothing in between lands closer.
MIN_BRACKET = 1e-4
# Searched concentrations: from nearly deterministic rows to nearly uniform ones.
ALPHA_RANGE = (1e-4, 1e2)
# The full scan: two alphas per decade over ALPHA_RANGE, ends included.
SCAN_POINTS = 13
# The order the scan is visited in, by index into the full scan: every second
# decade, then the decades between, then the half decades. A level is only
# visited when the ones before it gave no answer.
SCAN_LEVELS = ((0, 4, 8, 12), (2, 6, 10), (1, 3, 5, 7, 9, 11))
assert sorted(i for level in SCAN_LEVELS for i in level) == list(range(SCAN_POINTS))
# Refining around the closest alphas (no bracket after the full scan) splits
# gaps down to a 32nd of a decade.
MIN_GAP = math.log(10) / 32
# Refining around the closest alphas stops after this many midpoints.
REFINE_POINTS = 12
# Evaluations in all, scan and refinement included.
MAX_EVALUATIONS = 45
# Names the search, so recorded calibrations (scaling recipes) made by another are redone.
CALIBRATION_SEARCH = "coarse-scan-logit-brent"

# Evaluations already made: alpha -> (bits per token, standard error).
EvaluationCache = MutableMapping[float, tuple[float, float]]


@dataclass(frozen=True)
class Calibration:
    """The outcome: the graph with its new alpha, and the entropy it achieves.

    `achieved_bits` (and `stderr_bits`) are measured on the calibration sample;
    `evaluations` lists every (alpha, bits) the search visited, in order (the
    same with or without a cache); `computed` counts those not in the cache.
    """

    graph: GraphSpec
    alpha: float
    achieved_bits: float
    tolerance_bits: float
    target_bits: float
    target: Target
    stderr_bits: float
    evaluations: tuple[tuple[float, float], ...]
    # Lowest and highest entropy over the alphas visited (bits per token).
    scanned_range_bits: tuple[float, float] = (math.nan, math.nan)
    computed: int = field(default=0, compare=False)


def scan_alphas() -> tuple[float, ...]:
    """The full scan: :data:`SCAN_POINTS` alphas evenly spaced in log over :data:`ALPHA_RANGE`."""
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
    cache: EvaluationCache | None = None,
) -> Calibration:
    """Set the alpha of every latent node (or of the observed one) to hit `target_bits`.

    Raises GssmDataError when the target is out of reach (at most 0 bits, or
    at least log2 of the vocabulary), or when no alpha visited lands within
    `tolerance_bits` (the message names the closest and the range seen).
    `log` receives one line per evaluation. `n_sequences` defaults to
    :func:`calibration_sequences`. `cache` holds evaluations of this graph,
    tuned node, seed, seq_len and sample size (see :func:`cache_key`); the
    search reads it instead of evaluating again and adds what it computes.
    """
    _check_arguments(
        graph,
        seq_len=seq_len,
        target=target,
        target_bits=target_bits,
        tolerance_bits=tolerance_bits,
    )
    ceiling = math.log2(graph.observed.states)
    if target_bits + tolerance_bits <= 0 or target_bits - tolerance_bits >= ceiling:
        raise GssmDataError(
            f"--target-bits {target_bits:g} is out of reach: the entropy of a token among "
            f"{graph.observed.states} is between 0 and log2({graph.observed.states}) = "
            f"{ceiling:.3f} bits"
        )
    check_memory(
        graph,
        seq_len=seq_len,
        block_size=n_sequences or calibration_sequences(graph),
        workers=1,
    )
    say = log or (lambda message: None)
    known: EvaluationCache = {} if cache is None else cache
    visited: dict[float, tuple[float, float]] = {}  # in the order visited
    computed = 0

    def bits_at(alpha: float) -> float:
        nonlocal computed
        if alpha not in visited:
            if len(visited) >= MAX_EVALUATIONS:
                raise _Exhausted
            if alpha not in known:
                known[alpha] = entropy_bits(
                    graph.with_alpha(alpha, target=target),
                    seed=seed,
                    seq_len=seq_len,
                    n_sequences=n_sequences,
                    device=device,
                )
                computed += 1
            visited[alpha] = known[alpha]
            say(f"alpha {alpha:.4g}: {visited[alpha][0]:.4f} bits/token")
        return visited[alpha][0]

    search = _Search(bits_at, visited, target_bits, tolerance_bits)
    with contextlib.suppress(_Exhausted):
        search.run(scan_alphas())
    alpha, (bits, stderr) = min(visited.items(), key=lambda item: abs(item[1][0] - target_bits))
    seen = [value for value, _ in visited.values()]
    lowest, highest = min(seen), max(seen)
    if abs(bits - target_bits) > tolerance_bits:
        other = "observed" if target == "latent" else "latent"
        straddled = lowest < target_bits < highest
        raise GssmDataError(
            f"--target-bits {target_bits:g} not found among the {len(visited)} {target} alphas "
            f"tried over {ALPHA_RANGE[0]:g} .. {ALPHA_RANGE[1]:g} (closest: alpha {alpha:.4g} "
            f"gives {bits:.4f}; seen {lowest:.3f} .. {highest:.3f} bits/token): "
            + (
                "the entropy steps with alpha near there with this seed; try another --seed "
                "or a wider --tolerance-bits"
                if straddled
                else f"choose a target in that range or tune the {other} alpha (--target {other})"
            )
        )
    return Calibration(
        graph=graph.with_alpha(alpha, target=target),
        alpha=alpha,
        achieved_bits=bits,
        tolerance_bits=tolerance_bits,
        target_bits=target_bits,
        target=target,
        stderr_bits=stderr,
        evaluations=tuple((a, b) for a, (b, _) in visited.items()),
        scanned_range_bits=(lowest, highest),
        computed=computed,
    )


def cache_key(graph: GraphSpec, *, target: Target, seed: int, seq_len: int) -> dict:
    """What an evaluation depends on besides alpha: evaluations under one key share a cache.

    The tuned alpha is normalised away (set to 1); the sample size and the
    kernel draw (format version) are part of it.
    """
    from gssm_data.manifest import FORMAT_VERSION

    return {
        "graph": graph.with_alpha(1.0, target=target).model_dump(
            mode="json", exclude={"description"}
        ),
        "target": target,
        "seed": seed,
        "seq_len": seq_len,
        "n_sequences": calibration_sequences(graph),
        "stream": CALIBRATION_STREAM,
        "format_version": FORMAT_VERSION,
    }


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


class _Exhausted(Exception):
    """The search visited :data:`MAX_EVALUATIONS` alphas."""


class _Found(Exception):
    """An alpha within the tolerance was visited."""


class _Search:
    """The visiting order of :func:`calibrate` (see the module docstring).

    `bits_at(alpha)` evaluates (or recalls) and records into `visited`; the
    search ends by raising :class:`_Found` internally, or returns when every
    level and refinement is spent.
    """

    def __init__(
        self,
        bits_at: Callable[[float], float],
        visited: dict[float, tuple[float, float]],
        target: float,
        tolerance: float,
    ) -> None:
        self.bits_at = bits_at
        self.visited = visited
        self.target = target
        self.tolerance = tolerance
        self.tried: set[tuple[float, float]] = set()

    def run(self, scan: tuple[float, ...]) -> None:
        try:
            for level in SCAN_LEVELS:
                for index in level:
                    self.visit(scan[index])
                self.refine_brackets()
            self.refine_closest()
        except _Found:
            pass

    def visit(self, alpha: float) -> float:
        bits = self.bits_at(alpha)
        if abs(bits - self.target) <= self.tolerance:
            raise _Found
        return bits

    def points(self) -> list[tuple[float, float]]:
        """(log alpha, bits) of every visited alpha, by alpha."""
        return sorted((math.log(alpha), bits) for alpha, (bits, _) in self.visited.items())

    def refine_brackets(self) -> None:
        """Brent's method on every straddling pair of neighbours, best first."""
        points = self.points()
        brackets = [
            (left, right)
            for left, right in itertools.pairwise(points)
            if (left[1] < self.target) != (right[1] < self.target)
            and right[0] - left[0] >= MIN_BRACKET
            and (left[0], right[0]) not in self.tried
        ]
        brackets.sort(
            key=lambda pair: min(abs(pair[0][1] - self.target), abs(pair[1][1] - self.target))
        )
        lowest = min(bits for _, bits in points)
        highest = max(bits for _, bits in points)
        for (low, low_bits), (high, high_bits) in brackets:
            self.tried.add((low, high))
            _brent(
                lambda u: self.visit(math.exp(u)),
                low,
                high,
                low_bits,
                high_bits,
                _logit_scale(lowest, highest, self.target),
            )

    def refine_closest(self) -> None:
        """Midpoints beside the visited alphas closest to the target, until a bracket appears."""
        budget = REFINE_POINTS
        while budget > 0:
            points = self.points()
            order = sorted(range(len(points)), key=lambda i: abs(points[i][1] - self.target))
            for i in order:
                gaps = [
                    (points[j][0], points[j + 1][0])
                    for j in (i - 1, i)
                    if 0 <= j < len(points) - 1 and points[j + 1][0] - points[j][0] >= 2 * MIN_GAP
                ]
                if gaps:
                    break
            else:
                return
            for low, high in gaps[:budget]:
                self.visit(math.exp(0.5 * (low + high)))
                budget -= 1
            self.refine_brackets()


def _logit_scale(lowest: float, highest: float, target: float) -> Callable[[float], float]:
    """bits -> logit of their place between the lowest and highest seen, minus the target's.

    Increasing in bits, so its sign is that of bits - target; the range is
    widened by a tenth so that the ends seen stay finite.
    """
    margin = 0.1 * (highest - lowest) or 1.0
    floor, span = lowest - margin, highest - lowest + 2 * margin

    def logit(bits: float) -> float:
        p = min(max((bits - floor) / span, 1e-12), 1 - 1e-12)
        return math.log(p / (1 - p))

    goal = logit(target)
    return lambda bits: logit(bits) - goal


def _brent(
    bits_at: Callable[[float], float],
    low: float,
    high: float,
    low_bits: float,
    high_bits: float,
    scale: Callable[[float], float],
) -> None:
    """Brent's root finder on u = log(alpha) for scale(bits_at(u)) = 0 in [low, high].

    The ends are visited already (their bits are given). It stops when the
    bracket is narrower than :data:`MIN_BRACKET` (a step of the entropy) or
    when `bits_at` raises (an alpha within the tolerance, or the budget).
    """
    a, b = low, high
    fa, fb = scale(low_bits), scale(high_bits)
    if abs(fa) < abs(fb):
        a, b, fa, fb = b, a, fb, fa
    c, fc = a, fa
    d = e = b - a
    while abs(b - a) >= MIN_BRACKET:
        if fb == 0:
            return
        if fa != fc and fb != fc:  # inverse quadratic interpolation
            s = (
                a * fb * fc / ((fa - fb) * (fa - fc))
                + b * fa * fc / ((fb - fa) * (fb - fc))
                + c * fa * fb / ((fc - fa) * (fc - fb))
            )
        else:  # secant
            s = b - fb * (b - a) / (fb - fa)
        middle = 0.5 * (a + b)
        bisect = (
            not (min(middle, b) <= s <= max(middle, b))
            or abs(s - b) >= abs(e) / 2
            or abs(e) < MIN_BRACKET
        )
        if bisect:
            s = middle
            e = d = b - a
        else:
            e, d = d, s - b
        fs = scale(bits_at(s))
        c, fc = b, fb
        if (fa < 0) == (fs < 0):
            a, fa = b, fb
        b, fb = s, fs
        if abs(fa) < abs(fb):
            a, b, fa, fb = b, a, fb, fa
