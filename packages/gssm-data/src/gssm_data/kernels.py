"""Transition kernels: Dirichlet tables, their product-of-experts combination, modes.

For every node the *effective conditional* p(z_t | inputs) is a float64 table
with axes (previous self state if latent, parents in declared order, next
state). It is the distribution actually sampled, so entropy, probes and tests
all read this one table and never re-derive anything from a seed.

- ``product``: one Dirichlet table per input, combined as a normalised product
  of experts, p(y | x, p1, ...) ∝ T_self[x, y] · T_p1[p1, y] · ...
- ``fullrank``: one Dirichlet row for every joint input.

Modes act on the effective table, after normalisation, so that their guarantee
holds for every input combination:
- ``slow``: argmax_y p(y | x, ...) = x (the row's largest entry is swapped onto
  the diagonal);
- ``dead``: argmax_y p(y | ...) = c for a fixed state c;
- ``transition``: the table is drawn afresh for every sequence (see sampler).

Every entry is at least :data:`MIN_PROBABILITY` (a floor mixed in after the
mode, which keeps each row's order), so every sequence has a finite
log-likelihood.

How Dirichlet rows are drawn (:data:`FIXED_KERNEL_DRAW`, recorded in every
manifest as ``kernel_draw``):

- ``gamma-inverse-cdf`` (the fixed kernels, format version 2 on): every entry
  takes two uniforms u, v from the node's generator, the same whatever alpha,
  and becomes the Gamma(alpha) variate ``G = F^-1_{alpha+1}(u) * v^(1/alpha)``
  (the inverse CDF of Gamma(alpha + 1), times Marsaglia and Tsang's boost,
  computed in logs so that tiny alpha cannot underflow); a row is G over its
  sum. That is an exact Dirichlet(alpha) draw, and a continuous function of
  alpha for a fixed seed: the tables move continuously as alpha changes, and
  the entropy of a fixed sample with them, up to small steps where a sampled
  token changes (not necessarily monotonically: `calibrate` refines around
  the closest alphas for that).
- ``numpy-dirichlet`` (format version 1 stores, and the per-sequence kernels
  of ``transition`` nodes): ``Generator.dirichlet``. It is about 20x faster,
  but its rejection steps make a fixed seed's rows jump as alpha moves.
  Per-sequence kernels keep it: they are drawn for every sequence, and the
  entropy averages over so many of them that the jumps do not matter.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from gssm_data.errors import GssmDataError
from gssm_data.graph import GraphSpec, NodeSpec

# No entry may be exactly zero: every sequence must keep a finite log-likelihood.
MIN_PROBABILITY = 1e-10

# Kernel draws use the stream id 0 of the seed; data splits use others (sampler.STREAMS).
KERNEL_STREAM = 0

# A `slow`/`dead` row whose largest entry is tied (common when peaked experts are
# multiplied: two one-hot experts give two equal products) gets its target
# raised by this relative amount, so that the argmax is unique and is the target.
_TIE_BREAK = 1e-6

_MAX_SEED = 1 << 64

KernelDraw = Literal["gamma-inverse-cdf", "numpy-dirichlet"]
# How the fixed kernels of new stores are drawn (see the module docstring).
FIXED_KERNEL_DRAW: KernelDraw = "gamma-inverse-cdf"
# Half a step of the 53-bit uniforms: moves them from [0, 1) into (0, 1).
_HALF_ULP = 0.5 / (1 << 53)
# The largest double below 1: 1 - 2^-53 plus half a step is a tie that rounds to 1.0.
_BELOW_ONE = float(np.nextafter(1.0, 0.0))


def check_seed(seed: int) -> int:
    """A seed is an integer in [0, 2^64): the range our random streams encode."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise GssmDataError(f"seed must be an integer, got {seed!r}")
    if not 0 <= int(seed) < _MAX_SEED:
        raise GssmDataError(f"seed must be between 0 and 2**64 - 1, got {seed}")
    return int(seed)


