"""Graph specs: structure, every validation error and its message, YAML loading."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from gssm_data.errors import GssmDataError
from gssm_data.graph import (
    MAX_TABLE_ENTRIES,
    GraphSpec,
    NodeSpec,
    load_graph,
    parse_graph,
)


def node(name: str, states: int = 3, **fields: object) -> dict[str, object]:
    return {"name": name, "states": states, "alpha": 0.5, **fields}


def observed(name: str = "X", states: int = 5, **fields: object) -> dict[str, object]:
    return node(name, states, observed=True, **fields)


def spec(*nodes: dict[str, object]) -> dict[str, object]:
    return {"nodes": list(nodes)}


def invalid(data: object) -> str:
    """The one-line message of a spec that must be rejected."""
    with pytest.raises(GssmDataError) as caught:
        parse_graph(data)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_valid_graph_orders_parents_before_children() -> None:
    graph = parse_graph(
        spec(
            observed("X", parents=["Z3"]),
            node("Z3", parents=["Z1", "Z2"]),
            node("Z2", parents=["Z1"]),
            node("Z1"),
        )
    )
    order = [n.name for n in graph.order]
    assert order == ["Z1", "Z2", "Z3", "X"]
    assert [n.name for n in graph.latents] == ["Z1", "Z2", "Z3"]
    assert graph.observed.name == "X"
    assert graph.vocab_size == 5
    assert graph.joint_latent_states == 27


def test_input_sizes_put_self_first_then_parents_in_declared_order() -> None:
    graph = parse_graph(
        spec(node("A", 2), node("B", 3), node("C", 4, parents=["B", "A"]), observed(parents=["C"]))
    )
    assert graph.input_sizes("C") == (4, 3, 2)
    assert graph.table_shape("C") == (4, 3, 2, 4)
    assert graph.input_sizes("X") == (4,)  # the observed node has no self input
    assert graph.table_shape("X") == (4, 5)
    assert graph.input_sizes("A") == (2,)


def test_an_observed_node_without_parents_has_a_single_row() -> None:
    graph = parse_graph(spec(observed()))
    assert graph.table_shape("X") == (5,)
    assert graph.latents == ()
    assert graph.joint_latent_states == 1


@pytest.mark.parametrize("count", [0, 2])
def test_exactly_one_observed_node_is_required(count: int) -> None:
    nodes = [node("Z1"), node("Z2")]
    for item in nodes[:count]:
        item["observed"] = True
    message = invalid(spec(*nodes))
    assert "exactly one node must be observed" in message
    assert ("found none" in message) if count == 0 else ("found Z1, Z2" in message)


def test_an_unknown_parent_is_named_with_the_known_nodes() -> None:
    message = invalid(spec(node("Z1", parents=["Z9"]), observed(parents=["Z1"])))
    assert "node 'Z1' has unknown parent(s) Z9" in message
    assert "known nodes: Z1, X" in message


def test_a_two_cycle_is_reported_as_a_path() -> None:
    message = invalid(spec(node("A", parents=["B"]), node("B", parents=["A"]), observed()))
    assert "the graph has a cycle of 2 node(s) (parent -> child): A -> B -> A" in message


def test_a_three_cycle_is_reported_without_the_nodes_downstream_of_it() -> None:
    message = invalid(
        spec(
            node("A", parents=["C"]),
            node("B", parents=["A"]),
            node("C", parents=["B"]),
            node("D", parents=["A"]),
            observed(parents=["D"]),
        )
    )
    # C is A's parent, A is B's, B is C's; D hangs off the cycle but is not in it.
    assert "cycle of 3 node(s) (parent -> child): A -> B -> C -> A" in message
    assert "D" not in message.split("cycle")[1]


def test_validation_of_a_long_cycle_returns_at_once() -> None:
    # The upstream code looped forever on any cycle; ours ends in len(nodes) rounds.
    n = 400
    nodes = [node(f"Z{i}", parents=[f"Z{(i + 1) % n}"]) for i in range(n)]
    start = time.perf_counter()
    message = invalid(spec(*nodes, observed(parents=["Z0"])))
    assert time.perf_counter() - start < 2.0
    assert f"cycle of {n} node(s) (parent -> child): Z0 -> Z399 -> Z398" in message
    assert message.endswith("-> ... -> Z0")


def test_a_node_cannot_be_its_own_parent() -> None:
    message = invalid(spec(node("Z1", parents=["Z1"]), observed()))
    assert "node 'Z1' lists itself as a parent" in message


def test_a_parent_listed_twice_is_rejected() -> None:
    message = invalid(spec(node("Z1"), observed(parents=["Z1", "Z1"])))
    assert "node 'X': parent(s) listed twice: Z1" in message


def test_duplicate_node_names_are_rejected() -> None:
    message = invalid(spec(node("Z1"), node("Z1", 4), observed()))
    assert "duplicate node names: Z1" in message


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf")])
def test_alpha_must_be_a_positive_finite_number(alpha: float) -> None:
    message = invalid(spec(node("Z1", alpha=alpha), observed()))
    assert message.startswith("invalid graph: nodes.0.alpha:")


@pytest.mark.parametrize("states", [0, -4])
def test_states_must_be_positive(states: int) -> None:
    message = invalid(spec(node("Z1", states), observed()))
    assert "nodes.0.states: Input should be greater than 0" in message


@pytest.mark.parametrize("mode", ["slow", "dead"])
def test_slow_and_dead_apply_to_latent_nodes_only(mode: str) -> None:
    message = invalid(spec(observed(mode=mode)))
    assert f"mode '{mode}' applies to latent nodes only" in message


def test_the_absorbing_state_of_a_dead_node_must_exist() -> None:
    message = invalid(spec(node("Z1", 4, mode="dead", c=4), observed(parents=["Z1"])))
    assert "absorbing state c=4 is out of range for 4 states" in message
    graph = parse_graph(spec(node("Z1", 4, mode="dead", c=3), observed(parents=["Z1"])))
    assert graph.node("Z1").c == 3


@pytest.mark.parametrize("value", ["none", "None", "NONE", None])
def test_none_is_an_alias_of_default(value: str | None) -> None:
    graph = parse_graph(spec(node("Z1", mode=value), observed(mode=value)))
    assert graph.node("Z1").mode == "default"
    assert graph.node("X").mode == "default"


def test_unknown_modes_kernels_and_fields_are_rejected() -> None:
    assert "nodes.0.mode" in invalid(spec(node("Z1", mode="fast"), observed()))
    assert "nodes.0.kernel" in invalid(spec(node("Z1", kernel="lowrank"), observed()))
    assert "nodes.0.alpah" in invalid(spec(node("Z1", alpah=1.0), observed()))
    assert "nodes:" in invalid({"nodes": []})


def test_a_table_too_large_to_allocate_is_rejected_before_drawing() -> None:
    states = int(MAX_TABLE_ENTRIES ** (1 / 2)) + 1
    message = invalid(spec(node("Z1", states), observed()))
    assert "node 'Z1': its conditional table would have" in message


def test_specs_are_frozen() -> None:
    graph = parse_graph(spec(node("Z1"), observed(parents=["Z1"])))
    with pytest.raises(ValidationError):
        graph.node("Z1").states = 9  # type: ignore[misc]
    assert isinstance(graph.node("Z1"), NodeSpec)


def test_with_mode_changes_every_latent_node_and_leaves_the_observed_one() -> None:
    graph = parse_graph(spec(node("Z1"), node("Z2", parents=["Z1"]), observed(parents=["Z2"])))
    slow = graph.with_mode("slow")
    assert [n.mode for n in slow.nodes] == ["slow", "slow", "default"]
    assert slow.with_mode("none") == graph
    assert graph.with_mode("transition").has_transition
    assert not graph.has_transition


def test_with_mode_reports_bad_modes_as_user_errors() -> None:
    graph = parse_graph(spec(node("Z1", 2, c=5), observed(parents=["Z1"])))
    with pytest.raises(GssmDataError, match="unknown mode 'fast'; choose one of default"):
        graph.with_mode("fast")
    with pytest.raises(GssmDataError, match="absorbing state c=5 is out of range"):
        graph.with_mode("dead")


def test_with_alpha_replaces_the_targeted_nodes_only() -> None:
    graph = parse_graph(spec(node("Z1"), observed(parents=["Z1"])))
    latent = graph.with_alpha(0.01, target="latent")
    assert (latent.node("Z1").alpha, latent.node("X").alpha) == (0.01, 0.5)
    emitted = graph.with_alpha(2.0, target="observed")
    assert (emitted.node("Z1").alpha, emitted.node("X").alpha) == (0.5, 2.0)
    with pytest.raises(GssmDataError, match="alpha"):
        graph.with_alpha(-1.0, target="latent")


YAML_GRAPH = """\
description: a small test graph
nodes:
  - {name: Z1, states: 4, alpha: 0.1, mode: none}
  - {name: X, states: 6, alpha: 0.2, parents: [Z1], observed: true, kernel: fullrank}
