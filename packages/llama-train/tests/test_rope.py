"""Rotary scaling methods against values worked out by hand, and their use by the model.

The hand values use head_dim 8 and theta 10^4, so the frequencies are exactly
1, 0.1, 0.01, 0.001 (pairs 0..3), an original length L = 1000 and factor 4.
Pair i turns r_i = L f_i / 2 pi times over L: 159.15, 15.915, 1.5915, 0.15915.
"""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from llama_train.core.model import Llama, ModelConfig, rotary_tables
from llama_train.core.rope import (
    ROPE_METHODS,
    RopeScaling,
    linear_scaling,
    llama3_scaling,
    ntk_scaling,
    rotary_frequencies,
    yarn_scaling,
)

FREQS = [1.0, 0.1, 0.01, 0.001]


@pytest.fixture()
def inv_freq() -> torch.Tensor:
    return rotary_frequencies(8, 10_000.0)


def _close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(
        actual, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0
    )


def test_rotary_frequencies_are_theta_to_minus_two_i_over_d(inv_freq: torch.Tensor) -> None:
    _close(inv_freq, FREQS)


@pytest.mark.parametrize("method", ROPE_METHODS)
def test_factor_one_is_the_identity_for_every_method(method: str, inv_freq: torch.Tensor) -> None:
    scaled = RopeScaling(method=method, factor=1.0, original_max_seq_len=1000).apply(inv_freq, 1000)
    torch.testing.assert_close(scaled.inv_freq, inv_freq, rtol=0, atol=0)
    assert scaled.attention_factor == 1.0


def test_linear_divides_every_frequency_by_the_factor(inv_freq: torch.Tensor) -> None:
    _close(linear_scaling(inv_freq, 4.0), [0.25, 0.025, 0.0025, 0.00025])


def test_ntk_changes_the_base_to_theta_times_factor_to_d_over_d_minus_2(
    inv_freq: torch.Tensor,
) -> None:
    # theta' = 1e4 * 4^(8/6); f_i' = theta'^(-2i/8): 1, 0.1 * 4^(-1/3), 0.01 * 4^(-2/3), 0.001 / 4
    _close(ntk_scaling(inv_freq, 4.0), [1.0, 0.062996052, 0.0039685026, 0.00025])
    new_base = 1e4 * 4 ** (8 / 6)
    _close(ntk_scaling(inv_freq, 4.0), rotary_frequencies(8, new_base).tolist())


def test_yarn_ramps_in_the_pair_index_between_rounded_bounds(
    inv_freq: torch.Tensor,
) -> None:
    # The pair turning r times over L sits at d(r) = 8 ln(L / 2 pi r) / (2 ln 1e4):
    # d(32) = 0.697 -> lo = 0, d(1) = 2.202 -> hi = 3; keep g_i = 1 - i / 3 = 1, 2/3, 1/3, 0;
    # f_i' = (1 - g) f_i / 4 + g f_i; sqrt(1/t) = 0.1 ln 4 + 1.
    scaled, attention = yarn_scaling(inv_freq, 4.0, 1000)
    _close(scaled, [1.0, 0.075, 0.005, 0.00025])
    assert attention == pytest.approx(1.1386294361)


hf_rope = pytest.importorskip("transformers.modeling_rope_utils")


