"""The block sampler: fixed start, determinism by blocks, frequencies, alias tables, modes."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from gssm_data import sampler as sampler_module
from gssm_data.errors import GssmDataError
from gssm_data.graph import GraphSpec, parse_graph
from gssm_data.kernels import draw_kernels
from gssm_data.presets import load_preset
from gssm_data.sampler import (
    BLOCK_SIZE,
    STREAMS,
    TRANSITION_GROUP,
    AliasTable,
    BlockSampler,
    SampledBlock,
    state_dtype,
)

# X is a parent of W, so X is drawn in the step loop; Z3 is fullrank with two parents.
MIXED = {
    "nodes": [
        {"name": "Z1", "states": 3, "alpha": 2.0},
        {"name": "Z2", "states": 4, "alpha": 2.0, "parents": ["Z1"]},
        {"name": "Z3", "states": 2, "alpha": 2.0, "parents": ["Z1", "Z2"], "kernel": "fullrank"},
        {"name": "X", "states": 5, "alpha": 2.0, "parents": ["Z2", "Z3"], "observed": True},
        {"name": "W", "states": 3, "alpha": 2.0, "parents": ["X"]},
    ]
}
# An HMM whose observed node is drawn a time chunk at a time; 7 tokens pad to 8 buckets.
CHAIN = {
    "nodes": [
        {"name": "Z", "states": 6, "alpha": 2.0},
        {"name": "X", "states": 7, "alpha": 2.0, "parents": ["Z"], "observed": True},
    ]
}


def make_sampler(
    graph: GraphSpec, *, seed: int = 0, seq_len: int = 33, block_size: int = 64
) -> BlockSampler:
    return BlockSampler(graph, draw_kernels(graph, seed), seq_len, seed, block_size=block_size)


def all_states(graph: GraphSpec, block: SampledBlock) -> dict[str, np.ndarray]:
    return {**block.latents, graph.observed.name: block.tokens}


def transition_counts(graph: GraphSpec, states: dict[str, np.ndarray], name: str) -> np.ndarray:
    """counts[inputs..., next] of a node over t >= 1, from the sampled states themselves."""
    node = graph.node(name)
    inputs = [] if node.observed else [states[name][:, :-1]]
    inputs += [states[parent][:, 1:] for parent in node.parents]
    sizes = graph.input_sizes(name)
    row = np.ravel_multi_index(tuple(i.astype(np.int64) for i in inputs), sizes) if sizes else 0
    cell = np.asarray(row) * node.states + states[name][:, 1:].astype(np.int64)
    n_cells = math.prod(sizes) * node.states
    return np.bincount(cell.reshape(-1), minlength=n_cells).reshape(*sizes, node.states)


def chi_square_z(counts: np.ndarray, table: np.ndarray, min_row: int = 200) -> float:
    """Pearson chi-square of counts against table rows, as a standard normal score.

    Rows seen fewer than `min_row` times are skipped; within a row, cells
    expecting fewer than 5 counts are pooled (into the row's largest cell if the
    pool is still small). The chi-square tail is mapped to z by the
    Wilson-Hilferty cube-root approximation (scipy-free).
    """
    counts = counts.reshape(-1, counts.shape[-1]).astype(np.float64)
    table = table.reshape(-1, table.shape[-1])
    statistic, dof = 0.0, 0
    for observed, probabilities in zip(counts, table, strict=True):
        total = observed.sum()
        if total < min_row:
            continue
        expected = total * probabilities
        small = expected < 5
        cells_observed, cells_expected = list(observed[~small]), list(expected[~small])
        if small.any():
            pooled = (observed[small].sum(), expected[small].sum())
            if pooled[1] >= 5:
                cells_observed.append(pooled[0])
                cells_expected.append(pooled[1])
            else:
                largest = int(np.argmax(cells_expected))
                cells_observed[largest] += pooled[0]
                cells_expected[largest] += pooled[1]
        o, e = np.array(cells_observed), np.array(cells_expected)
        statistic += float(((o - e) ** 2 / e).sum())
        dof += len(o) - 1
    assert dof >= 1
    scale = 2.0 / (9.0 * dof)
    return ((statistic / dof) ** (1 / 3) - (1 - scale)) / math.sqrt(scale)


def decoded_masses(table: AliasTable) -> np.ndarray:
    """(rows, n_columns) probability masses in units of 2^-32 of a bucket, read from the
    encoded thresholds and aliases (written out independently of the package)."""
    n_columns = table.n_columns
    bits = n_columns.bit_length() - 1
    shift = np.uint64(64 - bits)
    threshold = table.threshold.reshape(-1, n_columns)
    alias = table.alias.reshape(-1, n_columns)
    columns = np.arange(n_columns, dtype=np.uint64)
    assert ((threshold >> shift) == columns).all(), "a threshold must start with its column"
    fraction = threshold - (columns << shift)  # words of this column below it are kept
    assert (fraction % (np.uint64(1) << np.uint64(32 - bits)) == 0).all()
    keep = (fraction >> np.uint64(32 - bits)).astype(np.int64)  # units of 2^-32
    assert (keep < 2**32).all()
    masses = np.zeros(threshold.shape, dtype=np.int64)
    rows = np.arange(threshold.shape[0])[:, None]
    np.add.at(masses, (np.broadcast_to(rows, keep.shape), columns.astype(np.int64)), keep)
    np.add.at(masses, (np.broadcast_to(rows, keep.shape), alias), 2**32 - keep)
    return masses


@pytest.mark.parametrize("preset", ["debug", "hmm", "base", "large"])
def test_every_node_starts_in_state_zero(preset: str) -> None:
    graph = load_preset(preset)
    block = make_sampler(graph).block(STREAMS["train"], 0, with_latents=True)
    assert (block.tokens[:, 0] == 0).all()
    assert set(block.latents) == {node.name for node in graph.latents}
    for states in block.latents.values():
        assert (states[:, 0] == 0).all()
    assert block.tokens[:, 1:].any()


def test_blocks_have_the_full_block_size_and_the_smallest_dtype() -> None:
    graph = load_preset("hmm")
    block = make_sampler(graph, seq_len=9, block_size=100).block(1, 0, with_latents=True)
    assert block.tokens.shape == (100, 9)
    assert block.tokens.dtype == np.uint8
    assert block.tokens.flags.c_contiguous
    assert block.latents["Z1"].shape == (100, 9)
    assert BLOCK_SIZE == 4096
    assert make_sampler(graph).block_size == 64
    wide = parse_graph(
        {
            "nodes": [
                {"name": "Z", "states": 2, "alpha": 1.0},
                {"name": "X", "states": 300, "alpha": 1.0, "parents": ["Z"], "observed": True},
            ]
        }
    )
    tokens = make_sampler(wide, seq_len=50).block(1, 0).tokens
    assert tokens.dtype == np.uint16
    assert tokens.max() >= 256
    assert [state_dtype(n) for n in (1, 256, 257, 65536, 65537)] == [
        np.uint8,
        np.uint8,
        np.uint16,
        np.uint16,
        np.uint32,
    ]


def test_the_same_block_twice_is_identical() -> None:
    sampler = make_sampler(parse_graph(MIXED))
    first, second = sampler.block(1, 3, with_latents=True), sampler.block(1, 3, with_latents=True)
    np.testing.assert_array_equal(first.tokens, second.tokens)
    for name in first.latents:
        np.testing.assert_array_equal(first.latents[name], second.latents[name])


def test_blocks_drawn_in_any_order_by_any_sampler_are_identical() -> None:
    graph = load_preset("base")
    forward = [make_sampler(graph).block(1, b).tokens for b in range(4)]
    other = make_sampler(graph)
    backward = {b: other.block(1, b).tokens for b in (3, 1, 0, 2)}
    for b in range(4):
        np.testing.assert_array_equal(forward[b], backward[b])


def test_a_block_does_not_depend_on_any_other_block_stream_or_latent_recording() -> None:
    graph = load_preset("base")
    sampler = make_sampler(graph)
    alone = make_sampler(graph).block(1, 7).tokens
    for b in range(3):
        sampler.block(2, b)
    np.testing.assert_array_equal(sampler.block(1, 7).tokens, alone)
    np.testing.assert_array_equal(sampler.block(1, 7, with_latents=True).tokens, alone)
    assert not np.array_equal(sampler.block(1, 6).tokens, alone)
    assert not np.array_equal(sampler.block(2, 7).tokens, alone)
    assert not np.array_equal(make_sampler(graph, seed=1).block(1, 7).tokens, alone)


def test_the_time_chunk_is_not_part_of_the_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    graph = parse_graph(MIXED)
    expected = make_sampler(graph, seq_len=40).block(1, 2, with_latents=True)
    monkeypatch.setattr(sampler_module, "_TIME_CHUNK", 3)
    again = make_sampler(graph, seq_len=40).block(1, 2, with_latents=True)
    np.testing.assert_array_equal(again.tokens, expected.tokens)
    np.testing.assert_array_equal(again.latents["W"], expected.latents["W"])


def test_the_bytes_of_a_block_are_pinned() -> None:
    # Changing these bytes changes every dataset: bump manifest.FORMAT_VERSION if meant.
    tokens = make_sampler(load_preset("debug"), seq_len=17).block(1, 0).tokens
    digest = hashlib.sha256(tokens.tobytes()).hexdigest()
    assert digest == PINNED_DEBUG_DIGEST


# Format version 2 (fixed kernels drawn by "gamma-inverse-cdf").
PINNED_DEBUG_DIGEST = "15a98076ecf41302dee3de8db0d64956f7af8b0c48f538b480f7992d22d14171"


@pytest.mark.parametrize("graph_data", [MIXED, CHAIN], ids=["step-loop", "time-chunk"])
def test_transition_frequencies_match_the_conditional_tables(graph_data: dict) -> None:
    graph = parse_graph(graph_data)
    kernels = draw_kernels(graph, seed=21)
    sampler = BlockSampler(graph, kernels, seq_len=129, seed=21, block_size=1024)
    states = all_states(graph, sampler.block(1, 0, with_latents=True))
    wrong = draw_kernels(graph, seed=22)
    for node in graph.nodes:
        counts = transition_counts(graph, states, node.name)
        assert chi_square_z(counts, kernels[node.name]) < 4.5, node.name
        # The same test has the power to reject another seed's table.
        assert chi_square_z(counts, wrong[node.name]) > 20, node.name


def test_sparse_rows_are_sampled_as_drawn() -> None:
    # alpha 1e-3: most entries sit at the 1e-10 floor; each row's mass is on a few states.
    graph = load_preset("hmm")
    kernels = draw_kernels(graph, seed=1)
    block = BlockSampler(graph, kernels, 65, 1, block_size=512).block(1, 0, with_latents=True)
    states = all_states(graph, block)
    for name in ("Z1", "X"):
        counts = transition_counts(graph, states, name)
        possible = kernels[name] > 1e-6
        assert counts[~possible].sum() == 0
        visited = counts.sum(axis=-1) > 0
        assert (counts[visited] > 0).sum() <= possible[visited].sum()


@pytest.mark.parametrize("n_states", [1, 2, 3, 7, 64, 65, 1000])
@pytest.mark.parametrize("alpha", [1e-3, 0.3, 50.0])
def test_alias_tables_encode_the_table_to_2_to_the_minus_32(n_states: int, alpha: float) -> None:
    rng = np.random.default_rng(n_states)
    table = rng.dirichlet(np.full(n_states, alpha), size=40)
    table[0] = 0.0
    table[0, -1] = 1.0  # one-hot
    table[1] = 1.0  # uniform, unnormalised
    alias = AliasTable.build(table)
    assert alias.n_columns >= n_states
    assert alias.n_columns & (alias.n_columns - 1) == 0
    masses = decoded_masses(alias)
    assert (masses[:, n_states:] == 0).all(), "padding buckets must never be drawn"
    probabilities = masses[:, :n_states] / (alias.n_columns * 2.0**32)
    expected = table / table.sum(axis=1, keepdims=True)
    assert np.abs(probabilities - expected).max() <= 2.0**-32


def test_alias_tables_built_in_batches_are_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sampler_module, "_BUILD_BATCH", 64)  # 4 rows of 16 buckets per batch
    table = np.random.default_rng(0).dirichlet(np.full(10, 0.2), size=(5, 7))
    alias = AliasTable.build(table)
    assert alias.n_rows == 35
    masses = decoded_masses(alias)
    probabilities = masses[:, :10] / (16 * 2.0**32)
    assert np.abs(probabilities - table.reshape(35, 10)).max() <= 2.0**-32


def test_alias_tables_reject_rows_that_are_not_distributions() -> None:
    for bad in ([0.5, -0.1, 0.6], [0.0, 0.0, 0.0], [0.5, np.nan, 0.5]):
        with pytest.raises(ValueError, match="conditional rows must be"):
            AliasTable.build(np.array([bad]))


TRANSITION_OBSERVED = {
    "nodes": [
        {"name": "Z", "states": 2, "alpha": 1.0},
        {"name": "X", "states": 3, "alpha": 0.5, "parents": ["Z"], "observed": True},
    ]
}


def test_transition_kernels_differ_between_the_sequences_of_a_block() -> None:
    graph = load_preset("debug").with_mode("transition")
    block_size = TRANSITION_GROUP + 44  # two groups
    sampler = make_sampler(graph, block_size=block_size)
    kernels = sampler.transition_kernels(1, 0)
    assert set(kernels) == {"Z1"}
    table = kernels["Z1"]
    assert table.shape == (block_size, *graph.table_shape("Z1"))
    assert len({row.tobytes() for row in table.reshape(block_size, -1)}) == block_size
    np.testing.assert_allclose(table.sum(axis=-1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(sampler.transition_kernels(1, 0)["Z1"], table)
    assert not np.array_equal(sampler.transition_kernels(1, 1)["Z1"], table)
    assert not np.array_equal(sampler.transition_kernels(2, 0)["Z1"], table)


def test_transition_kernels_of_a_slice_are_that_slice_of_the_block() -> None:
    graph = load_preset("debug").with_mode("transition")
    sampler = make_sampler(graph, block_size=TRANSITION_GROUP + 44)
    full = sampler.transition_kernels(1, 2)["Z1"]
    window = slice(TRANSITION_GROUP - 6, TRANSITION_GROUP + 4)  # straddles two groups
    np.testing.assert_array_equal(sampler.transition_kernels(1, 2, window)["Z1"], full[window])
    assert sampler.transition_kernels(1, 2, slice(5, 5))["Z1"].shape == (0, 4, 4)
    assert make_sampler(load_preset("debug")).transition_kernels(1, 0) == {}


@pytest.mark.parametrize("transition_node", ["X", "Z"])
def test_each_sequence_follows_its_own_transition_kernel(transition_node: str) -> None:
    data = {"nodes": [dict(item) for item in TRANSITION_OBSERVED["nodes"]]}
    for item in data["nodes"]:
        if item["name"] == transition_node:
            item["mode"] = "transition"
    graph = parse_graph(data)
    sampler = make_sampler(graph, seed=4, seq_len=3001, block_size=5)
    block = sampler.block(1, 0, with_latents=True)
    tables = sampler.transition_kernels(1, 0)[transition_node]
    states = all_states(graph, block)
    for b in range(5):
        one = {name: values[b : b + 1] for name, values in states.items()}
        counts = transition_counts(graph, one, transition_node)
        scores = [chi_square_z(counts, tables[k], min_row=100) for k in range(5)]
        assert scores[b] < 4.5, (b, scores)
        likelihood = [float((counts * np.log(tables[k])).sum()) for k in range(5)]
        assert int(np.argmax(likelihood)) == b, (b, likelihood)


def test_transition_blocks_are_deterministic_and_start_at_zero() -> None:
    graph = load_preset("hmm").with_mode("transition")
    sampler = make_sampler(graph, seq_len=12, block_size=TRANSITION_GROUP + 3)
    first = sampler.block(1, 0, with_latents=True)
    again = make_sampler(graph, seq_len=12, block_size=TRANSITION_GROUP + 3).block(1, 0)
    np.testing.assert_array_equal(first.tokens, again.tokens)
    assert (first.tokens[:, 0] == 0).all() and (first.latents["Z1"][:, 0] == 0).all()


def test_the_sampler_checks_its_inputs() -> None:
    graph = load_preset("debug")
    kernels = draw_kernels(graph, 0)
    with pytest.raises(ValueError, match="has shape"):
        BlockSampler(graph, {**kernels, "X": kernels["X"][:2]}, 10, 0)
    with pytest.raises(ValueError, match="no conditional table given for node 'X'"):
        BlockSampler(graph, {"Z1": kernels["Z1"]}, 10, 0)
    with pytest.raises(GssmDataError, match="seq_len must be at least 1"):
        BlockSampler(graph, kernels, 0, 0)
    with pytest.raises(GssmDataError, match="seed must be"):
        BlockSampler(graph, kernels, 10, -3)
    sampler = BlockSampler(graph, kernels, 10, 0, block_size=8)
    with pytest.raises(ValueError, match="stream must be >= 1"):
        sampler.block(0, 0)
    with pytest.raises(ValueError, match="block must be >= 0"):
        sampler.block(1, -1)
    assert (BlockSampler(graph, kernels, 1, 0, block_size=8).block(1, 0).tokens == 0).all()
