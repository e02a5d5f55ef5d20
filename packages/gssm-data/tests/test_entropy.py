"""The forward algorithm against brute-force enumeration of latent paths.

The brute force below is the slow reference, kept here only: it sums the
probability of every latent path, reading each node's table directly, with no
factorisation, recursion or rescaling shared with the package.
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
import statistics
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import zstandard
from typer.testing import CliRunner

from gssm_data.cli import app
from gssm_data.entropy import (
    MIN_MEASURED_SEQUENCES,
    TRANSITION_NOTE,
    baselines,
    bayes_transition_entropy,
    entropy_stats,
    measure_split,
    rows_entropy,
    sequence_entropy,
    tokens_entropy,
    write_split_entropy,
)
from gssm_data.errors import GssmDataError
from gssm_data.generate import DEFAULT_ENTROPY_STDERR_BITS, GenerateOptions, generate
from gssm_data.graph import GraphSpec, parse_graph
from gssm_data.kernels import draw_kernels
from gssm_data.manifest import EntropyStats
from gssm_data.sampler import STREAMS, BlockSampler
from gssm_data.store import open_store

# Tiny graphs, each a shape the forward algorithm must get right.
GRAPHS: dict[str, list[dict]] = {
    "chain": [
        {"name": "Z1", "states": 2, "alpha": 0.5},
        {"name": "Z2", "states": 3, "alpha": 0.5, "parents": ["Z1"]},
        {"name": "X", "states": 3, "alpha": 0.5, "parents": ["Z2"], "observed": True},
    ],
    "two_parents_product": [
        {"name": "Z1", "states": 2, "alpha": 0.7},
        {"name": "Z2", "states": 2, "alpha": 0.7},
        {"name": "Z3", "states": 3, "alpha": 0.7, "parents": ["Z2", "Z1"]},
        {"name": "X", "states": 3, "alpha": 0.7, "parents": ["Z3"], "observed": True},
    ],
    "fullrank": [
        {"name": "Z1", "states": 2, "alpha": 0.4},
        {"name": "Z2", "states": 3, "alpha": 0.4, "parents": ["Z1"], "kernel": "fullrank"},
        {
            "name": "X",
            "states": 4,
            "alpha": 0.4,
            "parents": ["Z2", "Z1"],
            "kernel": "fullrank",
            "observed": True,
        },
    ],
    # X's parents declared against topological order, and the child declared first.
    "observed_two_parents": [
        {"name": "X", "states": 3, "alpha": 0.6, "parents": ["Z2", "Z1"], "observed": True},
        {"name": "Z2", "states": 3, "alpha": 0.6, "parents": ["Z1"]},
        {"name": "Z1", "states": 2, "alpha": 0.6},
    ],
    "slow": [
        {"name": "Z1", "states": 3, "alpha": 0.3, "mode": "slow"},
        {"name": "Z2", "states": 2, "alpha": 0.3, "parents": ["Z1"], "mode": "slow"},
        {"name": "X", "states": 3, "alpha": 0.3, "parents": ["Z1", "Z2"], "observed": True},
    ],
    "dead": [
        {"name": "Z1", "states": 3, "alpha": 0.3, "mode": "dead", "c": 2},
        {"name": "Z2", "states": 2, "alpha": 0.3, "parents": ["Z1"], "mode": "dead"},
        {"name": "X", "states": 3, "alpha": 0.3, "parents": ["Z2"], "observed": True},
    ],
    "observed_without_parents": [
        {"name": "Z1", "states": 2, "alpha": 0.5},
        {"name": "X", "states": 3, "alpha": 0.5, "observed": True},
    ],
    "no_latents": [
        {"name": "X", "states": 4, "alpha": 0.5, "observed": True},
    ],
}

TRANSITION_GRAPHS: dict[str, list[dict]] = {
    "observed_transition": [
        {"name": "Z1", "states": 3, "alpha": 0.5},
        {
            "name": "X",
            "states": 3,
            "alpha": 0.5,
            "parents": ["Z1"],
            "observed": True,
            "mode": "transition",
        },
    ],
    "latent_transition": [
        {"name": "Z1", "states": 2, "alpha": 0.5, "mode": "transition"},
        {"name": "Z2", "states": 2, "alpha": 0.5, "parents": ["Z1"], "mode": "transition"},
        {"name": "X", "states": 3, "alpha": 0.5, "parents": ["Z2", "Z1"], "observed": True},
    ],
}

SEQ_LEN = 5


def _graph(nodes: list[dict]) -> GraphSpec:
    return parse_graph({"nodes": nodes})


def _step_probability(
    graph: GraphSpec,
    tables: Mapping[str, np.ndarray],
    previous: dict[str, int],
    current: dict[str, int],
    token: int,
) -> float:
    """p(z_t = current, x_t = token | z_{t-1} = previous), read off each node's table."""
    probability = 1.0
    for node in graph.latents:
        index = (previous[node.name], *(current[p] for p in node.parents), current[node.name])
        probability *= tables[node.name][index]
    observed = graph.observed
    probability *= tables[observed.name][(*(current[p] for p in observed.parents), token)]
    return probability


