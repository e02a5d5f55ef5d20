"""calibrate: alpha reaching a target entropy, reproducibly, with clear errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from gssm_data.calibrate import (
    ALPHA_RANGE,
    CALIBRATION_STREAM,
    MAX_EVALUATIONS,
    MIN_BRACKET,
    _bracket_search,
    calibrate,
    calibration_sequences,
)
from gssm_data.cli import app
from gssm_data.entropy import sequence_entropy
from gssm_data.errors import GssmDataError
from gssm_data.graph import GraphSpec
from gssm_data.kernels import draw_kernels
from gssm_data.presets import load_preset
from gssm_data.sampler import STREAMS, BlockSampler

SEQ_LEN = 17


def _independent_bits(graph: GraphSpec, seed: int, n_sequences: int) -> float:
    """Mean bits per predicted token of the calibration sample, recomputed from scratch."""
    conditionals = draw_kernels(graph, seed)
    sampler = BlockSampler(graph, conditionals, SEQ_LEN, seed, block_size=n_sequences)
    tokens = sampler.block(CALIBRATION_STREAM, 0).tokens
    return float(sequence_entropy(graph, conditionals, tokens).mean() / math.log(2))


def test_calibrated_latent_alpha_gives_the_target_entropy() -> None:
    graph = load_preset("debug")
    result = calibrate(graph, seed=1, seq_len=SEQ_LEN, target_bits=1.6)
    assert abs(result.achieved_bits - 1.6) <= result.tolerance_bits
    assert ALPHA_RANGE[0] <= result.alpha <= ALPHA_RANGE[1]
    assert [node.alpha for node in result.graph.latents] == [result.alpha]
    assert result.graph.observed.alpha == graph.observed.alpha
    independent = _independent_bits(result.graph, 1, calibration_sequences(graph))
    assert math.isclose(result.achieved_bits, independent, rel_tol=1e-12)
    assert len(result.evaluations) <= MAX_EVALUATIONS


def test_calibrating_the_observed_node_leaves_the_latents_alone() -> None:
    graph = load_preset("debug")
    result = calibrate(graph, seed=0, seq_len=SEQ_LEN, target_bits=1.8, target="observed")
    assert abs(result.achieved_bits - 1.8) <= result.tolerance_bits
    assert result.graph.observed.alpha == result.alpha
    assert [node.alpha for node in result.graph.latents] == [n.alpha for n in graph.latents]


def test_calibration_is_reproducible() -> None:
    graph = load_preset("debug")
    first = calibrate(graph, seed=2, seq_len=SEQ_LEN, target_bits=1.9)
    second = calibrate(graph, seed=2, seq_len=SEQ_LEN, target_bits=1.9)
    assert first == second


def test_a_target_out_of_reach_names_the_reachable_range() -> None:
    with pytest.raises(GssmDataError, match=r"out of reach.*\d+\.\d+ \.\. \d+\.\d+ bits/token"):
        calibrate(load_preset("debug"), seed=0, seq_len=SEQ_LEN, target_bits=7.0)


def test_bad_arguments_are_user_errors() -> None:
    graph = load_preset("debug")
    with pytest.raises(GssmDataError, match="latent or observed"):
        calibrate(graph, seed=0, seq_len=SEQ_LEN, target_bits=1.0, target="hidden")  # type: ignore[arg-type]
    with pytest.raises(GssmDataError, match="seq-len"):
        calibrate(graph, seed=0, seq_len=1, target_bits=1.0)
    with pytest.raises(GssmDataError, match="tolerance"):
        calibrate(graph, seed=0, seq_len=SEQ_LEN, target_bits=1.0, tolerance_bits=0.0)


def test_calibration_sample_shrinks_for_large_latent_spaces() -> None:
    assert calibration_sequences(load_preset("hmm")) == 256
    assert calibration_sequences(load_preset("base")) == 64
    assert calibration_sequences(load_preset("large")) == 32


def test_calibration_stream_is_none_of_the_data_splits() -> None:
    assert CALIBRATION_STREAM not in STREAMS.values()


def test_bracket_search_converges_fast_on_a_smooth_function() -> None:
    calls: list[float] = []

    def excess(u: float) -> float:
        calls.append(u)
        return math.tanh(u - 0.7)

    _bracket_search(excess, -9.0, 5.0, excess(-9.0), excess(5.0), tolerance=1e-6)
    assert abs(math.tanh(calls[-1] - 0.7)) <= 1e-6
    assert len(calls) <= 14


def test_bracket_search_stops_on_a_jump_it_cannot_cross() -> None:
    calls: list[float] = []

    def excess(u: float) -> float:
        calls.append(u)
        return -1.0 if u < 0.3 else 1.0

    _bracket_search(excess, -9.0, 5.0, excess(-9.0), excess(5.0), tolerance=0.1)
    assert len(calls) <= MAX_EVALUATIONS
    # It closed on the jump: the last points straddle 0.3 within the minimum bracket.
    below = max(u for u in calls if u < 0.3)
    above = min(u for u in calls if u >= 0.3)
    assert above - below < max(MIN_BRACKET, 1e-3)


def test_calibrate_command_prints_alpha_and_achieved_figure() -> None:
    args = ["calibrate", "--preset", "debug", "--target-bits", "1.6", "--seq-len", str(SEQ_LEN)]
    result = CliRunner().invoke(app, [*args, "--seed", "1", "--json", "-q", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    expected = calibrate(load_preset("debug"), seed=1, seq_len=SEQ_LEN, target_bits=1.6)
    assert data["alpha"] == expected.alpha
    assert data["achieved_bits"] == expected.achieved_bits
    assert np.isclose(data["graph"]["nodes"][0]["alpha"], expected.alpha)
    plain = CliRunner().invoke(app, [*args, "--seed", "1", "-q"])
    assert plain.exit_code == 0, plain.output
    assert f"alpha = {expected.alpha:.6g}" in plain.output
    assert f"{expected.achieved_bits:.4f}" in plain.output


def test_calibrate_command_out_of_reach_is_a_one_line_error() -> None:
    result = CliRunner().invoke(
        app, ["calibrate", "--preset", "debug", "--target-bits", "9", "--seq-len", "9", "-q"]
    )
    assert result.exit_code == 1
    assert "out of reach" in result.output
    assert "Traceback" not in result.output


def test_cli_default_tolerance_matches_the_library():
    from gssm_data.calibrate import DEFAULT_TOLERANCE_BITS
    from gssm_data.cli import entropy as entropy_cli

    assert entropy_cli.DEFAULT_TOLERANCE_BITS == DEFAULT_TOLERANCE_BITS
