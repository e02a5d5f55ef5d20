"""Rotary frequencies, and the published ways of stretching them past the training length.

A model trained on sequences of length L has only seen rotary angles
``position * f_i`` with position < L. Evaluating it on longer sequences either
extrapolates those angles (method ``none``) or rescales the frequencies so
that the longer positions map back into, or near, the trained range. Every
method here is a pure function: frequencies in (float64, one per channel
pair, highest first), frequencies out, plus the attention temperature for
YaRN. Nothing here knows about a model; ``model.rotary_tables`` applies them.

References (s = factor, D = head dimension, pair i = 0 .. D/2-1, L = the
original training length, f_i = theta^(-2i/D), rotations r_i = L f_i / 2 pi):

1) ``linear``: position interpolation (Chen et al., 2023, "Extending Context
   Window of Large Language Models via Positional Interpolation"): f_i / s.
2) ``ntk``: NTK-aware scaling (bloc97, 2023; YaRN paper eq. 16): a new base
   theta' = theta * s^(D/(D-2)), i.e. f_i * s^(-2i/(D-2)): the highest
   frequency is kept, the lowest divided by s, a geometric blend in between.
3) ``yarn``: YaRN (Peng et al., 2023, eqs. 17-22) as Hugging Face's
   ``_compute_yarn_parameters`` and the authors' reference code compute it:
   NTK-by-parts, f_i' = (1 - g_i) f_i / s + g_i f_i, where g_i ramps linearly
   in the *pair index* i, from 1 (kept) at pair lo = floor(d(beta_fast)) to 0
   (interpolated) at pair hi = ceil(d(beta_slow)), with d(r) the fractional
   pair index at which a pair turns r times over L (lo clamped to >= 0, hi to
   <= D - 1, as the reference does); plus the attention temperature
   sqrt(1/t) = 0.1 ln(s) + 1, which multiplies queries and keys (logits by its
   square). The paper's equations ramp linearly in the rotations r_i instead;
   r_i is geometric in i, so the two ramps disagree across the whole ramp, not
   only at its rounded ends (the paper's frequencies are up to 63% lower for
   D = 16, L = 128, s = 8). Only the reference's form is implemented, so a
   model exported to or loaded from the ecosystem behaves the same.
4) ``llama3``: Llama 3.1's rule (Meta's ``apply_scaling``): wavelengths
   2 pi / f_i shorter than L / high_freq_factor keep f_i, longer than
   L / low_freq_factor become f_i / s, and in between
   (1 - k) f_i / s + k f_i with k = (L / wavelength - low) / (high - low).
   Since L / wavelength = r_i, it is NTK-by-parts with a ramp from
   low_freq_factor to high_freq_factor rotations and no temperature.

With s = 1 every method returns the frequencies unchanged and a temperature of 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

RopeMethod = Literal["none", "linear", "ntk", "yarn", "llama3"]
ROPE_METHODS: tuple[str, ...] = ("none", "linear", "ntk", "yarn", "llama3")


class ScaledFrequencies(NamedTuple):
    """Rotary frequencies after scaling, and the factor queries and keys are multiplied by."""

    inv_freq: Tensor  # (head_dim / 2,) float64
    attention_factor: float


def rotary_frequencies(head_dim: int, theta: float) -> Tensor:
    """f_i = theta^(-2i / head_dim) for the head_dim / 2 channel pairs, float64, highest first."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    return theta**-exponents


def linear_scaling(inv_freq: Tensor, factor: float) -> Tensor:
    """Position interpolation: every frequency divided by the factor."""
    return inv_freq / factor


def ntk_scaling(inv_freq: Tensor, factor: float) -> Tensor:
    """NTK-aware scaling: the base theta becomes theta * factor^(D/(D-2)).

    On frequencies theta^(-2i/D) that is f_i * factor^(-2i/(D-2)), D = 2 * len(inv_freq).
    With a single pair (D = 2) the only frequency is the highest, which the
    rule keeps.
    """
    n_pairs = inv_freq.shape[-1]
    if n_pairs == 1:
        return inv_freq.clone()
    pair = torch.arange(n_pairs, dtype=torch.float64)
    return inv_freq * factor ** (-2 * pair / (2 * n_pairs - 2))


