"""Vectorised, block-deterministic sampling of GSSM sequences.

Determinism by blocks (DESIGN.md section 4): the sequences of block b of a
split come from a generator seeded by (seed, stream, b), and every block is
drawn at the full :data:`BLOCK_SIZE` (the last one is truncated). So the same
spec and seed give the same bytes whatever the worker count, shard layout or
chunking, and a split of n sequences is a prefix of the split of 10n.

Cost per token and node is O(1): every fixed table is turned into Walker/Vose
alias tables once, and one 64-bit random word per draw gives both the column
(high 32 bits, by multiply-shift) and the acceptance test (low 32 bits against
a threshold quantised to 2^-32). Work is vectorised over the sequences of a
block; the Python loop runs over time steps and nodes only.

`transition` nodes draw a fresh kernel for every sequence and sample it by
inverse CDF over the visited row: O(states) per token, but the per-sequence
kernel draw (O(table) per sequence) dominates anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from gssm_data.graph import GraphSpec, NodeSpec
from gssm_data.kernels import draw_conditional

# Sequences per block: the unit of determinism, of parallel work and of the
# store's chunking. Part of the format: changing it changes the data.
BLOCK_SIZE = 4096

# Random streams of one seed: 0 draws the fixed kernels (kernels.KERNEL_STREAM).
STREAMS: Mapping[str, int] = {"train": 1, "test": 2, "online": 3}

# Time steps whose random words are drawn at once; bounds memory for long
# sequences without changing the stream (draws are consumed in order).
_TIME_CHUNK = 64
_LOW_BITS = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)


def state_dtype(n_states: int) -> np.dtype:
    """The smallest unsigned dtype holding states 0 .. n_states-1."""
    if n_states <= 1 << 8:
        return np.dtype(np.uint8)
    if n_states <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def block_rng(seed: int, stream: int, block: int, purpose: int = 0) -> np.random.Generator:
    """The generator of one block: a pure function of (seed, stream, block, purpose)."""
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([seed, stream, block, purpose]))
    )


@dataclass(frozen=True)
class AliasTable:
    """Walker alias tables for every row of a conditional, flattened row-major.

    Column i of row r is accepted when the low 32 random bits are below
    ``threshold[r * n + i]``, else the draw is ``alias[r * n + i]``.
    """

    threshold: np.ndarray  # (rows * n,) uint64 in [0, 2^32]
    alias: np.ndarray  # (rows * n,) int64
    n_states: int

    @classmethod
    def build(cls, table: np.ndarray) -> AliasTable:
        n_states = table.shape[-1]
        rows = table.reshape(-1, n_states)
        threshold = np.empty(rows.shape, dtype=np.uint64)
        alias = np.empty(rows.shape, dtype=np.int64)
        scale = float(1 << 32)
        for r, row in enumerate(rows):
            prob, row_alias = _vose(row)
            threshold[r] = np.minimum(np.round(prob * scale), scale).astype(np.uint64)
            alias[r] = row_alias
        return cls(threshold.reshape(-1), alias.reshape(-1), n_states)


def _vose(row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vose's alias method for one distribution (numerically stable variant)."""
    n = row.shape[0]
    scaled = (row / row.sum() * n).tolist()
    prob = [1.0] * n
    alias = list(range(n))
    small = [i for i, p in enumerate(scaled) if p < 1.0]
    large = [i for i, p in enumerate(scaled) if p >= 1.0]
    while small and large:
        s = small.pop()
        g = large[-1]
        prob[s] = scaled[s]
        alias[s] = g
        scaled[g] = scaled[g] + scaled[s] - 1.0
        if scaled[g] < 1.0:
            large.pop()
            small.append(g)
    # Leftovers are 1 up to rounding: always accept them.
    return np.asarray(prob), np.asarray(alias)


@dataclass
class SampledBlock:
    """One block of sequences: tokens (B, T) and, when asked, latent states (B, T)."""

    tokens: np.ndarray
    latents: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class _NodePlan:
    """What one node needs at every step: where its inputs are and how to draw."""

    index: int  # position in the topological order
    node: NodeSpec
    input_indices: tuple[int, ...]  # positions (topological) of self (latent) and parents
    row_strides: tuple[int, ...]  # multiply input states by these to get the row index
    alias: AliasTable | None  # None for `transition` nodes