def seed_sequence(*words: int) -> np.random.SeedSequence:
    """A SeedSequence of fixed-width 64-bit words.

    numpy splits a large integer into as many 32-bit words as it needs, so
    ``[2**32 + 5, 2, 3]`` and ``[5, 1, 2, 3]`` would seed the same stream;
    encoding every word on exactly 64 bits keeps distinct tuples distinct.
    """
    return np.random.SeedSequence(np.array(words, dtype=np.uint64).view(np.uint32))


def kernel_rng(seed: int, node_index: int) -> np.random.Generator:
    """The generator of one node's fixed kernel: a function of (seed, node) only."""
    return np.random.Generator(np.random.PCG64(seed_sequence(seed, KERNEL_STREAM, node_index)))


def floor_rows(table: np.ndarray) -> np.ndarray:
    """Normalise rows, then mix in a uniform floor so no entry is below MIN_PROBABILITY.

    ``p -> p * (1 - n * MIN_PROBABILITY) + MIN_PROBABILITY`` keeps rows summing to
    one and keeps their order (ties and argmax included), unlike clip-then-
    renormalise, which pushes clipped entries back below the floor.
    """
    n_states = table.shape[-1]
    table = table / table.sum(axis=-1, keepdims=True)
    return table * (1.0 - n_states * MIN_PROBABILITY) + MIN_PROBABILITY


def _dirichlet_rows(
    rng: np.random.Generator,
    alpha: float,
    n_states: int,
    shape: tuple[int, ...],
    draw: KernelDraw = "numpy-dirichlet",
) -> np.ndarray:
    """Rows drawn i.i.d. from a symmetric Dirichlet(alpha), shape (*shape, n_states).

    `draw` picks the method (module docstring). numpy's Dirichlet switches to a
    stick-breaking method for small alpha, which stays exact where gamma
    variates would underflow; the inverse-CDF draw works in logs for the same
    reason.
    """
    n_rows = int(np.prod(shape, dtype=np.int64))
    if draw == "numpy-dirichlet":
        rows = rng.dirichlet(np.full(n_states, alpha), size=n_rows)
    elif draw == "gamma-inverse-cdf":
        rows = smooth_dirichlet_rows(open_uniforms(rng, (2, n_rows, n_states)), alpha)
    else:
        raise ValueError(f"unknown kernel draw {draw!r}")
    return rows.reshape(*shape, n_states)


