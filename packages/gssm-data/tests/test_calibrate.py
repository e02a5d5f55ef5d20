"""calibrate: alpha reaching a target entropy, reproducibly, with clear errors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from gssm_data import calibrate as calibrate_module
from gssm_data.calibrate import (
    ALPHA_RANGE,
    CALIBRATION_STREAM,
    MAX_EVALUATIONS,
    MIN_BRACKET,
    SCAN_LEVELS,
    _brent,
    calibrate,
    calibration_sequences,
    scan_alphas,
)
from gssm_data.cli import app
from gssm_data.entropy import sequence_entropy
from gssm_data.errors import GssmDataError
from gssm_data.graph import GraphSpec
from gssm_data.kernels import draw_kernels
from gssm_data.presets import load_preset
from gssm_data.sampler import STREAMS, BlockSampler

SEQ_LEN = 17


def _independent_bits(
    graph: GraphSpec, seed: int, n_sequences: int, seq_len: int = SEQ_LEN
) -> float:
    """Mean bits per predicted token of the calibration sample, recomputed from scratch."""
    conditionals = draw_kernels(graph, seed)
    sampler = BlockSampler(graph, conditionals, seq_len, seed, block_size=n_sequences)
    tokens = sampler.block(CALIBRATION_STREAM, 0).tokens
    return float(sequence_entropy(graph, conditionals, tokens).mean() / math.log(2))


def test_calibrated_latent_alpha_gives_the_target_entropy() -> None:
    graph = load_preset("debug")
    result = calibrate(graph, seed=1, seq_len=SEQ_LEN, target_bits=2.0)
    assert abs(result.achieved_bits - 2.0) <= result.tolerance_bits
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


def test_a_target_no_entropy_can_have_is_out_of_reach_without_evaluating(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """8 tokens: no next-token distribution has more than log2(8) = 3 bits, or fewer than 0."""

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("a proven miss needs no evaluation")

    monkeypatch.setattr(calibrate_module, "entropy_bits", never)
    for bits in (7.0, 3.06, -0.5):
        with pytest.raises(GssmDataError, match=r"out of reach.*log2\(8\) = 3\.000 bits"):
            calibrate(load_preset("debug"), seed=0, seq_len=SEQ_LEN, target_bits=bits)


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


class _Hit(Exception):
    pass


def test_brent_converges_fast_on_a_smooth_function() -> None:
    calls: list[float] = []

    def bits_at(u: float) -> float:
        calls.append(u)
        if abs(math.tanh(u - 0.7)) <= 1e-6:
            raise _Hit
        return math.tanh(u - 0.7)

    with pytest.raises(_Hit):
        _brent(bits_at, -9.0, 5.0, math.tanh(-9.7), math.tanh(4.3), lambda bits: bits)
    assert abs(calls[-1] - 0.7) <= 1e-5
    assert len(calls) <= 14


def test_brent_stops_on_a_jump_it_cannot_cross() -> None:
    calls: list[float] = []

    def bits_at(u: float) -> float:
        calls.append(u)
        return -1.0 if u < 0.3 else 1.0

    _brent(bits_at, -9.0, 5.0, -1.0, 1.0, lambda bits: bits)
    assert len(calls) <= MAX_EVALUATIONS
    # It closed on the jump: the last points straddle 0.3 within the minimum bracket.
    below = max(u for u in calls if u < 0.3)
    above = min(u for u in calls if u >= 0.3)
    assert above - below < max(MIN_BRACKET, 1e-3)


def test_calibrate_command_prints_alpha_and_achieved_figure() -> None:
    args = ["calibrate", "--preset", "debug", "--target-bits", "2.0", "--seq-len", str(SEQ_LEN)]
    result = CliRunner().invoke(app, [*args, "--seed", "1", "--json", "-q", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    expected = calibrate(load_preset("debug"), seed=1, seq_len=SEQ_LEN, target_bits=2.0)
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


# --- the log-grid scan --------------------------------------------------------------


def test_the_debug_preset_reaches_one_bit_at_seq_len_65() -> None:
    """The case that used to answer "out of reach ... 1.274 .. 2.181"."""
    graph = load_preset("debug")
    result = calibrate(graph, seed=0, seq_len=65, target_bits=1.0, device="cpu")
    assert abs(result.achieved_bits - 1.0) <= result.tolerance_bits
    independent = _independent_bits(result.graph, 0, calibration_sequences(graph), seq_len=65)
    assert math.isclose(result.achieved_bits, independent, rel_tol=1e-12)
    low, high = result.scanned_range_bits
    assert low < 1.0 < high
    cli = CliRunner().invoke(
        app, ["calibrate", "--preset", "debug", "--seq-len", "65", "--target-bits", "1.0", "-q"]
    )
    assert cli.exit_code == 0, cli.output
    assert f"alpha = {result.alpha:.6g}" in cli.output


def test_a_tight_tolerance_is_met_by_refining_a_bracket() -> None:
    graph = load_preset("debug")
    result = calibrate(
        graph, seed=0, seq_len=65, target_bits=1.2, tolerance_bits=0.003, device="cpu"
    )
    assert abs(result.achieved_bits - 1.2) <= 0.003
    assert result.alpha not in scan_alphas()  # found between scan points
    coarse = [scan_alphas()[i] for i in SCAN_LEVELS[0]]
    assert [alpha for alpha, _ in result.evaluations[: len(coarse)]] == coarse
    independent = _independent_bits(result.graph, 0, calibration_sequences(graph), seq_len=65)
    assert abs(independent - 1.2) <= 0.003


def test_the_same_graph_seed_and_target_always_give_the_same_alpha() -> None:
    graph = load_preset("debug")
    runs = [
        calibrate(graph, seed=0, seq_len=65, target_bits=1.2, tolerance_bits=0.01) for _ in range(2)
    ]
    assert runs[0] == runs[1]
    assert runs[0].alpha == runs[1].alpha and runs[0].evaluations == runs[1].evaluations


def _jumpy_entropy(alpha: float) -> float:
    """A non-monotone entropy curve like the one a jumpy kernel draw gave the debug preset
    (1e-4: 1.274, 0.03: 1.446, 0.1: 1.009, 0.3: 1.751, 100: 2.181), linear in log(alpha)."""
    knots = np.log([1e-4, 0.03, 0.1, 0.3, 100.0])
    return float(np.interp(math.log(alpha), knots, [1.274, 1.446, 1.009, 1.751, 2.181]))


@pytest.fixture()
def jumpy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        calibrate_module,
        "entropy_bits",
        lambda graph, **_: (_jumpy_entropy(graph.latents[0].alpha), 0.0),
    )


def test_a_target_inside_a_dip_is_found_although_the_ends_miss_it(jumpy: None) -> None:
    # Both ends of the range are above 1.1; only the dip around alpha 0.1 reaches it.
    result = calibrate(load_preset("debug"), seed=0, seq_len=9, target_bits=1.1,
                       tolerance_bits=0.001)  # fmt: skip
    assert abs(result.achieved_bits - 1.1) <= 0.001
    assert 0.03 < result.alpha < 0.3


def test_an_unfound_target_names_the_closest_alpha_and_the_range_seen(jumpy: None) -> None:
    seen = [_jumpy_entropy(alpha) for alpha in scan_alphas()]
    assert f"{min(seen):.3f} .. {max(seen):.3f}" == "1.009 .. 2.181"  # the dip, not an end
    with pytest.raises(GssmDataError) as caught:
        calibrate(load_preset("debug"), seed=0, seq_len=9, target_bits=0.5)
    message = str(caught.value)
    assert "not found among the" in message and "out of reach" not in message
    assert "closest: alpha 0.1 gives 1.0090; seen 1.009 .. 2.181 bits/token" in message


def _dipping_entropy(alpha: float) -> float:
    """Like base's latent alphas: 3.76 .. 4.41 bits over 3e-3 .. 3e-2, with a dip
    at alpha 0.0041 that no scanned alpha (two per decade) comes within 0.05 bits of 3.8."""
    knots = np.log([1e-4, 3.16e-3, 4.1e-3, 1e-2, 3.16e-2, 100.0])
    return float(np.interp(math.log(alpha), knots, [4.5, 3.95, 3.76, 4.41, 4.2, 4.6]))


def test_a_dip_between_scanned_alphas_is_found_by_refining_around_the_closest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        calibrate_module,
        "entropy_bits",
        lambda graph, **_: (_dipping_entropy(graph.latents[0].alpha), 0.0),
    )
    scanned = [_dipping_entropy(alpha) for alpha in scan_alphas()]
    assert min(scanned) > 3.85  # the scan alone would refuse 3.8
    result = calibrate(load_preset("base"), seed=0, seq_len=9, target_bits=3.8)
    assert abs(_dipping_entropy(result.alpha) - 3.8) <= 0.05
    assert 3.16e-3 < result.alpha < 1e-2


def test_an_unfound_real_target_names_an_alpha_that_really_gives_the_closest() -> None:
    graph = load_preset("debug")  # its emission alone gives 0.41 bits at seq_len 65
    with pytest.raises(GssmDataError) as caught:
        calibrate(graph, seed=0, seq_len=65, target_bits=0.2, device="cpu")
    found = re.search(r"closest: alpha (\S+) gives (\S+);", str(caught.value))
    assert found is not None, caught.value
    alpha, bits = float(found.group(1)), float(found.group(2))
    independent = _independent_bits(
        graph.with_alpha(alpha, target="latent"), 0, calibration_sequences(graph), seq_len=65
    )
    assert abs(independent - bits) < 2e-3  # alpha is printed to 4 digits
    assert bits > 0.2 + 0.05


def test_a_cache_saves_evaluations_without_changing_the_answer() -> None:
    graph = load_preset("debug")
    cache: dict[float, tuple[float, float]] = {}
    first = calibrate(graph, seed=0, seq_len=65, target_bits=1.5, cache=cache)
    assert first.computed == len(first.evaluations) == len(cache)
    again = calibrate(graph, seed=0, seq_len=65, target_bits=1.5, cache=cache)
    assert again == first and again.computed == 0
    other = calibrate(graph, seed=0, seq_len=65, target_bits=1.9, cache=cache)
    assert other.computed < len(other.evaluations)  # the coarse scan came from the cache
    assert other == calibrate(graph, seed=0, seq_len=65, target_bits=1.9)


def _scaling_regimes(preset: str) -> list[tuple[str | None, str, float]]:
    from gssm_data.scaling import load_recipe

    recipe = load_recipe(Path(__file__).parents[3] / "datasets" / "scaling.yaml")
    return [
        (regime.mode, regime.target, regime.target_bits)
        for regime in recipe.regimes
        if regime.preset == preset and regime.target_bits is not None
    ]


def _check_at_most_seven(preset: str) -> None:
    from gssm_data.scaling import load_recipe

    recipe = load_recipe(Path(__file__).parents[3] / "datasets" / "scaling.yaml")
    cases = _scaling_regimes(preset)
    assert cases
    for mode, target, bits in cases:
        graph = load_preset(preset)
        graph = graph.with_mode(mode) if mode else graph
        result = calibrate(
            graph,
            seed=recipe.seed,
            seq_len=recipe.seq_len,
            target_bits=bits,
            target=target,  # type: ignore[arg-type]
            tolerance_bits=recipe.tolerance_bits,
            device="cpu",
        )
        assert len(result.evaluations) <= 7, (mode, target, bits, result.evaluations)
        independent = _independent_bits(
            result.graph, recipe.seed, calibration_sequences(graph), seq_len=recipe.seq_len
        )
        assert abs(independent - bits) <= recipe.tolerance_bits


def test_the_hmm_regimes_calibrate_in_at_most_seven_evaluations() -> None:
    _check_at_most_seven("hmm")


@pytest.mark.slow
def test_the_base_regimes_calibrate_in_at_most_seven_evaluations() -> None:
    _check_at_most_seven("base")


@pytest.mark.parametrize(
    ("option", "value"),
    [("target_bits", math.nan), ("target_bits", math.inf), ("tolerance_bits", math.nan),
     ("tolerance_bits", -math.inf)],
)  # fmt: skip
def test_non_finite_targets_and_tolerances_are_refused(option: str, value: float) -> None:
    arguments = {"target_bits": 1.0, "tolerance_bits": 0.05, option: value}
    flag = "--" + option.replace("_", "-")
    with pytest.raises(GssmDataError, match=f"{flag} {value}: give a finite number"):
        calibrate(load_preset("debug"), seed=0, seq_len=SEQ_LEN, **arguments)


@pytest.mark.parametrize(
    "args", [["--target-bits", "nan"], ["--target-bits", "1", "--tolerance-bits", "inf"]]
)
def test_non_finite_options_are_one_line_errors(args: list[str]) -> None:
    result = CliRunner().invoke(app, ["calibrate", "--preset", "debug", "-q", *args])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "give a finite number" in lines[0]


@pytest.mark.slow
def test_base_latent_alphas_reach_the_bits_the_scan_alone_missed() -> None:
    """Tuning base's latent alphas, no scanned alpha is within 0.05 of 3.8 bits
    (3.914 at 3.2e-3 is the closest), but one between the scanned alphas is."""
    graph = load_preset("base")
    result = calibrate(graph, seed=0, seq_len=257, target_bits=3.8, device="cpu")
    scanned = {alpha for alpha in scan_alphas()}
    assert result.alpha not in scanned
    assert all(abs(bits - 3.8) > 0.05 for alpha, bits in result.evaluations if alpha in scanned)
    independent = _independent_bits(result.graph, 0, calibration_sequences(graph), seq_len=257)
    assert abs(independent - 3.8) <= 0.05