"""


def test_load_graph_reads_a_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "graph.yaml"
    path.write_text(YAML_GRAPH)
    graph = load_graph(path)
    assert isinstance(graph, GraphSpec)
    assert graph.description == "a small test graph"
    assert graph.table_shape("X") == (4, 6)
    assert graph.node("X").kernel == "fullrank"
    assert graph.node("Z1").mode == "default"
    assert parse_graph(graph.model_dump(mode="json")) == graph


def test_load_graph_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GssmDataError, match=r"graph file .*absent\.yaml not found"):
        load_graph(tmp_path / "absent.yaml")


def test_load_graph_reports_bad_yaml_on_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("nodes: [ {name: Z1, states: 4\n  - oops: [\n")
    with pytest.raises(GssmDataError, match=r"bad\.yaml is not valid YAML") as caught:
        load_graph(path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("text", "kind"), [("", "NoneType"), ("- a\n- b\n", "list")])
def test_load_graph_wants_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = tmp_path / "graph.yaml"
    path.write_text(text)
    with pytest.raises(GssmDataError, match=f"must hold a mapping with a `nodes` list, got {kind}"):
        load_graph(path)


def test_load_graph_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(GssmDataError, match=r"graph file .* is a directory"):
        load_graph(tmp_path)


def test_load_graph_names_the_file_in_validation_errors(tmp_path: Path) -> None:
    path = tmp_path / "graph.yaml"
    path.write_text(YAML_GRAPH.replace("alpha: 0.1", "alpha: 0"))
    with pytest.raises(GssmDataError, match=r"invalid graph .*graph.yaml: nodes.0.alpha"):
        load_graph(path)
