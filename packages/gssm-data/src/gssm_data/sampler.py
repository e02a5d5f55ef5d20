"""Vectorised, block-deterministic sampling of GSSM sequences.

Determinism by blocks (docs/design.md, section Determinism): the sequences of block b of a
split come from a generator seeded by (seed, stream, b), and every block is
drawn at the full :data:`BLOCK_SIZE` (the last one is truncated). So the same
spec and seed give the same bytes whatever the worker count, shard layout or
chunking, and a split of n sequences is a prefix of the split of 10n.

Cost per token and node is O(1): every fixed table is turned into Walker alias
tables once (:class:`AliasTable`), and one 64-bit random word per draw gives
both the column and the acceptance test, compared in a single unsigned
comparison. Work is vectorised over the sequences of a block; the Python loop
runs over time steps and latent nodes only. The observed node, when no node
depends on it (the usual case), is drawn for 16 time steps at once, since its
inputs at time t are all known once the latents of time t are.

`transition` nodes draw a fresh kernel for every sequence. Their sequences are
sampled in groups of :data:`TRANSITION_GROUP`, each with its own generators for
kernels and tokens, so memory holds one group's kernels, not the block's; a
draw is an inverse CDF over the visited row (O(states) per token, dominated by
the kernel draw itself).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from gssm_data.errors import GssmDataError
from gssm_data.graph import GraphSpec, NodeSpec
from gssm_data.kernels import check_seed, draw_conditional, seed_sequence

# Sequences per block: the unit of determinism, of parallel work and of the
# store's chunking. Part of the format: changing it changes the data.
BLOCK_SIZE = 4096

# Random streams of one seed: 0 draws the fixed kernels (kernels.KERNEL_STREAM).
STREAMS: Mapping[str, int] = {"train": 1, "test": 2, "online": 3}

# Sequences of a block that share one generator for their per-sequence
# `transition` kernels and one for their tokens. Part of the format.
TRANSITION_GROUP = 256

# What a block generator is for (the fourth word of its seed).
TOKEN_PURPOSE = 0
KERNEL_PURPOSE = 1

# Time steps whose random words are drawn at once (and over which the observed
# node is vectorised). Small enough that the words stay in cache; changing it
# does not change the stream (draws are consumed in order).
_TIME_CHUNK = 16

# Acceptance tests of the alias method are exact to 2^-32.
_ACCEPT_BITS = 32
_UNIT = 1 << _ACCEPT_BITS
# Buckets per batch of rows when building alias tables.
_BUILD_BATCH = 1 << 18


def state_dtype(n_states: int) -> np.dtype:
    """The smallest unsigned dtype holding states 0 .. n_states-1."""
    if n_states <= 1 << 8:
        return np.dtype(np.uint8)
    if n_states <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def block_rng(
    seed: int, stream: int, block: int, purpose: int = TOKEN_PURPOSE, group: int | None = None
) -> np.random.Generator:
    """The generator of one block (or one group of it): a pure function of its arguments."""
    words = (
        (seed, stream, block, purpose) if group is None else (seed, stream, block, purpose, group)
    )
    return np.random.Generator(np.random.PCG64(seed_sequence(*words)))


@dataclass(frozen=True)
class AliasTable:
    """Walker alias tables for every row of a conditional, flattened row-major.

    Every row has ``n_columns`` = 2^k >= n_states buckets (padding buckets have
    probability 0), so a 64-bit random word w picks bucket ``w >> shift`` (its top
    k bits) and its next 32 bits decide between the bucket's own state and its
    alias. Entry ``i`` of row ``r`` (flat index ``r * n_columns + i``) stores
    ``threshold = i << shift | accept << (shift - 32)``, where ``accept / 2^32`` is
    the probability of keeping state i; so "keep i" is the single comparison
    ``w < threshold``. Masses are integers in units of 2^-32 of a bucket, so the
    distribution encoded equals the table to within 2^-32 per entry.
    """

    threshold: np.ndarray  # (rows * n_columns,) uint64
    alias: np.ndarray  # (rows * n_columns,) int64
    n_states: int
    n_columns: int
    shift: int = field(init=False)  # right shift of a word that leaves the bucket (64 - k)

    def __post_init__(self) -> None:
        assert self.n_columns >= 2 and self.n_columns & (self.n_columns - 1) == 0
        object.__setattr__(self, "shift", 65 - self.n_columns.bit_length())

    @property
    def n_rows(self) -> int:
        return self.alias.shape[0] // self.n_columns

    @classmethod
    def build(cls, table: np.ndarray) -> AliasTable:
        """Alias tables for every row of `table` (last axis = states), vectorised over rows.

        Rows are processed in batches of about 2^18 buckets, so the temporaries
        stay in cache and are recycled instead of faulted in afresh.
        """
        n_states = table.shape[-1]
        rows = np.asarray(table, dtype=np.float64).reshape(-1, n_states)
        sums = rows.sum(axis=1, keepdims=True)
        if not (np.isfinite(rows).all() and (rows >= 0).all() and (sums > 0).all()):
            raise ValueError("conditional rows must be finite, non-negative, with a positive sum")
        n_columns = 1 << max(1, (n_states - 1).bit_length())
        shift = 65 - n_columns.bit_length()
        n_rows = rows.shape[0]
        threshold = np.empty((n_rows, n_columns), dtype=np.uint64)
        alias = np.empty((n_rows, n_columns), dtype=np.int64)
        columns = np.arange(n_columns, dtype=np.uint64) << np.uint64(shift)
        batch = max(1, _BUILD_BATCH // n_columns)
        for start in range(0, n_rows, batch):
            stop = min(start + batch, n_rows)
            mass = _quantise(rows[start:stop] / sums[start:stop], n_columns)
            accept, alias[start:stop] = _split_buckets(mass)
            np.left_shift(
                accept.view(np.uint64), np.uint64(shift - _ACCEPT_BITS), out=accept.view(np.uint64)
            )
            np.bitwise_or(columns, accept.view(np.uint64), out=threshold[start:stop])
        return cls(threshold.reshape(-1), alias.reshape(-1), n_states, n_columns)


def _quantise(probabilities: np.ndarray, n_columns: int) -> np.ndarray:
    """Integer masses (rows, n_columns), units of 2^-32 of a bucket, each row summing exactly.

    Rounded to nearest; the rounding leftover (under n_states / 2 units) goes to
    the row's largest entry, so every entry is within 2^-33 of the table.
    """
    n_rows, n_states = probabilities.shape
    capacity = n_columns << _ACCEPT_BITS
    mass = np.zeros((n_rows, n_columns), dtype=np.int64)
    mass[:, :n_states] = np.rint(probabilities * float(capacity))
    largest = mass.argmax(axis=1)
    mass[np.arange(n_rows), largest] += capacity - mass.sum(axis=1)
    return mass


def _split_buckets(mass: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's buckets as (accept, alias), by the sweep construction, without a row loop.

    Sweep (Hübschle-Schneider & Sanders, 2019): walk the light entries (mass <
    one bucket) in index order, each topped up by the current heavy entry; when
    a heavy has given all its excess it becomes a bucket itself, topped up by
    the next heavy. With D_i the deficit of the first i lights and E_k the
    excess of the first k heavies, light i+1 takes the first heavy with E_k >
    D_i, and heavy k keeps 1 + E_k - (first D_i >= E_k). Both are searches in
    sorted prefix sums, done for all rows at once by offsetting each row's keys
    past the previous row's; integer arithmetic keeps every bucket exact.
    `accept` is in units of 2^-32 and below 2^32: a full bucket is its own alias.
    """
    n_rows, n_columns = mass.shape
    surplus = mass - _UNIT
    heavy = surplus >= 0
    light = ~heavy
    row_base = np.arange(n_rows, dtype=np.int64)[:, None] * ((n_columns << _ACCEPT_BITS) + 1)
    deficit = np.maximum(-surplus, 0)
    deficit_before = np.cumsum(deficit, axis=1)
    total_deficit = deficit_before[:, -1:] + row_base
    deficit_before -= deficit
    deficit_before += row_base
    excess_through = np.cumsum(np.maximum(surplus, 0), axis=1)
    excess_through += row_base
    heavy_keys = excess_through[heavy]  # row-major, so sorted
    heavy_rows, heavy_columns = np.nonzero(heavy)

    accept = mass
    alias = np.empty_like(mass)
    partner = np.searchsorted(heavy_keys, deficit_before[light], side="right")
    alias[light] = heavy_columns[partner]

    stops = np.concatenate([deficit_before, total_deficit], axis=1)
    stop_keys = stops[np.concatenate([light, np.ones((n_rows, 1), dtype=bool)], axis=1)]
    reached = stop_keys[np.searchsorted(stop_keys, heavy_keys, side="left")]
    accept[heavy] = _UNIT + heavy_keys - reached
    has_next = np.append(heavy_rows[1:] == heavy_rows[:-1], False)
    alias[heavy] = np.where(has_next, np.roll(heavy_columns, -1), heavy_columns)

    full_rows, full_columns = np.nonzero(accept >= _UNIT)
    accept[full_rows, full_columns] = _UNIT - 1
    alias[full_rows, full_columns] = full_columns
    return accept, alias