def brute_force_nats(
    graph: GraphSpec, tables: Mapping[str, np.ndarray], tokens: np.ndarray
) -> np.ndarray:
    """-log p(x_t | x_<t) of one sequence by summing over every latent path."""
    names = [node.name for node in graph.latents]
    joint_states = [
        dict(zip(names, states, strict=True))
        for states in itertools.product(*(range(node.states) for node in graph.latents))
    ]
    start = dict.fromkeys(names, 0)
    prefix = [1.0]  # p(x_1 .. x_t), t = 0 .. T-1
    for t in range(1, len(tokens)):
        total = 0.0
        for path in itertools.product(joint_states, repeat=t):
            probability, previous = 1.0, start
            for step, current in enumerate(path, start=1):
                probability *= _step_probability(graph, tables, previous, current, tokens[step])
                previous = current
            total += probability
        prefix.append(total)
    return -np.diff(np.log(prefix))


def _sequences(graph: GraphSpec, conditionals: dict, n_sampled: int, seed: int) -> np.ndarray:
    """Sampled sequences plus arbitrary ones (unlikely tokens exercise tiny probabilities)."""
    sampler = BlockSampler(graph, conditionals, SEQ_LEN, seed, block_size=n_sampled)
    sampled = sampler.block(2, 0).tokens.astype(np.int64)
    rng = np.random.default_rng(seed)
    arbitrary = rng.integers(0, graph.vocab_size, size=(3, SEQ_LEN))
    arbitrary[:, 0] = 0
    return np.concatenate([sampled, arbitrary])


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_forward_matches_brute_force_enumeration(name: str) -> None:
    graph = _graph(GRAPHS[name])
    conditionals = draw_kernels(graph, seed=3)
    tokens = _sequences(graph, conditionals, n_sampled=3, seed=11)
    nats = sequence_entropy(graph, conditionals, tokens)
    expected = np.stack([brute_force_nats(graph, conditionals, row) for row in tokens])
    np.testing.assert_allclose(nats, expected, rtol=0, atol=1e-9)


def test_chunking_and_batch_size_do_not_change_values() -> None:
    graph = _graph(GRAPHS["two_parents_product"])
    conditionals = draw_kernels(graph, seed=5)
    tokens = _sequences(graph, conditionals, n_sampled=17, seed=2)
    whole = sequence_entropy(graph, conditionals, tokens)
    one_by_one = sequence_entropy(graph, conditionals, tokens, batch_size=1)
    np.testing.assert_allclose(one_by_one, whole, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["chain", "observed_two_parents", "dead"])
