"""Training compute of a run, in the conventions scaling-law papers use.

Kaplan et al. (2020) count C = 6 N T for a forward and backward pass over T
tokens with N non-embedding parameters, plus an attention term
6 n_layers n_ctx d_model T for the score and value products (the forward pass
costs 2 n_layers n_ctx d_model per token, the backward twice that). n_ctx is
the full context, as in the paper: causal masking halves the useful work but a
dense kernel still computes it. The attention term matters for small models on
long sequences, which is exactly the regime of a laptop study.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Compute:
    """FLOPs of a training run: 6ND, the attention term, and their sum."""

    flops_6nd: float
    flops_attention: float

    @property
    def flops(self) -> float:
        return self.flops_6nd + self.flops_attention

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "flops": self.flops}


def training_compute(
    *, non_embedding_parameters: int, n_layers: int, dim: int, context: int, tokens: int
) -> Compute:
    """FLOPs to train on `tokens` predicted tokens with sequences of `context` inputs."""
    return Compute(
        flops_6nd=6.0 * non_embedding_parameters * tokens,
        flops_attention=6.0 * n_layers * context * dim * tokens,
    )