def open_uniforms(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Uniforms in the open interval (0, 1): both ends would make a Gamma variate infinite.

    ``rng.random`` gives k / 2^53 for k in 0 .. 2^53 - 1; half a step moves 0 off
    zero, and the top value, which that half step rounds up to exactly 1.0, is
    held at the largest double below 1 (the quantile at 1.0 is infinite and its
    row NaN). Every other uniform is unchanged, so stores keep their bytes.
    """
    return np.minimum(rng.random(shape) + _HALF_ULP, _BELOW_ONE)


def smooth_dirichlet_rows(uniforms: np.ndarray, alpha: float) -> np.ndarray:
    """Dirichlet(alpha) rows from fixed uniforms in (0, 1), shape (2, *rows, states).

    ``log G = log F^-1_{alpha+1}(u) + log(v) / alpha`` is a Gamma(alpha)
    variate in logs (Gamma(alpha + 1) times U^(1/alpha)); rows are G normalised,
    computed as a softmax of log G so that no row underflows to zeros.
    """
    # Imported here: only this draw needs scipy, and every reader of a store
    # (each data-loader worker) imports gssm_data without drawing kernels.
    from scipy.special import gammaincinv

    u, v = uniforms[0], uniforms[1]
    log_gamma = np.log(gammaincinv(alpha + 1.0, u)) + np.log(v) / alpha
    log_gamma -= log_gamma.max(axis=-1, keepdims=True)
    rows = np.exp(log_gamma)
    return rows / rows.sum(axis=-1, keepdims=True)


def draw_conditional(
    graph: GraphSpec,
    node: NodeSpec,
    rng: np.random.Generator,
    batch: tuple[int, ...] = (),
    draw: KernelDraw = "numpy-dirichlet",
) -> np.ndarray:
    """Draw the effective conditional of `node`, shape (*batch, *inputs, states).

    `batch` draws several independent tables at once (the per-sequence kernels
    of `transition` mode). The draws, in this order, are the contract that lets
    a table be recomputed from a generator:

    - no input: rows of shape (*batch, states);
    - `fullrank`, or a single input: rows of shape (*batch, *inputs, states);
    - `product` with several inputs: for each input axis in table order, the
      expert rows of shape (*batch, input size, states), each floored by
      :func:`floor_rows`; the table is their product, normalised.

    The result then goes through :func:`apply_mode` and :func:`floor_rows`.
    `draw` says how each set of rows is drawn (:func:`_dirichlet_rows`).
    """
    input_sizes = graph.input_sizes(node.name)
    n_states = node.states
    if node.kernel == "fullrank" or len(input_sizes) <= 1:
        table = _dirichlet_rows(rng, node.alpha, n_states, (*batch, *input_sizes), draw)
    else:
        # Product of experts, combined in log space so that many peaked experts
        # (alpha << 1, entries down to MIN_PROBABILITY) cannot underflow.
        n_inputs = len(input_sizes)
        log_table = np.zeros((*batch, *input_sizes, n_states))
        for axis, size in enumerate(input_sizes):
            expert = floor_rows(_dirichlet_rows(rng, node.alpha, n_states, (*batch, size), draw))
            shape = [1] * n_inputs
            shape[axis] = size
            log_table += np.log(expert).reshape(*batch, *shape, n_states)
        log_table -= log_table.max(axis=-1, keepdims=True)
        table = np.exp(log_table)
    table = table / table.sum(axis=-1, keepdims=True)
    return floor_rows(apply_mode(table, node, n_batch_axes=len(batch)))


def mode_targets(node: NodeSpec, shape: tuple[int, ...], n_batch_axes: int = 0) -> np.ndarray:
    """The state each row of a `slow`/`dead` table must favour, shape ``shape[:-1]``.

    `dead`: the absorbing state c for every row. `slow`: the previous self state,
    which is the first axis after the batch axes.
    """
    row_shape = shape[:-1]
    if node.mode == "dead":
        return np.full(row_shape, node.c, dtype=np.int64)
    assert node.mode == "slow", node.mode
    n_inputs = len(row_shape) - n_batch_axes
    previous = np.arange(node.states, dtype=np.int64).reshape(node.states, *[1] * (n_inputs - 1))
    return np.broadcast_to(previous, row_shape)


def apply_mode(table: np.ndarray, node: NodeSpec, n_batch_axes: int = 0) -> np.ndarray:
    """Enforce `slow` / `dead` on a normalised table by swapping each row's maximum.

    Swapping keeps every row a permutation of itself, so the row's entropy and
    its Dirichlet law are unchanged; only which state is most likely moves. A
    tie for the maximum is broken in favour of the target (see `_TIE_BREAK`),
    so the target is the unique argmax of every row.
    """
    if node.mode not in ("slow", "dead"):
        return table
    n_states = node.states
    rows = table.reshape(-1, n_states).copy()
    targets = mode_targets(node, table.shape, n_batch_axes).reshape(-1)
    index = np.arange(rows.shape[0])
    largest = rows.argmax(axis=1)
    top = rows[index, largest]
    rows[index, largest] = rows[index, targets]
    rows[index, targets] = top
    tied = (rows == top[:, None]).sum(axis=1) > 1
    if tied.any():
        rows[index[tied], targets[tied]] *= 1.0 + _TIE_BREAK
        rows[tied] /= rows[tied].sum(axis=1, keepdims=True)
    return rows.reshape(table.shape)


def draw_kernels(
    graph: GraphSpec, seed: int, draw: KernelDraw = FIXED_KERNEL_DRAW
) -> dict[str, np.ndarray]:
    """The fixed effective conditional of every non-`transition` node.

    Each node's table depends only on (seed, the node's declaration index), so
    it is reproducible on any machine with the same numpy and scipy. `draw`
    "numpy-dirichlet" gives the tables of format-version-1 stores.
    """
    seed = check_seed(seed)
    kernels = {}
    for index, node in enumerate(graph.nodes):
        if node.mode != "transition":
            kernels[node.name] = draw_conditional(graph, node, kernel_rng(seed, index), draw=draw)
    return kernels