def test_probabilities_of_all_token_sequences_sum_to_one(name: str) -> None:
    graph = _graph(GRAPHS[name])
    conditionals = draw_kernels(graph, seed=1)
    length = 4
    tails = np.array(list(itertools.product(range(graph.vocab_size), repeat=length - 1)))
    tokens = np.concatenate([np.zeros((len(tails), 1), dtype=np.int64), tails], axis=1)
    nats = sequence_entropy(graph, conditionals, tokens)
    assert math.isclose(np.exp(-nats.sum(axis=1)).sum(), 1.0, rel_tol=1e-12)


def test_mean_over_sampled_sequences_matches_the_entropy_by_enumeration() -> None:
    """The sampler and the forward algorithm agree on the model (start state, parent order)."""
    graph = _graph(GRAPHS["observed_two_parents"])
    conditionals = draw_kernels(graph, seed=8)
    length = 4
    tails = np.array(list(itertools.product(range(graph.vocab_size), repeat=length - 1)))
    every = np.concatenate([np.zeros((len(tails), 1), dtype=np.int64), tails], axis=1)
    log_p = -sequence_entropy(graph, conditionals, every).sum(axis=1)
    exact = float(-(np.exp(log_p) * log_p).sum() / (length - 1))
    sampled = BlockSampler(graph, conditionals, length, seed=4, block_size=8192).block(1, 0).tokens
    per_sequence = sequence_entropy(graph, conditionals, sampled).mean(axis=1)
    stderr = per_sequence.std(ddof=1) / math.sqrt(len(per_sequence))
    assert abs(per_sequence.mean() - exact) < 4 * stderr


@pytest.mark.parametrize("name", sorted(TRANSITION_GRAPHS))
def test_per_sequence_kernels_match_brute_force_under_each_sequences_own_kernel(
    name: str,
) -> None:
    graph = _graph(TRANSITION_GRAPHS[name])
    conditionals = draw_kernels(graph, seed=2)
    sampler = BlockSampler(graph, conditionals, SEQ_LEN, seed=9, block_size=4)
    tokens = sampler.block(1, 0).tokens
    kernels = sampler.transition_kernels(1, 0)
    nats = sequence_entropy(graph, conditionals, tokens, transition_kernels=kernels)
    for row in range(len(tokens)):
        own = dict(conditionals) | {node: table[row] for node, table in kernels.items()}
        np.testing.assert_allclose(
            nats[row], brute_force_nats(graph, own, tokens[row]), rtol=0, atol=1e-9
        )


def _polya_log_probability(counts: dict[int, np.ndarray], alpha: float) -> float:
    """log of E[prod_rows prod_x theta_row,x^count] under i.i.d. symmetric Dirichlet rows."""
    total = 0.0
    for row_counts in counts.values():
        size = row_counts.size
        total += math.lgamma(size * alpha) - math.lgamma(size * alpha + row_counts.sum())
        total += sum(math.lgamma(alpha + c) - math.lgamma(alpha) for c in row_counts)
    return total


def test_bayes_estimate_matches_the_dirichlet_multinomial_integral() -> None:
    """With X's kernel unknown, p(x_1..t) integrates the kernel out (Polya urn per row)."""
    nodes = TRANSITION_GRAPHS["observed_transition"]
    alpha = 1.0
    graph = _graph([{**node, "alpha": alpha} for node in nodes])
    conditionals = draw_kernels(graph, seed=4)
    tokens = np.array([[0, 2, 2, 1]])
    latent = conditionals["Z1"]
    prefix = [0.0]
    for t in range(1, tokens.shape[1]):
        total = 0.0
        for path in itertools.product(range(3), repeat=t):
            states = (0, *path)
            log_path = sum(math.log(latent[states[s - 1], states[s]]) for s in range(1, t + 1))
            counts: dict[int, np.ndarray] = {}
            for s in range(1, t + 1):
                counts.setdefault(states[s], np.zeros(3))[tokens[0, s]] += 1
            total += math.exp(log_path + _polya_log_probability(counts, alpha))
        prefix.append(math.log(total))
    exact = -np.diff(prefix)
    estimate = bayes_transition_entropy(graph, conditionals, tokens, n_kernels=20000, seed=0)
    np.testing.assert_allclose(estimate.nats[0], exact, atol=0.03)
    assert math.isclose(exact[0], math.log(3), rel_tol=1e-6)  # the prior mean row is uniform
    assert np.all(estimate.effective_draws > 1000)


