"""Effective conditional tables: distributions, mode guarantees, product of experts, seeds."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from gssm_data.errors import GssmDataError
from gssm_data.graph import GraphSpec, parse_graph
from gssm_data.kernels import (
    MIN_PROBABILITY,
    _dirichlet_rows,
    apply_mode,
    check_seed,
    draw_conditional,
    draw_kernels,
    floor_rows,
    kernel_rng,
    open_uniforms,
    seed_sequence,
    smooth_dirichlet_rows,
)
from gssm_data.presets import load_preset, preset_names


def reference_floor(table: np.ndarray) -> np.ndarray:
    """Normalise, then mix in the uniform floor (written out independently of the package)."""
    n = table.shape[-1]
    table = table / table.sum(axis=-1, keepdims=True)
    return table * (1 - n * 1e-10) + 1e-10


def reference_rows(rng: np.random.Generator, alpha: float, n_states: int, n_rows: int):
    """Rows of the gamma-inverse-cdf draw, written out with scipy.stats (not the package):
    two uniforms per entry, Gamma(alpha + 1) quantile times v^(1/alpha), normalised."""
    u, v = rng.random((2, n_rows, n_states)) + 0.5 / 2**53
    gamma = stats.gamma(alpha + 1.0).ppf(u) * v ** (1.0 / alpha)
    return gamma / gamma.sum(axis=1, keepdims=True)


def target_is_strict_argmax(table: np.ndarray, targets: np.ndarray) -> bool:
    """Whether, in every row, the entry at `targets` beats every other entry."""
    rows = table.reshape(-1, table.shape[-1])
    targets = np.broadcast_to(targets, table.shape[:-1]).reshape(-1)
    index = np.arange(rows.shape[0])
    best = rows[index, targets].copy()
    others = rows.copy()
    others[index, targets] = -np.inf
    return bool((best > others.max(axis=1)).all())


def previous_state(graph: GraphSpec, name: str) -> np.ndarray:
    """For every input combination of a latent node, its previous self state (axis 0)."""
    shape = graph.input_sizes(name)
    return np.indices(shape)[0]


def with_dead_state(graph: GraphSpec, c_of: dict[str, int]) -> GraphSpec:
    data = graph.model_dump()
    for item in data["nodes"]:
        if not item["observed"]:
            item.update(mode="dead", c=c_of[item["name"]])
    return parse_graph(data)


SMALL_GRAPH = {
    "nodes": [
        {"name": "Z1", "states": 3, "alpha": 0.3},
        {"name": "Z2", "states": 4, "alpha": 0.3, "parents": ["Z1"]},
        {"name": "X", "states": 5, "alpha": 0.3, "parents": ["Z1", "Z2"], "observed": True},
    ]
}


@pytest.mark.parametrize("mode", ["default", "slow", "dead"])
@pytest.mark.parametrize("preset", preset_names())
def test_effective_tables_are_distributions_with_no_entry_below_the_floor(
    preset: str, mode: str
) -> None:
    graph = load_preset(preset).with_mode(mode)
    kernels = draw_kernels(graph, seed=3)
    assert set(kernels) == {node.name for node in graph.nodes}
    for name, table in kernels.items():
        assert table.shape == graph.table_shape(name)
        assert table.dtype == np.float64
        assert np.isfinite(table).all()
        assert table.min() >= MIN_PROBABILITY
        np.testing.assert_allclose(table.sum(axis=-1), 1.0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("preset", preset_names())
def test_slow_makes_the_previous_state_the_unique_argmax_of_every_row(preset: str) -> None:
    graph = load_preset(preset).with_mode("slow")
    kernels = draw_kernels(graph, seed=5)
    for node in graph.latents:
        table = kernels[node.name]
        assert target_is_strict_argmax(table, previous_state(graph, node.name)), node.name


@pytest.mark.parametrize("preset", preset_names())
def test_dead_makes_c_the_unique_argmax_of_every_row(preset: str) -> None:
    base = load_preset(preset)
    for c_of in ({n.name: 0 for n in base.latents}, {n.name: n.states - 1 for n in base.latents}):
        graph = with_dead_state(base, c_of)
        kernels = draw_kernels(graph, seed=7)
        for node in graph.latents:
            assert target_is_strict_argmax(kernels[node.name], np.array(node.c)), node.name


def test_low_entropy_products_do_tie_and_the_tie_goes_to_the_target() -> None:
    # Two peaked experts multiply to two equal products; an argmax-based swap alone
    # would leave the first of the tied states on top.
    graph = load_preset("low_entropy")
    z3 = graph.node("Z3")
    raw = draw_conditional(graph, z3, kernel_rng(7, 2))
    rows = raw.reshape(-1, raw.shape[-1])
    assert ((rows == rows.max(axis=1, keepdims=True)).sum(axis=1) > 1).any()
    dead = with_dead_state(graph, {"Z1": 15, "Z2": 15, "Z3": 15})
    assert target_is_strict_argmax(draw_kernels(dead, seed=7)["Z3"], np.array(15))


def test_apply_mode_breaks_an_exact_tie_for_the_target() -> None:
    graph = parse_graph(
        {
            "nodes": [
                {"name": "Z", "states": 3, "alpha": 1.0, "mode": "dead", "c": 2},
                {"name": "X", "states": 2, "alpha": 1.0, "parents": ["Z"], "observed": True},
            ]
        }
    )
    table = np.array([[0.4, 0.4, 0.2], [0.2, 0.4, 0.4], [0.1, 0.45, 0.45]])
    dead = apply_mode(table, graph.node("Z"))
    assert (dead.argmax(axis=1) == 2).all()
    assert target_is_strict_argmax(dead, np.array(2))
    np.testing.assert_allclose(dead.sum(axis=1), 1.0, atol=1e-15)
    slow = apply_mode(table, graph.with_mode("slow").node("Z"))
    assert target_is_strict_argmax(slow, np.arange(3))


def test_product_of_experts_is_the_normalised_product_of_independent_experts() -> None:
    graph = parse_graph(SMALL_GRAPH)
    kernels = draw_kernels(graph, seed=11)
    alpha = 0.3
    # Z2: inputs (self 4, Z1 3); experts drawn in table-axis order.
    rng = kernel_rng(11, 1)
    self_expert = reference_floor(reference_rows(rng, alpha, 4, 4))
    z1_expert = reference_floor(reference_rows(rng, alpha, 4, 3))
    product = self_expert[:, None, :] * z1_expert[None, :, :]
    np.testing.assert_allclose(kernels["Z2"], reference_floor(product), rtol=1e-9, atol=0)
    # X: inputs (Z1 3, Z2 4), no self input.
    rng = kernel_rng(11, 2)
    z1_expert = reference_floor(reference_rows(rng, alpha, 5, 3))
    z2_expert = reference_floor(reference_rows(rng, alpha, 5, 4))
    product = z1_expert[:, None, :] * z2_expert[None, :, :]
    np.testing.assert_allclose(kernels["X"], reference_floor(product), rtol=1e-9, atol=0)


def test_fullrank_draws_one_independent_row_per_joint_input() -> None:
    data = {"nodes": [dict(item) for item in SMALL_GRAPH["nodes"]]}
    data["nodes"][2]["kernel"] = "fullrank"
    graph = parse_graph(data)
    table = draw_kernels(graph, seed=11)["X"]
    rows = reference_rows(kernel_rng(11, 2), 0.3, 5, 12)
    np.testing.assert_allclose(table, reference_floor(rows).reshape(3, 4, 5), rtol=1e-12)
    product = draw_kernels(parse_graph(SMALL_GRAPH), seed=11)["X"]
    assert table.shape == product.shape == (3, 4, 5)
    assert not np.allclose(table, product)


def test_a_single_input_node_draws_plain_dirichlet_rows() -> None:
    graph = parse_graph(SMALL_GRAPH)
    rows = reference_rows(kernel_rng(11, 0), 0.3, 3, 3)
    np.testing.assert_allclose(draw_kernels(graph, 11)["Z1"], reference_floor(rows), rtol=1e-12)


def test_kernels_are_reproducible_from_the_seed_and_differ_across_seeds() -> None:
    graph = load_preset("base")
    first, again, other = draw_kernels(graph, 1), draw_kernels(graph, 1), draw_kernels(graph, 2)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
        assert not np.allclose(first[name], other[name])


def test_a_table_depends_only_on_the_seed_and_its_node() -> None:
    graph = load_preset("base")
    changed = graph.with_alpha(0.9, target="observed")
    before, after = draw_kernels(graph, 4), draw_kernels(changed, 4)
    for node in graph.latents:
        np.testing.assert_array_equal(before[node.name], after[node.name])
    assert not np.allclose(before["X"], after["X"])


def test_transition_nodes_have_no_fixed_table() -> None:
    graph = load_preset("base").with_mode("transition")
    assert set(draw_kernels(graph, 0)) == {"X"}


def test_batched_draws_give_independent_tables_of_the_batch_shape() -> None:
    graph = load_preset("debug")
    node = graph.node("Z1")
    tables = draw_conditional(graph, node, np.random.default_rng(0), batch=(6,))
    assert tables.shape == (6, *graph.table_shape("Z1"))
    flat = tables.reshape(6, -1)
    assert len({row.tobytes() for row in flat}) == 6
    np.testing.assert_allclose(tables.sum(axis=-1), 1.0, atol=1e-12)


def test_floor_rows_keeps_each_rows_order_and_sum() -> None:
    table = np.array([[0.0, 0.5, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0], [1e-13, 2e-13, 1.0, 0.3]])
    floored = floor_rows(table)
    assert floored.min() >= MIN_PROBABILITY
    np.testing.assert_allclose(floored.sum(axis=1), 1.0, atol=1e-15)
    np.testing.assert_array_equal(np.argsort(floored, kind="stable"), np.argsort(table / 1.0))


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, "3", True])
def test_seeds_outside_the_64_bit_range_are_user_errors(seed: object) -> None:
    with pytest.raises(GssmDataError, match="seed must be"):
        check_seed(seed)  # type: ignore[arg-type]


def test_seed_words_are_fixed_width_so_distinct_tuples_give_distinct_streams() -> None:
    # numpy alone seeds [2**32 + 5, 2, 3] and [5, 1, 2, 3] identically.
    assert (
        np.random.SeedSequence([2**32 + 5, 2, 3]).generate_state(4).tolist()
        == np.random.SeedSequence([5, 1, 2, 3]).generate_state(4).tolist()
    )
    ours = seed_sequence(2**32 + 5, 2, 3).generate_state(4)
    assert ours.tolist() != seed_sequence(5, 1, 2, 3).generate_state(4).tolist()
    assert check_seed(2**64 - 1) == 2**64 - 1


def test_format_1_tables_are_still_drawn_by_numpy_dirichlet() -> None:
    graph = parse_graph(SMALL_GRAPH)
    rows = kernel_rng(11, 0).dirichlet(np.full(3, 0.3), size=3)
    old = draw_kernels(graph, 11, draw="numpy-dirichlet")["Z1"]
    np.testing.assert_allclose(old, reference_floor(rows), rtol=1e-12)


@pytest.mark.parametrize("alpha", [0.05, 1.0, 5.0])
def test_smooth_rows_are_dirichlet_distributed(alpha: float) -> None:
    """Each entry of a symmetric Dirichlet(alpha) row over K states is Beta(alpha, (K-1) alpha)."""
    n_states = 4
    rows = smooth_dirichlet_rows(np.random.default_rng(5).random((2, 20_000, n_states)), alpha)
    np.testing.assert_allclose(rows.sum(axis=1), 1.0, atol=1e-12)
    marginal = stats.beta(alpha, (n_states - 1) * alpha)
    assert stats.kstest(rows[:, 0], marginal.cdf).pvalue > 1e-3
    assert stats.kstest(rows[:, 0], stats.beta(2 * alpha, 3 * alpha).cdf).pvalue < 1e-6


def test_fixed_tables_move_continuously_with_alpha() -> None:
    """The same seed gives nearby tables for nearby alphas (numpy's sampler jumps)."""
    graph = load_preset("debug")

    def table(alpha: float, draw: str = "gamma-inverse-cdf") -> np.ndarray:
        return draw_kernels(graph.with_alpha(alpha, target="latent"), 0, draw=draw)["Z1"]

    def largest_step(draw: str) -> float:
        """Largest entry change when alpha grows by 1%, over 0.01 .. 1."""
        return max(
            np.abs(table(alpha * 1.01, draw) - table(alpha, draw)).max()
            for alpha in np.geomspace(0.01, 1.0, 30)
        )

    assert largest_step("gamma-inverse-cdf") < 0.03
    assert largest_step("numpy-dirichlet") > 0.3  # the test tells a jumpy draw from a smooth one


def test_tiny_alpha_gives_finite_one_hot_like_rows() -> None:
    rows = smooth_dirichlet_rows(np.random.default_rng(1).random((2, 1000, 8)) + 1e-17, 1e-4)
    assert np.isfinite(rows).all()
    np.testing.assert_allclose(rows.sum(axis=1), 1.0, atol=1e-12)
    assert (rows.max(axis=1) > 0.999).mean() > 0.99


class _EdgeUniforms:
    """A generator stand-in whose `random` returns the two ends numpy can produce:
    0.0 and 1 - 2^-53 (k / 2^53 for k = 0 and k = 2^53 - 1), alternating."""

    def random(self, shape: tuple[int, ...]) -> np.ndarray:
        edges = np.array([0.0, 1.0 - 2.0**-53])
        return np.resize(edges, shape)


def test_gamma_draw_keeps_uniforms_inside_the_open_interval_at_both_edges() -> None:
    # The top uniform plus half a step is a tie that rounds to exactly 1.0, whose
    # Gamma quantile is infinite: the row would be NaN.
    assert (1.0 - 2.0**-53) + 0.5 / 2**53 == 1.0
    assert np.isinf(stats.gamma(1.5).ppf(1.0))
    uniforms = open_uniforms(_EdgeUniforms(), (2, 3, 4))
    assert ((uniforms > 0.0) & (uniforms < 1.0)).all()
    rows = _dirichlet_rows(_EdgeUniforms(), 0.5, 4, (3,), draw="gamma-inverse-cdf")
    assert np.isfinite(rows).all()
    np.testing.assert_allclose(rows.sum(axis=-1), 1.0)
    # Every other uniform is unchanged: the same rows as the written-out reference.
    rng_a, rng_b = np.random.default_rng(11), np.random.default_rng(11)
    np.testing.assert_allclose(
        _dirichlet_rows(rng_a, 0.3, 6, (50,), draw="gamma-inverse-cdf"),
        reference_rows(rng_b, 0.3, 6, 50),
        rtol=1e-9,
    )


def test_importing_the_package_does_not_import_scipy() -> None:
    """Every store reader (each data-loader worker) imports gssm_data; only the kernel
    draw needs scipy."""
    code = (
        "import sys, gssm_data, gssm_data.cli.app, gssm_data.generate, gssm_data.scaling\n"
        "print(sorted(m for m in sys.modules if m == 'scipy' or m.startswith('scipy.')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"