def _hf_frequencies(head_dim: int, theta: float, context: int, parameters: dict):
    """inv_freq and attention factor of Hugging Face's own implementation."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=head_dim * 2,
        num_attention_heads=2,
        head_dim=head_dim,
        max_position_embeddings=context,
        rope_parameters={"rope_theta": theta, **parameters},
    )
    function = hf_rope.ROPE_INIT_FUNCTIONS[parameters["rope_type"]]
    inv_freq, attention = function(config, "cpu")
    return inv_freq.double(), attention


@pytest.mark.parametrize(
    ("head_dim", "theta", "original", "factor", "beta_fast", "beta_slow"),
    [
        (8, 10_000.0, 1000, 4.0, 32.0, 1.0),
        (64, 10_000.0, 2048, 8.0, 32.0, 1.0),
        (128, 500_000.0, 8192, 4.0, 32.0, 1.0),
        (32, 1_000.0, 256, 16.0, 8.0, 2.0),
        (16, 100.0, 24, 2.0, 32.0, 1.0),
    ],
)
def test_yarn_equals_hugging_face_s_reference(
    head_dim: int, theta: float, original: int, factor: float, beta_fast: float, beta_slow: float
) -> None:
    parameters = {
        "rope_type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": original,
        "beta_fast": beta_fast,
        "beta_slow": beta_slow,
    }
    expected, expected_attention = _hf_frequencies(
        head_dim, theta, int(original * factor), parameters
    )
    ours = RopeScaling(
        method="yarn",
        factor=factor,
        original_max_seq_len=original,
        beta_fast=beta_fast,
        beta_slow=beta_slow,
    ).apply(rotary_frequencies(head_dim, theta), int(original * factor))
    torch.testing.assert_close(ours.inv_freq, expected, rtol=3e-7, atol=0)  # HF: float32
    assert ours.attention_factor == pytest.approx(expected_attention, rel=1e-12)
    # The paper's ramp in rotations gives other frequencies: the comparison can fail.
    paper = llama3_scaling(
        rotary_frequencies(head_dim, theta), factor, original, beta_slow, beta_fast
    )
    assert (paper / expected - 1).abs().max() > 1e-2


def test_llama3_keeps_high_frequencies_divides_low_ones_smooth_between(
    inv_freq: torch.Tensor,
) -> None:
    # Wavelengths 2 pi / f: 6.28, 62.8 (< L/4 = 250: kept), 628 (between: smoothed with
    # k = (1000 / 628.3 - 1) / 3 = 0.197183), 6283 (> L/1 = 1000: divided by 4).
    _close(llama3_scaling(inv_freq, 4.0, 1000), [1.0, 0.1, 0.0039788736, 0.00025])


def test_scaled_frequencies_lie_between_interpolation_and_the_original(
    inv_freq: torch.Tensor,
) -> None:
    """Every method moves each frequency into [f / s, f]: never faster, never slower than PI."""
    for method in ROPE_METHODS[1:]:
        scaled = RopeScaling(method=method, factor=8.0).apply(inv_freq, 300).inv_freq
        assert torch.all(scaled <= inv_freq * (1 + 1e-12)), method
        assert torch.all(scaled >= inv_freq / 8 * (1 - 1e-12)), method


def test_the_original_length_defaults_to_the_model_context(inv_freq: torch.Tensor) -> None:
    explicit = RopeScaling(method="llama3", factor=4.0, original_max_seq_len=1000)
    implicit = RopeScaling(method="llama3", factor=4.0)
    torch.testing.assert_close(
        explicit.apply(inv_freq, 50).inv_freq, implicit.apply(inv_freq, 1000).inv_freq
    )


def test_linear_tables_at_position_2p_equal_the_plain_tables_at_p() -> None:
    cos, sin = rotary_tables(8, 64, 100.0)
    cos2, sin2 = rotary_tables(8, 128, 100.0, RopeScaling(method="linear", factor=2.0))
    torch.testing.assert_close(cos2[::2], cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin2[::2], sin, rtol=0, atol=1e-6)


def test_yarn_tables_scale_queries_and_keys_by_the_attention_factor() -> None:
    cos, sin = rotary_tables(8, 32, 100.0, RopeScaling(method="yarn", factor=8.0))
    magnitude = torch.sqrt(cos.double() ** 2 + sin.double() ** 2)
    torch.testing.assert_close(
        magnitude, torch.full_like(magnitude, 0.1 * math.log(8) + 1), rtol=1e-6, atol=0
    )


def test_the_model_builds_its_rotary_tables_from_the_config_section() -> None:
    config = ModelConfig(
        dim=16,
        n_heads=2,
        n_layers=1,
        vocab_size=8,
        max_seq_len=40,
        rope_scaling=RopeScaling(method="ntk", factor=2.0),
    )
    cos, _ = rotary_tables(8, 40, 10_000.0, RopeScaling(method="ntk", factor=2.0))
    torch.testing.assert_close(Llama(config).rope_cos, cos, rtol=0, atol=0)
    plain = Llama(config.model_copy(update={"rope_scaling": RopeScaling()}))
    assert not torch.equal(plain.rope_cos, cos)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"method": "none", "factor": 2.0}, "no effect with method none"),
        ({"method": "linear", "factor": 0.5}, "greater than or equal to 1"),
        ({"method": "linear", "factor": float("nan")}, "finite number"),
        ({"method": "linear", "factor": float("inf")}, "finite number"),
        ({"method": "rope"}, "'none', 'linear', 'ntk', 'yarn' or 'llama3'"),
        ({"method": "yarn", "beta_fast": 1.0, "beta_slow": 2.0}, "must exceed beta_slow"),
        ({"method": "llama3", "low_freq_factor": 4.0}, "must exceed low_freq_factor"),
        ({"method": "linear", "scale": 2.0}, "Extra inputs are not permitted"),
    ],
)
def test_bad_settings_are_refused_with_what_to_fix(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RopeScaling(**fields)


def test_a_run_config_sets_the_scaling_by_key_and_refuses_bad_values(make_debug_store) -> None:
    from llama_train.errors import LlamaTrainError
    from llama_train.recipe.train_config import config_to_yaml, resolve_config

    store = make_debug_store(n_train=16, n_test=4, seq_len=9)
    base = [f"data.path={store}", "model.dim=16", "model.n_heads=2"]
    config = resolve_config(
        None, [*base, "model.rope_scaling.method=yarn", "model.rope_scaling.factor=4"]
    )
    assert config.model.rope_scaling == RopeScaling(method="yarn", factor=4.0)
    assert "method: yarn" in config_to_yaml(config)  # written to config.yaml, read back
    with pytest.raises(LlamaTrainError, match=r"model.rope_scaling.factor: .*finite number"):
        resolve_config(
            None, [*base, "model.rope_scaling.method=linear", "model.rope_scaling.factor=.nan"]
        )
    with pytest.raises(LlamaTrainError, match=r"did you mean 'model.rope_scaling.factor'"):
        resolve_config(None, [*base, "model.rope_scaling.facter=2"])