def test_known_kernel_loss_is_below_the_bayes_loss_on_average() -> None:
    graph = _graph(TRANSITION_GRAPHS["observed_transition"])
    conditionals = draw_kernels(graph, seed=4)
    sampler = BlockSampler(graph, conditionals, 8, seed=1, block_size=64)
    tokens = sampler.block(1, 0).tokens
    known = sequence_entropy(
        graph, conditionals, tokens, transition_kernels=sampler.transition_kernels(1, 0)
    )
    bayes = bayes_transition_entropy(graph, conditionals, tokens, n_kernels=2000, seed=3)
    assert known.mean() < bayes.nats.mean()


def test_transition_graph_without_kernels_is_a_user_error() -> None:
    graph = _graph(TRANSITION_GRAPHS["observed_transition"])
    conditionals = draw_kernels(graph, seed=0)
    with pytest.raises(GssmDataError, match="transition_kernels"):
        sequence_entropy(graph, conditionals, np.zeros((2, 4), dtype=np.int64))


def test_bad_tokens_are_user_errors() -> None:
    graph = _graph(GRAPHS["chain"])
    conditionals = draw_kernels(graph, seed=0)
    with pytest.raises(GssmDataError, match="start token"):
        sequence_entropy(graph, conditionals, np.ones((1, 4), dtype=np.int64))
    with pytest.raises(GssmDataError, match="vocabulary"):
        sequence_entropy(graph, conditionals, np.array([[0, 3, 1]]))
    with pytest.raises(GssmDataError, match="2-D"):
        sequence_entropy(graph, conditionals, np.zeros(4, dtype=np.int64))


def test_missing_cuda_is_a_user_error_not_a_crash() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    graph = _graph(GRAPHS["chain"])
    with pytest.raises(GssmDataError, match="CUDA"):
        sequence_entropy(
            graph, draw_kernels(graph, 0), np.zeros((1, 3), dtype=np.int64), device="cuda"
        )


def test_single_position_sequences_have_no_predicted_tokens() -> None:
    graph = _graph(GRAPHS["chain"])
    nats = sequence_entropy(graph, draw_kernels(graph, 0), np.zeros((3, 1), dtype=np.int64))
    assert nats.shape == (3, 0)


def test_entropy_stats_label_transition_figures_as_monte_carlo() -> None:
    per_token = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    exact = entropy_stats(per_token, transition=False)
    assert exact.method == "exact"
    assert exact.nats_per_token == 2.0
    assert exact.per_position == [2.0, 2.0, 2.0]
    assert exact.stderr == 0.0
    estimate = entropy_stats(per_token, transition=True)
    assert estimate.method == "monte-carlo"
    assert estimate.note == TRANSITION_NOTE


def test_baselines_count_predicted_positions_with_independent_compressors() -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 5, size=(64, 33)).astype(np.uint8)
    tokens[:, 0] = 0
    result = baselines(tokens, vocab_size=5)
    predicted = tokens[:, 1:]
    counts = np.bincount(predicted.ravel(), minlength=5) / predicted.size
    assert math.isclose(result.unigram_bits, float(-(counts * np.log2(counts)).sum()))
    # Sizes within a few header bytes of one-shot compression of the same bytes.
    data = np.ascontiguousarray(predicted).tobytes()
    one_shot_zstd = len(zstandard.ZstdCompressor(level=19).compress(data)) * 8 / predicted.size
    one_shot_gzip = len(gzip.compress(data, compresslevel=9)) * 8 / predicted.size
    assert abs(result.zstd_bits - one_shot_zstd) < 64 / predicted.size
    assert abs(result.gzip_bits - one_shot_gzip) < 64 / predicted.size
    # Uniform tokens over 5 symbols: every figure is near log2(5), none below the entropy.
    assert result.unigram_bits <= math.log2(5) + 1e-12
    assert result.zstd_bits > 0.95 * math.log2(5)