class BlockSampler:
    """Draws blocks of sequences from a graph with given fixed conditionals.

    No generator is kept: every call derives its randomness from its arguments,
    so blocks can be drawn in any order, by any process, with the same result.
    """

    def __init__(
        self,
        graph: GraphSpec,
        conditionals: Mapping[str, np.ndarray],
        seq_len: int,
        seed: int,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        if seq_len < 1:
            raise ValueError("seq_len must be at least 1")
        self.graph = graph
        self.seq_len = seq_len
        self.seed = seed
        self.block_size = block_size
        order = graph.order
        position = {node.name: i for i, node in enumerate(order)}
        plans = []
        for i, node in enumerate(order):
            inputs = ([] if node.observed else [i]) + [position[p] for p in node.parents]
            sizes = graph.input_sizes(node.name)
            strides = [int(np.prod(sizes[k + 1 :], dtype=np.int64)) for k in range(len(sizes))]
            alias = None
            if node.mode != "transition":
                table = conditionals[node.name]
                expected = graph.table_shape(node.name)
                if table.shape != expected:
                    raise ValueError(
                        f"conditional of {node.name!r} has shape {table.shape}, expected {expected}"
                    )
                alias = AliasTable.build(table)
            plans.append(_NodePlan(i, node, tuple(inputs), tuple(strides), alias))
        self._plans = tuple(plans)
        self._observed_index = position[graph.observed.name]

    def block(self, stream: int, block: int, *, with_latents: bool = False) -> SampledBlock:
        """Draw block `block` of `stream` at the full block size."""
        n_seq, n_steps = self.block_size, self.seq_len
        rng = block_rng(self.seed, stream, block)
        transition_tables = self._transition_tables(stream, block)
        n_nodes = len(self._plans)
        # states[t, k] = state of node k (topological) at time t, for all sequences.
        states = np.zeros((n_steps, n_nodes, n_seq), dtype=np.int64)
        arange = np.arange(n_seq)
        for t0 in range(1, n_steps, _TIME_CHUNK):
            t1 = min(t0 + _TIME_CHUNK, n_steps)
            words = rng.bit_generator.random_raw(size=(t1 - t0, n_nodes, n_seq))
            for t in range(t0, t1):
                previous, current, step_words = states[t - 1], states[t], words[t - t0]
                for plan in self._plans:
                    row = np.zeros(n_seq, dtype=np.int64)
                    for input_index, stride in zip(
                        plan.input_indices, plan.row_strides, strict=True
                    ):
                        source = previous if input_index == plan.index else current
                        row += source[input_index] * stride
                    word = step_words[plan.index]
                    if plan.alias is not None:
                        current[plan.index] = _alias_draw(plan.alias, row, word)
                    else:
                        table = transition_tables[plan.node.name]
                        current[plan.index] = _inverse_cdf_draw(table, arange, row, word)
        tokens = np.ascontiguousarray(
            states[:, self._observed_index].T.astype(state_dtype(self.graph.vocab_size))
        )
        latents = {}
        if with_latents:
            for plan in self._plans:
                if not plan.node.observed:
                    latents[plan.node.name] = np.ascontiguousarray(
                        states[:, plan.index].T.astype(state_dtype(plan.node.states))
                    )
        return SampledBlock(tokens, latents)

    def transition_kernels(self, stream: int, block: int) -> dict[str, np.ndarray]:
        """The per-sequence kernels of `transition` nodes for one block.

        Shape (block_size, *inputs, states) per node; what the block's sequences
        were drawn from (the Monte Carlo entropy estimate reads them).
        """
        return self._transition_tables(stream, block, flat=False)

    def _transition_tables(
        self, stream: int, block: int, *, flat: bool = True
    ) -> dict[str, np.ndarray]:
        tables = {}
        if not self.graph.has_transition:
            return tables
        rng = block_rng(self.seed, stream, block, purpose=1)
        for node in self.graph.nodes:  # declaration order: stable draw order
            if node.mode == "transition":
                table = draw_conditional(self.graph, node, rng, batch=(self.block_size,))
                tables[node.name] = (
                    np.cumsum(table.reshape(self.block_size, -1, node.states), axis=-1)
                    if flat
                    else table
                )
        return tables


def _alias_draw(alias: AliasTable, row: np.ndarray, word: np.ndarray) -> np.ndarray:
    column = ((word >> _SHIFT) * np.uint64(alias.n_states)) >> _SHIFT
    flat = row * alias.n_states + column.astype(np.int64)
    accept = (word & _LOW_BITS) < alias.threshold[flat]
    return np.where(accept, column.astype(np.int64), alias.alias[flat])


def _inverse_cdf_draw(
    cumulative: np.ndarray, arange: np.ndarray, row: np.ndarray, word: np.ndarray
) -> np.ndarray:
    # 53 random bits as a uniform in [0, 1); cumulative rows are (B, rows, states).
    uniform = (word >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    cdf = cumulative[arange, row]
    drawn = (cdf < uniform[:, None] * cdf[:, -1:]).sum(axis=1)
    return np.minimum(drawn, cumulative.shape[-1] - 1)
