"""The filtered posterior against brute-force enumeration, and its store command.

The brute force sums the probability of every latent path, reading each node's
table directly: nothing is shared with the forward algorithm of the package.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from gssm_data.cli import app
from gssm_data.errors import GssmDataError
from gssm_data.generate import GenerateOptions, generate
from gssm_data.graph import GraphSpec, parse_graph
from gssm_data.kernels import draw_kernels
from gssm_data.posterior import (
    filtered_posterior,
    read_posterior,
    split_posterior,
    write_split_posterior,
)
from gssm_data.sampler import BlockSampler
from gssm_data.store import open_store

# Three latents with two parents on Z3 (2 x 2 x 3 = 12 joint states), X reads two of them.
TINY = [
    {"name": "Z1", "states": 2, "alpha": 0.6},
    {"name": "Z2", "states": 2, "alpha": 0.6, "parents": ["Z1"]},
    {"name": "Z3", "states": 3, "alpha": 0.6, "parents": ["Z2", "Z1"], "kernel": "fullrank"},
    {"name": "X", "states": 3, "alpha": 0.6, "parents": ["Z3", "Z1"], "observed": True},
]
SEQ_LEN = 4  # 12^3 latent paths per sequence for the brute force


def _graph(nodes: list[dict]) -> GraphSpec:
    return parse_graph({"nodes": nodes})


def brute_force_joint(
    graph: GraphSpec, tables: Mapping[str, np.ndarray], tokens: np.ndarray
) -> np.ndarray:
    """p(z_t = s | x_<=t) (T, S) of one sequence: every latent path of length t, summed."""
    names = [node.name for node in graph.latents]
    states = list(itertools.product(*(range(node.states) for node in graph.latents)))
    result = np.zeros((len(tokens), len(states)))
    result[0, 0] = 1.0

    def step(previous: tuple[int, ...], current: tuple[int, ...], token: int) -> float:
        was, now = dict(zip(names, previous, strict=True)), dict(zip(names, current, strict=True))
        probability = 1.0
        for node in graph.latents:
            index = (was[node.name], *(now[p] for p in node.parents), now[node.name])
            probability *= tables[node.name][index]
        observed = graph.observed
        return probability * tables[observed.name][(*(now[p] for p in observed.parents), token)]

    for t in range(1, len(tokens)):
        for path in itertools.product(range(len(states)), repeat=t):
            probability, previous = 1.0, states[0]
            for position, index in enumerate(path, start=1):
                probability *= step(previous, states[index], tokens[position])
                previous = states[index]
            result[t, path[-1]] += probability
        result[t] /= result[t].sum()
    return result


def _tokens(graph: GraphSpec, conditionals: dict, seed: int) -> np.ndarray:
    """Sampled sequences plus an arbitrary (unlikely) one."""
    sampled = BlockSampler(graph, conditionals, SEQ_LEN, seed, block_size=3).block(2, 0).tokens
    arbitrary = np.random.default_rng(seed).integers(0, graph.vocab_size, size=(1, SEQ_LEN))
    arbitrary[:, 0] = 0
    return np.concatenate([sampled.astype(np.int64), arbitrary])


def test_posterior_matches_brute_force_enumeration() -> None:
    graph = _graph(TINY)
    conditionals = draw_kernels(graph, seed=4)
    tokens = _tokens(graph, conditionals, seed=9)
    posterior = filtered_posterior(graph, conditionals, tokens, joint=True)
    expected = np.stack([brute_force_joint(graph, conditionals, row) for row in tokens])
    assert posterior.joint is not None
    np.testing.assert_allclose(posterior.joint, expected, rtol=0, atol=1e-12)
    cube = expected.reshape(*expected.shape[:2], 2, 2, 3)
    for axis, name in enumerate(["Z1", "Z2", "Z3"]):
        others = tuple(2 + i for i in range(3) if i != axis)
        np.testing.assert_allclose(
            posterior.marginals[name], cube.sum(axis=others), rtol=0, atol=1e-12
        )


def test_posteriors_sum_to_one_and_chunking_does_not_change_them() -> None:
    graph = _graph(TINY)
    conditionals = draw_kernels(graph, seed=1)
    sampler = BlockSampler(graph, conditionals, 40, seed=2, block_size=33)
    tokens = sampler.block(2, 0).tokens
    whole = filtered_posterior(graph, conditionals, tokens, joint=True)
    one_by_one = filtered_posterior(graph, conditionals, tokens, nodes=["Z3"], batch_size=1)
    for marginal in whole.marginals.values():
        np.testing.assert_allclose(marginal.sum(axis=-1), 1.0, rtol=0, atol=1e-12)
        assert marginal.min() >= 0
    assert whole.joint is not None
    np.testing.assert_allclose(whole.joint.sum(axis=-1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(one_by_one.marginals["Z3"], whole.marginals["Z3"], atol=1e-14)
    assert list(one_by_one.marginals) == ["Z3"]


def test_entropy_path_is_unchanged_by_the_posterior_callback() -> None:
    """p(x_t | x_<t) from the posterior's predictive equals the entropy module's."""
    from gssm_data.entropy import sequence_entropy

    graph = _graph(TINY)
    conditionals = draw_kernels(graph, seed=6)
    tokens = _tokens(graph, conditionals, seed=3)
    posterior = filtered_posterior(graph, conditionals, tokens, joint=True)
    assert posterior.joint is not None
    emission = conditionals["X"]  # (Z3, Z1, X)
    states = list(itertools.product(range(2), range(2), range(3)))
    nats = sequence_entropy(graph, conditionals, tokens)
    # Filtering one step by hand: predict with the transition, weigh with the emission.
    for b, row in enumerate(tokens):
        for t in range(1, len(row)):
            predicted = np.zeros(len(states))
            for i, previous in enumerate(states):
                for j, current in enumerate(states):
                    z1, z2, z3 = current
                    predicted[j] += (
                        posterior.joint[b, t - 1, i]
                        * conditionals["Z1"][previous[0], z1]
                        * conditionals["Z2"][previous[1], z1, z2]
                        * conditionals["Z3"][previous[2], z2, z1, z3]
                    )
            likelihood = np.array([emission[z3, z1, row[t]] for z1, _, z3 in states])
            assert np.isclose(-np.log(predicted @ likelihood), nats[b, t - 1], atol=1e-10)


@pytest.mark.parametrize(
    ("nodes", "joint", "message"),
    [
        (["Z9"], False, "'Z9' is not a latent node"),
        (["X"], False, "'X' is not a latent node"),
        (None, True, "too many to store its posterior"),
    ],
)
def test_bad_requests_are_one_line_errors(nodes: list[str] | None, joint: bool, message: str):
    graph = _graph(
        [
            {"name": "Z1", "states": 40, "alpha": 0.5},
            {"name": "Z2", "states": 40, "alpha": 0.5, "parents": ["Z1"]},
            {"name": "X", "states": 3, "alpha": 0.5, "parents": ["Z2"], "observed": True},
        ]
    )
    conditionals = draw_kernels(graph, seed=0)
    with pytest.raises(GssmDataError, match=message) as error:
        filtered_posterior(graph, conditionals, np.zeros((1, 3), int), nodes=nodes, joint=joint)
    assert "\n" not in str(error.value)


def test_transition_graphs_are_refused() -> None:
    graph = _graph(
        [
            {"name": "Z1", "states": 2, "alpha": 0.5, "mode": "transition"},
            {"name": "X", "states": 3, "alpha": 0.5, "parents": ["Z1"], "observed": True},
        ]
    )
    with pytest.raises(GssmDataError, match="`transition` graph is not supported"):
        filtered_posterior(graph, {}, np.zeros((1, 3), int))


# --- the store command ---------------------------------------------------------------


@pytest.fixture()
def store_path(tmp_path: Path) -> Path:
    out = tmp_path / "tiny.zarr"
    generate(
        GenerateOptions(
            graph=_graph(TINY),
            name="tiny",
            out=out,
            n_train=8,
            n_test=21,
            seq_len=12,
            block_size=8,
            workers=1,
        )
    )
    return out


def _invoke(*arguments: str) -> object:
    return CliRunner().invoke(app, ["posterior", *arguments, "--device", "cpu"])


def test_cli_writes_the_posterior_and_a_rerun_is_a_no_op(store_path: Path) -> None:
    result = _invoke(str(store_path), "--split", "test", "--rows", "13", "--joint")
    assert result.exit_code == 0, result.output
    store = open_store(store_path)
    marginal = read_posterior(store, "test", "Z3")
    assert marginal.shape == (13, 12, 3)
    assert marginal.metadata.dimension_names == ("sequence", "position", "state")
    expected = split_posterior(store, "test", 0, 13, joint=True, device="cpu")
    np.testing.assert_allclose(marginal[...], expected.marginals["Z3"], atol=1e-7)
    joint = read_posterior(store, "test")
    assert joint.shape == (13, 12, 12)
    np.testing.assert_allclose(joint[...], expected.joint, atol=1e-7)
    assert not (store_path / "test" / "_posterior.partial").exists()

    chunk = next((store_path / "test" / "posterior" / "marginal" / "Z3" / "c").rglob("*"))
    before = chunk.stat().st_mtime_ns
    again = _invoke(str(store_path), "--split", "test", "--rows", "13")
    assert again.exit_code == 0, again.output
    assert "already holds" in again.output
    assert chunk.stat().st_mtime_ns == before
    # The store's own arrays are untouched: it still verifies.
    assert CliRunner().invoke(app, ["verify", str(store_path)]).exit_code == 0


def test_an_interrupted_write_leaves_no_posterior(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gssm_data.posterior as module

    calls = {"n": 0}
    real = module.filtered_posterior

    def failing(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "_chunk_rows", lambda store, states: 4)
    monkeypatch.setattr(module, "filtered_posterior", failing)
    store = open_store(store_path)
    with pytest.raises(KeyboardInterrupt):
        write_split_posterior(store, "test", quiet=True, device="cpu")
    assert not (store_path / "test" / "posterior").exists()
    with pytest.raises(GssmDataError, match="no posterior of the test split"):
        read_posterior(store, "test", "Z1")
    monkeypatch.setattr(module, "filtered_posterior", real)
    written = write_split_posterior(store, "test", quiet=True, device="cpu")
    assert written.status == "written" and written.rows == 21
    assert not np.isnan(read_posterior(store, "test", "Z1")[...]).any()


def test_cli_errors_are_one_line(store_path: Path) -> None:
    too_many = _invoke(str(store_path), "--rows", "99")
    assert too_many.exit_code == 1
    assert "the test split has 21 sequences" in too_many.output
    shutil.rmtree(store_path / "graph" / "Z2")
    # zarr caches nothing across opens: the command sees the missing table.
    missing = _invoke(str(store_path))
    assert missing.exit_code == 1
    assert "lacks the graph tables" in missing.output
    assert len(missing.output.strip().splitlines()) == 1
    assert not (store_path / "test" / "posterior").exists()
    assert zarr.open_group(store_path, mode="r")  # still a group