# --------------------------------------------------------------------------
# Stores: measure_split, the per-token array, the `entropy` command
# --------------------------------------------------------------------------

BLOCK = 64
STORE_SEQ_LEN = 12


def _store(tmp_path: Path, graph: GraphSpec, name: str = "tiny") -> Path:
    """A store of a few small blocks (several blocks per split, the last one short)."""
    out = tmp_path / f"{name}.zarr"
    options = GenerateOptions(
        graph=graph,
        name=name,
        out=out,
        n_train=2 * BLOCK + 5,
        n_test=BLOCK + 7,
        seq_len=STORE_SEQ_LEN,
        seed=5,
        workers=1,
        block_size=BLOCK,
    )
    generate(options)
    return out


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _store(tmp_path_factory.mktemp("store"), _graph(GRAPHS["observed_two_parents"]))


@pytest.fixture(scope="module")
def transition_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    graph = _graph(TRANSITION_GRAPHS["latent_transition"])
    return _store(tmp_path_factory.mktemp("store"), graph, "transition")


def test_measure_split_is_the_mean_of_sequence_entropy_over_the_stored_tokens(
    tiny_store: Path,
) -> None:
    store = open_store(tiny_store)
    tokens = np.asarray(store.tokens("test")[...])
    nats = sequence_entropy(store.graph, store.conditionals(), tokens)
    stats, split_baselines = measure_split(store, "test", quiet=True, device="cpu")
    assert stats.method == "exact"
    assert stats.n_sequences == len(tokens)
    assert math.isclose(stats.nats_per_token, nats.mean(), rel_tol=1e-12)
    assert math.isclose(stats.bits_per_token, nats.mean() / math.log(2), rel_tol=1e-12)
    expected_stderr = nats.mean(axis=1).std(ddof=1) / math.sqrt(len(tokens))
    assert math.isclose(stats.stderr, expected_stderr, rel_tol=1e-9)
    np.testing.assert_allclose(stats.per_position, nats.mean(axis=0), rtol=1e-12)
    assert split_baselines == baselines(tokens, vocab_size=store.graph.vocab_size)
    # What generate recorded in the manifest is the same computation (the split is
    # smaller than the least count a target standard error measures: all of it).
    recorded = store.entropy("test")
    assert recorded is not None and recorded.target_stderr_bits == DEFAULT_ENTROPY_STDERR_BITS
    assert recorded == stats.model_copy(update={"target_stderr_bits": recorded.target_stderr_bits})


def test_max_sequences_measures_a_prefix_across_blocks(tiny_store: Path) -> None:
    store = open_store(tiny_store)
    n = BLOCK + 9  # spans two blocks
    tokens = np.asarray(store.tokens("train")[:n])
    stats, _ = measure_split(store, "train", max_sequences=n, quiet=True, device="cpu")
    nats = sequence_entropy(store.graph, store.conditionals(), tokens)
    assert stats.n_sequences == n
    assert math.isclose(stats.nats_per_token, nats.mean(), rel_tol=1e-12)