@dataclass
class SampledBlock:
    """One block of sequences: tokens (B, T) and, when asked, latent states (B, T)."""

    tokens: np.ndarray
    latents: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class _Input:
    """One input of a node: where its state lives and what it adds to the row offset."""

    index: int  # topological position of the input node
    previous: bool  # its state at t - 1 (the node itself) or at t (a parent)
    multiplier: int  # row stride, times n_columns for alias tables


@dataclass(frozen=True)
class _NodePlan:
    """What one node needs at every step: where its inputs are and how to draw."""

    index: int  # position in the topological order
    node: NodeSpec
    inputs: tuple[_Input, ...]
    n_rows: int  # rows of its table (product of the input sizes)
    alias: AliasTable | None  # None for `transition` nodes


class _Buffers:
    """Scratch arrays of one shape, reused at every step (no per-step allocation)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.offsets = np.empty(shape, dtype=np.int64)
        self.scratch = np.empty(shape, dtype=np.int64)
        self.column = np.empty(shape, dtype=np.uint64)
        self.threshold = np.empty(shape, dtype=np.uint64)
        self.accept = np.empty(shape, dtype=bool)


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
            raise GssmDataError(f"seq_len must be at least 1, got {seq_len}")
        if block_size < 1:
            raise GssmDataError(f"block_size must be at least 1, got {block_size}")
        self.graph = graph
        self.seq_len = seq_len
        self.seed = check_seed(seed)
        self.block_size = block_size
        position = {node.name: i for i, node in enumerate(graph.order)}
        self._plans = tuple(
            self._plan(node, i, position, conditionals) for i, node in enumerate(graph.order)
        )
        self._observed_index = position[graph.observed.name]
        # The observed node is drawn for a whole time chunk at once when no node
        # reads it; otherwise it takes its turn in the step loop.
        is_parent = any(graph.observed.name in node.parents for node in graph.nodes)
        self._chunk_plan = None if is_parent else self._plans[self._observed_index]
        self._step_plans = tuple(plan for plan in self._plans if plan is not self._chunk_plan)

    def _plan(
        self,
        node: NodeSpec,
        index: int,
        position: Mapping[str, int],
        conditionals: Mapping[str, np.ndarray],
    ) -> _NodePlan:
        sizes = self.graph.input_sizes(node.name)
        sources = ([] if node.observed else [(index, True)]) + [
            (position[parent], False) for parent in node.parents
        ]
        alias = None
        if node.mode != "transition":
            if node.name not in conditionals:
                raise ValueError(f"no conditional table given for node {node.name!r}")
            table = np.asarray(conditionals[node.name])
            expected = self.graph.table_shape(node.name)
            if table.shape != expected:
                raise ValueError(
                    f"conditional of {node.name!r} has shape {table.shape}, expected {expected}"
                )
            alias = AliasTable.build(table)
        scale = 1 if alias is None else alias.n_columns
        inputs = tuple(
            _Input(source, previous, int(np.prod(sizes[k + 1 :], dtype=np.int64)) * scale)
            for k, (source, previous) in enumerate(sources)
        )
        n_rows = int(np.prod(sizes, dtype=np.int64))
        return _NodePlan(index, node, inputs, n_rows, alias)

    def block(self, stream: int, block: int, *, with_latents: bool = False) -> SampledBlock:
        """Draw block `block` of `stream` at the full block size."""
        self._check_block(stream, block)
        n_steps, n_seq = self.seq_len, self.block_size
        states = np.zeros((n_steps, len(self._plans), n_seq), dtype=np.int64)
        tokens = _padded_rows(n_steps, n_seq, state_dtype(self.graph.vocab_size))
        if self.graph.has_transition:
            for group, members in enumerate(self._groups()):
                sequences = slice(members.start, members.stop)
                self._sample(
                    block_rng(self.seed, stream, block, TOKEN_PURPOSE, group),
                    self._cumulative_tables(self._group_kernels(stream, block, group)),
                    states[:, :, sequences],
                    tokens[:, sequences],
                )
        else:
            self._sample(block_rng(self.seed, stream, block), {}, states, tokens)
        if self._chunk_plan is None:
            np.copyto(tokens, states[:, self._observed_index], casting="unsafe")
        latents = {}
        if with_latents:
            for plan in self._plans:
                if not plan.node.observed:
                    rows = _padded_rows(n_steps, n_seq, state_dtype(plan.node.states))
                    np.copyto(rows, states[:, plan.index], casting="unsafe")
                    latents[plan.node.name] = _transposed(rows)
        return SampledBlock(_transposed(tokens), latents)

    def transition_kernels(
        self, stream: int, block: int, sequences: slice | None = None
    ) -> dict[str, np.ndarray]:
        """The per-sequence kernels of `transition` nodes for one block.

        Shape (n, *inputs, states) per node, n = block_size or the length of
        `sequences` (a step-1 slice of the block's sequences: only the groups it
        touches are drawn, which bounds memory for big tables); exactly what
        those sequences were drawn from.
        """
        self._check_block(stream, block)
        if not self.graph.has_transition:
            return {}
        start, stop, step = (sequences or slice(None)).indices(self.block_size)
        if step != 1:
            raise ValueError("sequences must be a slice with step 1")
        parts: dict[str, list[np.ndarray]] = {}
        for group, members in enumerate(self._groups()):
            low, high = max(start, members.start), min(stop, members.stop)
            if low >= high:
                continue
            for name, table in self._group_kernels(stream, block, group).items():
                parts.setdefault(name, []).append(table[low - members.start : high - members.start])
        if not parts:  # an empty slice
            return {
                node.name: np.empty((0, *self.graph.table_shape(node.name)))
                for node in self.graph.nodes
                if node.mode == "transition"
            }
        return {name: np.concatenate(tables) for name, tables in parts.items()}

    def _check_block(self, stream: int, block: int) -> None:
        if stream < 1:
            raise ValueError(f"stream must be >= 1 (0 draws the fixed kernels), got {stream}")
        if block < 0:
            raise ValueError(f"block must be >= 0, got {block}")

    def _groups(self) -> list[range]:
        """The block's sequences in groups of TRANSITION_GROUP (the last may be shorter)."""
        return [
            range(start, min(start + TRANSITION_GROUP, self.block_size))
            for start in range(0, self.block_size, TRANSITION_GROUP)
        ]

    def _group_kernels(self, stream: int, block: int, group: int) -> dict[str, np.ndarray]:
        """Per-sequence kernels of one group, (n, *inputs, states), in declaration order."""
        size = len(self._groups()[group])
        rng = block_rng(self.seed, stream, block, KERNEL_PURPOSE, group)
        return {
            node.name: draw_conditional(self.graph, node, rng, batch=(size,))
            for node in self.graph.nodes
            if node.mode == "transition"
        }

    def _cumulative_tables(self, kernels: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Row-wise CDFs, (n_sequences * rows, states): row = sequence * rows + input row."""
        return {
            name: np.cumsum(table.reshape(-1, table.shape[-1]), axis=-1)
            for name, table in kernels.items()
        }

    def _sample(
        self,
        rng: np.random.Generator,
        cumulative: Mapping[str, np.ndarray],
        states: np.ndarray,
        tokens: np.ndarray,
    ) -> None:
        """Fill states (seq_len, nodes, n) of one group of sequences from t = 1 on.

        `states` and `tokens` (seq_len, n) arrive zeroed (the fixed start at t =
        0). The observed node, when drawn a time chunk at a time, goes straight
        to `tokens`; otherwise it is in `states` like the others.
        """
        n_steps, n_nodes, n_seq = states.shape
        step_buffers = _Buffers((n_seq,))
        chunk_buffers = None
        for t0 in range(1, n_steps, _TIME_CHUNK):
            t1 = min(t0 + _TIME_CHUNK, n_steps)
            words = rng.bit_generator.random_raw(size=(t1 - t0, n_nodes, n_seq))
            for t in range(t0, t1):
                previous, current, step_words = states[t - 1], states[t], words[t - t0]
                for plan in self._step_plans:
                    sources = [
                        previous[item.index] if item.previous else current[item.index]
                        for item in plan.inputs
                    ]
                    current[plan.index] = self._draw(
                        plan, sources, step_words[plan.index], step_buffers, cumulative
                    )
            if self._chunk_plan is not None:
                plan = self._chunk_plan
                if chunk_buffers is None or chunk_buffers.offsets.shape[0] != t1 - t0:
                    chunk_buffers = _Buffers((t1 - t0, n_seq))
                sources = [states[t0:t1, item.index] for item in plan.inputs]
                drawn = self._draw(plan, sources, words[:, plan.index], chunk_buffers, cumulative)
                np.copyto(tokens[t0:t1], drawn, casting="unsafe")

    def _draw(
        self,
        plan: _NodePlan,
        sources: Sequence[np.ndarray],
        words: np.ndarray,
        buffers: _Buffers,
        cumulative: Mapping[str, np.ndarray],
    ) -> np.ndarray:
        """States of one node given its inputs' states and one random word per draw."""
        offsets = buffers.offsets
        if not plan.inputs:
            offsets.fill(0)
        for k, (item, source) in enumerate(zip(plan.inputs, sources, strict=True)):
            if k == 0:
                np.multiply(source, item.multiplier, out=offsets)
            else:
                np.multiply(source, item.multiplier, out=buffers.scratch)
                offsets += buffers.scratch
        if plan.alias is not None:
            return _alias_draw(plan.alias, offsets, words, buffers)
        table = cumulative[plan.node.name]
        offsets += np.arange(words.shape[-1], dtype=np.int64) * plan.n_rows
        return _inverse_cdf_draw(table, offsets, words)


def _alias_draw(
    table: AliasTable, offsets: np.ndarray, words: np.ndarray, buffers: _Buffers
) -> np.ndarray:
    """One alias draw per word; `offsets` (row * n_columns) is overwritten."""
    column = buffers.column
    np.right_shift(words, table.shift, out=column)
    np.add(offsets, column.view(np.int64), out=offsets)
    table.threshold.take(offsets, out=buffers.threshold, mode="wrap")
    np.less(words, buffers.threshold, out=buffers.accept)
    alias = table.alias.take(offsets, out=buffers.threshold.view(np.int64), mode="wrap")
    return np.where(buffers.accept, column.view(np.int64), alias)


def _inverse_cdf_draw(cumulative: np.ndarray, rows: np.ndarray, words: np.ndarray) -> np.ndarray:
    """One inverse-CDF draw per word from the given rows of `cumulative` (53-bit uniforms)."""
    uniform = (words >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    cdf = cumulative[rows]
    drawn = (cdf < (uniform * cdf[..., -1])[..., None]).sum(axis=-1)
    return np.minimum(drawn, cumulative.shape[-1] - 1)


def _padded_rows(n_steps: int, n_seq: int, dtype: np.dtype) -> np.ndarray:
    """A zeroed (n_steps, n_seq) array whose rows are 64 bytes apart from a 4 KiB multiple.

    With rows of exactly 4 KiB (n_seq = 4096 bytes) every element of a column
    falls in the same cache set, and the transposing copy runs six times slower.
    """
    return np.zeros((n_steps, n_seq + 64 // dtype.itemsize), dtype=dtype)[:, :n_seq]


def _transposed(rows: np.ndarray) -> np.ndarray:
    """(T, B) -> (B, T), C-contiguous: the layout of the store and of the callers."""
    out = np.empty(rows.shape[::-1], dtype=rows.dtype)
    np.copyto(out, rows.T)
    return out
