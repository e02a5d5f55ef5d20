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
"""

from __future__ import annotations

import numpy as np

from gssm_data.graph import GraphSpec, NodeSpec

# No entry may be exactly zero: every sequence must keep a finite log-likelihood.
MIN_PROBABILITY = 1e-10

# Kernel draws use the stream id 0 of the seed; data splits use others (sampler.STREAMS).
KERNEL_STREAM = 0


def kernel_rng(seed: int, node_index: int) -> np.random.Generator:
    """The generator of one node's fixed kernel: a function of (seed, node) only."""
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([seed, KERNEL_STREAM, node_index]))
    )


def _clip_normalise(table: np.ndarray) -> np.ndarray:
    table = np.maximum(table, MIN_PROBABILITY)
    return table / table.sum(axis=-1, keepdims=True)


def _dirichlet_rows(
    rng: np.random.Generator, alpha: float, n_states: int, shape: tuple[int, ...]
) -> np.ndarray:
    """Rows drawn i.i.d. from a symmetric Dirichlet(alpha), shape (*shape, n_states).

    numpy's Dirichlet switches to a stick-breaking method for small alpha, which
    stays exact where gamma variates would underflow to all-zero rows.
    """
    n_rows = int(np.prod(shape, dtype=np.int64))
    rows = rng.dirichlet(np.full(n_states, alpha), size=n_rows)
    return rows.reshape(*shape, n_states)


def draw_conditional(
    graph: GraphSpec,
    node: NodeSpec,
    rng: np.random.Generator,
    batch: tuple[int, ...] = (),
) -> np.ndarray:
    """Draw the effective conditional of `node`, shape (*batch, *inputs, states).

    `batch` draws several independent tables at once (the per-sequence kernels
    of `transition` mode).
    """
    input_sizes = graph.input_sizes(node.name)
    n_states = node.states
    if not input_sizes:
        # An observed node without parents: one row, i.i.d. tokens.
        table = _dirichlet_rows(rng, node.alpha, n_states, batch)
    elif node.kernel == "fullrank" or len(input_sizes) == 1:
        table = _dirichlet_rows(rng, node.alpha, n_states, (*batch, *input_sizes))
    else:
        # Product of experts, combined in log space so that peaked experts
        # (alpha << 1) neither underflow nor lose their relative weights.
        n_inputs = len(input_sizes)
        log_table = np.zeros((*batch, *input_sizes, n_states))
        for axis, size in enumerate(input_sizes):
            expert = _clip_normalise(_dirichlet_rows(rng, node.alpha, n_states, (*batch, size)))
            shape = [1] * n_inputs
            shape[axis] = size
            log_table = log_table + np.log(expert).reshape(*batch, *shape, n_states)
        log_table -= log_table.max(axis=-1, keepdims=True)
        table = np.exp(log_table)
    table = _clip_normalise(table / table.sum(axis=-1, keepdims=True))
    return apply_mode(table, node, n_batch_axes=len(batch))


def apply_mode(table: np.ndarray, node: NodeSpec, n_batch_axes: int = 0) -> np.ndarray:
    """Enforce `slow` / `dead` on an effective table by swapping each row's maximum.

    Swapping keeps every row a permutation of itself, so the row's entropy and
    its Dirichlet law are unchanged; only which state is most likely moves.
    """
    if node.mode not in ("slow", "dead"):
        return table
    n_states = node.states
    rows = table.reshape(-1, n_states).copy()
    if node.mode == "dead":
        targets = np.full(rows.shape[0], node.c)
    else:
        # Axis 0 after the batch axes is the previous self state x: target y = x.
        inner = table.shape[n_batch_axes:]
        previous = np.arange(n_states).reshape(n_states, *([1] * (len(inner) - 1)))
        previous = np.broadcast_to(previous, inner[:-1])
        targets = np.broadcast_to(previous, (*table.shape[:n_batch_axes], *inner[:-1])).reshape(-1)
    index = np.arange(rows.shape[0])
    largest = rows.argmax(axis=1)
    top = rows[index, largest]
    rows[index, largest] = rows[index, targets]
    rows[index, targets] = top
    return rows.reshape(table.shape)


def draw_kernels(graph: GraphSpec, seed: int) -> dict[str, np.ndarray]:
    """The fixed effective conditional of every non-`transition` node.

    Each node's table depends only on (seed, the node's declaration index), so
    it is reproducible on any machine with the same numpy.
    """
    kernels = {}
    for index, node in enumerate(graph.nodes):
        if node.mode != "transition":
            kernels[node.name] = draw_conditional(graph, node, kernel_rng(seed, index))
    return kernels
