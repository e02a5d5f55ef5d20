"""Shipped presets: the required ones exist, say what they exercise, and have their shapes."""

from __future__ import annotations

import pytest

from gssm_data.errors import GssmDataError
from gssm_data.graph import MODES
from gssm_data.kernels import draw_kernels
from gssm_data.presets import load_preset, preset_names

BASE_FAMILY = ["base", "sparse", "dense", "low_entropy", "large"]


def test_the_required_presets_are_shipped() -> None:
    names = preset_names()
    assert names == sorted(names)
    assert {"debug", "hmm", *BASE_FAMILY} <= set(names)


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_has_a_one_line_description_and_one_observed_node(name: str) -> None:
    graph = load_preset(name)
    assert graph.description.strip()
    assert "\n" not in graph.description
    assert graph.observed.name == "X"
    assert graph.vocab_size <= 256  # tokens fit uint8


@pytest.mark.parametrize("name", preset_names())
@pytest.mark.parametrize("mode", [*MODES, "none"])
def test_every_preset_accepts_every_mode(name: str, mode: str) -> None:
    graph = load_preset(name).with_mode(mode)
    expected = "default" if mode == "none" else mode
    assert {node.mode for node in graph.latents} == {expected}
    assert graph.observed.mode == "default"


def test_hmm_is_the_upstream_reference_configuration() -> None:
    graph = load_preset("hmm")
    (latent,) = graph.latents
    assert (latent.states, latent.alpha) == (64, 1e-3)
    assert graph.observed.states == 32
    assert graph.observed.alpha == 1e-3
    assert graph.observed.parents == (latent.name,)


@pytest.mark.parametrize("name", BASE_FAMILY)
def test_the_base_family_exercises_a_real_graph(name: str) -> None:
    graph = load_preset(name)
    assert len(graph.latents) >= 3
    assert any(len(node.parents) >= 2 for node in graph.latents)
    assert 10**3 <= graph.joint_latent_states <= 10**4


def test_the_family_differs_from_base_in_what_it_claims() -> None:
    base, sparse, dense = load_preset("base"), load_preset("sparse"), load_preset("dense")
    low = load_preset("low_entropy")
    edges = {name: sum(len(n.parents) for n in load_preset(name).nodes) for name in BASE_FAMILY}
    assert edges["sparse"] < edges["base"] < edges["dense"]
    assert any(node.kernel == "fullrank" for node in sparse.nodes)
    assert all(node.alpha > base.node(node.name).alpha for node in dense.nodes)
    assert all(node.alpha < base.node(node.name).alpha for node in low.nodes)
    assert [(n.name, n.states) for n in low.nodes] == [(n.name, n.states) for n in base.nodes]


def test_debug_is_tiny() -> None:
    graph = load_preset("debug")
    assert graph.joint_latent_states <= 16
    assert graph.vocab_size <= 16
    assert set(draw_kernels(graph, 0)) == {"Z1", "X"}


def test_an_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(GssmDataError, match=r"unknown preset 'hm'; known presets: .*hmm"):
        load_preset("hm")


def test_presets_json_lists_every_preset_with_its_graph() -> None:
    import json

    from typer.testing import CliRunner

    from gssm_data.cli import app
    from gssm_data.graph import GraphSpec

    result = CliRunner().invoke(app, ["presets", "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [item["name"] for item in listed] == preset_names()
    for item in listed:
        graph = GraphSpec.model_validate(item["graph"])
        assert graph == load_preset(item["name"])
        assert item["vocab_size"] == graph.vocab_size
        assert item["joint_latent_states"] == graph.joint_latent_states
