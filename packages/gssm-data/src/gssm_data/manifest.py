"""The manifest: the only description of a store, kept in its Zarr group attributes.

It is also the contract with the trainer (``llama-train`` validates its config
against ``vocab_size`` and ``seq_len`` here), so its field names are stable and
a change to them bumps :data:`FORMAT_VERSION`.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from gssm_data.graph import GraphSpec

# Bump when the bytes produced for a given spec and seed change (sampler,
# kernels, block size, layout). Part of the fingerprint.
# 2: fixed kernels drawn by "gamma-inverse-cdf" (continuous in alpha), see kernels.py.
FORMAT_VERSION = 2


class EntropyStats(BaseModel):
    """Entropy of the next token given its prefix, averaged over a set of sequences.

    Positions are 1 .. seq_len-1 (position 0 is the fixed start token and is
    never predicted). `method` says whether the figure is exact (forward
    algorithm on the stored conditionals) or a Monte Carlo estimate (a
    `transition` graph, whose kernels are drawn per sequence).
    """

    model_config = ConfigDict(extra="forbid")

    method: Literal["exact", "monte-carlo"]
    nats_per_token: float
    bits_per_token: float
    stderr: float = Field(description="standard error of nats_per_token over sequences")
    n_sequences: int
    per_position: list[float] = Field(description="mean nats at positions 1 .. seq_len-1")
    note: str = ""
    # The standard error (bits) the measurement stopped at: the first n_sequences
    # sequences whose mean is that precise. None: a fixed number (older stores).
    target_stderr_bits: float | None = None

    @property
    def stderr_bits(self) -> float:
        return self.stderr / math.log(2)

    @classmethod
    def from_nats(
        cls,
        method: Literal["exact", "monte-carlo"],
        per_sequence_mean: list[float] | tuple[float, ...],
        per_position: list[float],
        note: str = "",
    ) -> EntropyStats:
        n = len(per_sequence_mean)
        mean = math.fsum(per_sequence_mean) / n
        variance = math.fsum((x - mean) ** 2 for x in per_sequence_mean) / max(n - 1, 1)
        return cls(
            method=method,
            nats_per_token=mean,
            bits_per_token=mean / math.log(2),
            stderr=math.sqrt(variance / n),
            n_sequences=n,
            per_position=per_position,
            note=note,
        )


class Baselines(BaseModel):
    """Easy upper bounds on the entropy, in bits per token."""

    model_config = ConfigDict(extra="forbid")

    unigram_bits: float
    zstd_bits: float
    gzip_bits: float


class SplitInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(ge=0, description="number of sequences")
    blocks: int = Field(ge=0, description="number of sampler blocks (= zarr chunks along rows)")
    entropy: EntropyStats | None = None
    baselines: Baselines | None = None


class Parent(BaseModel):
    """The store a derived store was made from (`gssm-data extend`): same graph tables.

    `fingerprint` and `seq_len` identify the parent's process and length; `path`
    is where it was when the child was made, for people (stores move).
    """

    model_config = ConfigDict(extra="forbid")

    fingerprint: str
    seq_len: int
    path: str


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    package_version: str
    name: str = Field(description="preset or graph-file name the store was made from")
    fingerprint: str
    graph: GraphSpec
    seed: int
    seq_len: int
    vocab_size: int
    token_dtype: str
    block_size: int
    with_latents: bool
    # How the fixed kernels were drawn (gssm_data.kernels); absent in version 1.
    kernel_draw: Literal["gamma-inverse-cdf", "numpy-dirichlet"] = "numpy-dirichlet"
    splits: dict[str, SplitInfo]
    created_at: str
    complete: bool = False
    # Set by `gssm-data extend`: the store whose conditional tables this one was drawn from.
    parent: Parent | None = None


def fingerprint(graph: GraphSpec, seed: int, seq_len: int, block_size: int) -> str:
    """Hash of everything that decides the bytes of a block (not the split sizes).

    Split sizes are left out on purpose: a store of n sequences is a prefix of
    one of 10n, and both share a fingerprint.
    """
    canonical = {
        "format_version": FORMAT_VERSION,
        "graph": graph.model_dump(mode="json", exclude={"description"}),
        "seed": seed,
        "seq_len": seq_len,
        "block_size": block_size,
    }
    payload = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