def test_rows_entropy_of_a_transition_store_uses_each_sequences_own_kernel(
    transition_store: Path,
) -> None:
    store = open_store(transition_store)
    sampler = store.sampler()
    start, stop = BLOCK - 3, BLOCK + 4  # the end of block 0 and the start of block 1
    kernels = {
        name: np.concatenate(
            [
                sampler.transition_kernels(STREAMS["test"], 0)[name][start:],
                sampler.transition_kernels(STREAMS["test"], 1)[name][: stop - BLOCK],
            ]
        )
        for name in ("Z1", "Z2")
    }
    tokens = np.asarray(store.tokens("test")[start:stop])
    expected = sequence_entropy(
        store.graph, store.conditionals(), tokens, transition_kernels=kernels
    )
    np.testing.assert_allclose(rows_entropy(store, "test", start, stop), expected, atol=1e-12)
    stats = store.entropy("test")
    assert stats is not None and stats.method == "monte-carlo" and stats.note == TRANSITION_NOTE


def test_write_split_entropy_stores_float32_values_chunked_like_the_tokens(
    tmp_path: Path,
) -> None:
    path = _store(tmp_path, _graph(GRAPHS["chain"]))
    store = open_store(path, mode="r+")
    stats, _ = write_split_entropy(store, "train", quiet=True, device="cpu")
    reopened = open_store(path)
    array = reopened.per_token_entropy("train")
    assert array is not None
    assert array.shape == (2 * BLOCK + 5, STORE_SEQ_LEN - 1)
    assert array.chunks == (BLOCK, STORE_SEQ_LEN - 1)
    assert array.dtype == np.float32
    assert array.attrs["complete"] is True
    expected = rows_entropy(reopened, "train", device="cpu").astype(np.float32)
    np.testing.assert_array_equal(array[...], expected)
    # The manifest now holds the whole train split's figure.
    assert reopened.entropy("train") == stats
    assert stats.n_sequences == 2 * BLOCK + 5


def test_write_split_entropy_needs_a_writable_store(tiny_store: Path) -> None:
    with pytest.raises(GssmDataError, match="r\\+"):
        write_split_entropy(open_store(tiny_store), "test", quiet=True)


def test_tokens_entropy_scores_arbitrary_sequences_under_the_stores_graph(
    tiny_store: Path,
) -> None:
    store = open_store(tiny_store)
    tokens = np.array([[0, 1, 2, 2, 0], [0, 0, 0, 0, 0]])
    expected = np.stack(
        [brute_force_nats(store.graph, store.conditionals(), row) for row in tokens]
    )
    np.testing.assert_allclose(tokens_entropy(store, tokens, device="cpu"), expected, atol=1e-9)