def _by_parts(
    inv_freq: Tensor, factor: float, original_length: int, low: float, high: float
) -> Tensor:
    """Keep pairs turning more than `high` times over the original length, divide those
    turning fewer than `low` times by the factor, and ramp linearly in between."""
    rotations = original_length * inv_freq / (2 * math.pi)
    keep = ((rotations - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - keep) * inv_freq / factor + keep * inv_freq


def yarn_attention_factor(factor: float) -> float:
    """YaRN's sqrt(1/t) = 0.1 ln(s) + 1 (1 for s <= 1)."""
    return 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0


def yarn_scaling(
    inv_freq: Tensor,
    factor: float,
    original_length: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> ScaledFrequencies:
    """YaRN as the reference code computes it: a ramp in the pair index between the
    pairs turning beta_fast and beta_slow times over the original length (module
    docstring), and the attention temperature."""
    n_pairs = inv_freq.shape[-1]
    if n_pairs == 1:  # the one pair turns fastest, which the ramp keeps
        return ScaledFrequencies(inv_freq.clone(), yarn_attention_factor(factor))
    # Frequencies are geometric in the pair index, so log rotations are linear in it.
    log_step = math.log(inv_freq[1].item() / inv_freq[0].item())
    log_first = math.log(original_length * inv_freq[0].item() / (2 * math.pi))

    def pair_turning(rotations: float) -> float:
        return (math.log(rotations) - log_first) / log_step

    low = max(math.floor(pair_turning(beta_fast)), 0)
    high = min(math.ceil(pair_turning(beta_slow)), 2 * n_pairs - 1)
    if high == low:
        high += 0.001  # the reference's guard against a zero-width ramp
    pair = torch.arange(n_pairs, dtype=torch.float64)
    keep = 1 - ((pair - low) / (high - low)).clamp(0.0, 1.0)
    scaled = (1 - keep) * inv_freq / factor + keep * inv_freq
    return ScaledFrequencies(scaled, yarn_attention_factor(factor))


def llama3_scaling(
    inv_freq: Tensor,
    factor: float,
    original_length: int,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
) -> Tensor:
    """Llama 3.1: keep short wavelengths, divide long ones by the factor, smooth between."""
    return _by_parts(inv_freq, factor, original_length, low_freq_factor, high_freq_factor)


class RopeScaling(BaseModel):
    """How rotary frequencies are rescaled: the `model.rope_scaling` config section.

    `method: none` (the default) leaves the frequencies as trained. A run may
    train with a scaling; `llama-train eval --rope-scaling` applies one to a
    trained model for sequences longer than it was trained on.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Annotated[
        RopeMethod, Field(description="none, linear, ntk, yarn or llama3 (see core/rope.py)")
    ] = "none"
    factor: Annotated[
        float,
        Field(ge=1, allow_inf_nan=False, description="context stretch s (1 = unchanged)"),
    ] = 1.0
    original_max_seq_len: Annotated[
        int | None,
        Field(
            gt=0,
            description="training length the factor stretches (yarn, llama3); "
            "None = model.max_seq_len",
        ),
    ] = None
    # YaRN's alpha and beta for Llama models (the paper's section 3.2).
    beta_fast: Annotated[
        float,
        Field(gt=0, allow_inf_nan=False, description="yarn: pairs turning more often are kept"),
    ] = 32.0
    beta_slow: Annotated[
        float,
        Field(gt=0, allow_inf_nan=False, description="yarn: pairs turning less are interpolated"),
    ] = 1.0
    # Llama 3.1's published settings.
    low_freq_factor: Annotated[
        float,
        Field(gt=0, allow_inf_nan=False, description="llama3: L / this = longest kept wavelength"),
    ] = 1.0
    high_freq_factor: Annotated[
        float,
        Field(gt=0, allow_inf_nan=False, description="llama3: L / this = shortest scaled one"),
    ] = 4.0

    @model_validator(mode="after")
    def _check(self) -> RopeScaling:
        if self.method == "none" and self.factor != 1:
            raise ValueError(
                f"factor {self.factor:g} has no effect with method none: choose linear, ntk, "
                "yarn or llama3, or leave factor at 1"
            )
        if self.beta_fast <= self.beta_slow:
            raise ValueError(
                f"beta_fast ({self.beta_fast:g}) must exceed beta_slow ({self.beta_slow:g})"
            )
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"high_freq_factor ({self.high_freq_factor:g}) must exceed low_freq_factor "
                f"({self.low_freq_factor:g})"
            )
        return self

    def apply(self, inv_freq: Tensor, max_seq_len: int) -> ScaledFrequencies:
        """The scaled frequencies and attention factor for a model of context `max_seq_len`."""
        original = self.original_max_seq_len or max_seq_len
        return _METHODS[self.method](self, inv_freq, original)


_Method = Callable[[RopeScaling, Tensor, int], ScaledFrequencies]
_METHODS: dict[str, _Method] = {
    "none": lambda s, f, _: ScaledFrequencies(f.clone(), 1.0),
    "linear": lambda s, f, _: ScaledFrequencies(linear_scaling(f, s.factor), 1.0),
    "ntk": lambda s, f, _: ScaledFrequencies(ntk_scaling(f, s.factor), 1.0),
    "yarn": lambda s, f, n: yarn_scaling(f, s.factor, n, s.beta_fast, s.beta_slow),
    "llama3": lambda s, f, n: ScaledFrequencies(
        llama3_scaling(f, s.factor, n, s.low_freq_factor, s.high_freq_factor), 1.0
    ),
}
