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
from typing import Protocol


class ModelShape(Protocol):
    """What a parameter count reads of a model config (`core.model.ModelConfig` has it)."""

    @property
    def dim(self) -> int: ...
    @property
    def n_layers(self) -> int: ...
    @property
    def n_heads(self) -> int: ...
    @property
    def kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def hidden_dim(self) -> int: ...
    @property
    def vocab_size(self) -> int | None: ...
    @property
    def tie_embeddings(self) -> bool: ...


def parameter_count(
    model: ModelShape, *, vocab_size: int | None = None, exclude_embeddings: bool = False
) -> int:
    """`Llama.num_parameters` in closed form: no model built, no torch imported.

    The one formula for memory estimates, exports and study shapes. Per block:
    q, k, v (n_heads + 2 kv_heads heads of head_dim), the attention output,
    SwiGLU's three matrices and two RMSNorm weights; then the final norm, the
    output projection and the input embedding (a tied matrix counts once).
    `exclude_embeddings` drops the input embedding only (Kaplan et al.'s
    non-embedding N): the output projection is a matmul per token, so a tied
    matrix stays in. `vocab_size` stands in for a config that leaves it to the data.
    """
    vocab = model.vocab_size if vocab_size is None else vocab_size
    if vocab is None:
        raise ValueError("a parameter count needs the vocabulary size")
    dim, heads = model.dim, model.n_heads
    attention = dim * (heads + 2 * model.kv_heads) * model.head_dim + heads * model.head_dim * dim
    block = attention + 3 * dim * model.hidden_dim + 2 * dim
    embedding = 0 if model.tie_embeddings or exclude_embeddings else vocab * dim
    return model.n_layers * block + dim + vocab * dim + embedding


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