def test_entropy_command_prints_json_with_the_figures_and_baselines(tiny_store: Path) -> None:
    result = CliRunner().invoke(app, ["entropy", str(tiny_store), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    stats = open_store(tiny_store).entropy("test")
    assert stats is not None
    assert data["method"] == "exact"
    assert math.isclose(data["nats_per_token"], stats.nats_per_token, rel_tol=1e-12)
    assert math.isclose(data["bits_per_token"], stats.bits_per_token, rel_tol=1e-12)
    assert math.isclose(data["stderr"], stats.stderr, rel_tol=1e-12)
    assert data["n_sequences"] == BLOCK + 7
    assert {"unigram_bits", "zstd_bits", "gzip_bits"} <= data.keys()
    assert len(data["per_position"]) == STORE_SEQ_LEN - 1


def test_entropy_command_table_shows_exact_and_all_baselines(tiny_store: Path) -> None:
    result = CliRunner().invoke(app, ["entropy", str(tiny_store), "--max-sequences", "10"])
    assert result.exit_code == 0, result.output
    for label in ("exact", "unigram", "zstd", "gzip", "10 sequences"):
        assert label in result.output


def test_entropy_command_write_and_max_sequences_together_is_a_one_line_error(
    tiny_store: Path,
) -> None:
    result = CliRunner().invoke(
        app, ["entropy", str(tiny_store), "--write", "--max-sequences", "3"]
    )
    assert result.exit_code == 1
    assert "drop --max-sequences" in result.output
    assert "Traceback" not in result.output


def test_entropy_command_unknown_split_is_a_one_line_error(tiny_store: Path) -> None:
    result = CliRunner().invoke(app, ["entropy", str(tiny_store), "--split", "valid"])
    assert result.exit_code == 1
    assert "no split 'valid'" in result.output


def test_entropy_command_rejects_zero_threads_and_unknown_devices(tiny_store: Path) -> None:
    threads = CliRunner().invoke(app, ["entropy", str(tiny_store), "--threads", "0"])
    assert threads.exit_code == 1 and "--threads" in threads.output
    device = CliRunner().invoke(app, ["entropy", str(tiny_store), "--device", "tpu"])
    assert device.exit_code == 1 and "--device" in device.output


@pytest.fixture(scope="module")
def larger_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store whose splits hold more than the least count a standard error target measures."""
    out = tmp_path_factory.mktemp("store") / "larger.zarr"
    options = GenerateOptions(
        graph=_graph(GRAPHS["observed_two_parents"]),
        name="larger",
        out=out,
        n_train=900,
        n_test=700,
        seq_len=STORE_SEQ_LEN,
        seed=3,
        workers=1,
        block_size=BLOCK,
        entropy_stderr_bits=0.004,
    )
    generate(options)
    return out


def _first_precise_count(sequence_bits: list[float], stderr_bits: float, least: int) -> int:
    """The first n >= least whose first-n mean has a standard error <= stderr_bits (statistics)."""
    for n in range(max(least, 2), len(sequence_bits) + 1):
        if statistics.stdev(sequence_bits[:n]) / math.sqrt(n) <= stderr_bits:
            return n
    return len(sequence_bits)


def test_a_target_standard_error_measures_the_first_sequences_that_reach_it(
    larger_store: Path,
) -> None:
    store = open_store(larger_store)
    tokens = np.asarray(store.tokens("test")[...])
    nats = sequence_entropy(store.graph, store.conditionals(), tokens)
    bits = (nats.mean(axis=1) / math.log(2)).tolist()
    # A target reached between 256 sequences and the whole split.
    target = statistics.stdev(bits[:450]) / math.sqrt(450) * (1 + 1e-6)  # no tie at 450
    expected = _first_precise_count(bits, target, MIN_MEASURED_SEQUENCES)
    assert MIN_MEASURED_SEQUENCES < expected < len(bits)
    stats, split_baselines = measure_split(
        store, "test", stderr_bits=target, quiet=True, device="cpu"
    )
    assert stats.n_sequences == expected and stats.target_stderr_bits == target
    assert stats.stderr_bits <= target
    assert math.isclose(stats.bits_per_token, math.fsum(bits[:expected]) / expected, rel_tol=1e-12)
    np.testing.assert_allclose(stats.per_position, nats[:expected].mean(axis=0), rtol=1e-12)
    assert split_baselines == baselines(tokens[:expected], vocab_size=store.graph.vocab_size)


def test_generate_records_each_splits_standard_error_and_count(larger_store: Path) -> None:
    store = open_store(larger_store)
    for split, target in (("test", 0.004), ("train", 0.04)):
        stats = store.entropy(split)
        assert stats is not None and stats.target_stderr_bits == target
        tokens = np.asarray(store.tokens(split)[...])
        nats = sequence_entropy(store.graph, store.conditionals(), tokens)
        bits = (nats.mean(axis=1) / math.log(2)).tolist()
        assert stats.n_sequences == _first_precise_count(bits, target, MIN_MEASURED_SEQUENCES)
    # The train split's check is coarser: fewer sequences than the test split's figure.
    assert store.entropy("train").n_sequences < store.entropy("test").n_sequences


def test_a_manifest_written_before_targets_is_still_read() -> None:
    old = {
        "method": "exact",
        "nats_per_token": 1.0,
        "bits_per_token": 1 / math.log(2),
        "stderr": 0.01,
        "n_sequences": 4096,
        "per_position": [1.0],
    }
    stats = EntropyStats.model_validate(old)
    assert stats.target_stderr_bits is None and stats.n_sequences == 4096
