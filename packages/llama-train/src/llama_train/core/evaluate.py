"""Evaluation against the floor: model loss next to the exact entropy of the same sequences.

The data's generating process is known, so the best any model can do on a
sequence is its exact entropy, -log p(x_t | x_<t) summed by the forward
algorithm. An evaluation reads a fixed set of sequences (the test split, all
of it unless `eval.max_sequences` says otherwise), computes the model's mean
next-token loss over positions 1..L-1 and the exact entropy of those very
sequences, and reports the difference: the excess loss, in nats and bits,
overall and per position (the gap between the model's and the entropy's
per-position curves is what the model has yet to learn; neither curve need fall
with context, since every sequence starts from the all-zero state: docs/design.md,
section GSSM semantics).

The entropy of a set does not depend on the model: :class:`EvalSet` computes
it once, preferring, in order, the store's per-token array (`<split>/entropy`,
written by `gssm-data entropy --write`), the manifest's figures when they
cover exactly the evaluated sequences, and the forward algorithm
(`gssm_data.entropy`) otherwise.

Ranks split the sequences and sum per-position totals with an all-reduce, so
every rank returns the same result. Every rank runs the same number of forward
passes (the ranks with one sequence fewer add a discarded one), which a
sharded (FSDP) model needs: each forward gathers parameters from all ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from gssm_data import (
    BLOCK_SIZE,
    STREAMS,
    GssmDataError,
    draw_kernels,
    iter_split_entropy,
    sequence_entropy,
)
from gssm_data.common.humanize import Count
from llama_train.core import distributed
from llama_train.core.chunk_check import ChunkChecker
from llama_train.core.data import DataSpec, online_sampler
from llama_train.errors import LlamaTrainError
from llama_train.rundir import EvalRecord

LN2 = math.log(2)
# Sequences evaluated when there is no store to hold a test split (online from a
# preset or graph file) and eval.max_sequences is unset: one sampler block.
ONLINE_EVAL_SEQUENCES = BLOCK_SIZE


class EvalConfig(BaseModel):
    """Evaluation against the exact entropy (the `eval` section)."""

    model_config = ConfigDict(extra="forbid")

    every: int = Field(500, gt=0, description="steps between evaluations (also at the end)")
    max_sequences: Count | None = Field(
        None, gt=0, description="first sequences of the split to use; None = the whole split"
    )
    split: str = Field("test", description="store split to evaluate on")
    batch_size: int | None = Field(
        None, gt=0, description="sequences per forward pass; None = data.batch_size"
    )


@dataclass(frozen=True)
class EvalResult:
    """Losses of one evaluation, in nats per predicted token (positions 1..L-1)."""

    step: int
    split: str
    n_sequences: int
    loss: float
    entropy: float
    entropy_method: str
    loss_per_position: list[float]
    entropy_per_position: list[float]

    @property
    def excess(self) -> float:
        """Loss above the floor, nats per token (>= 0 up to sampling noise)."""
        return self.loss - self.entropy

    @property
    def loss_bits(self) -> float:
        return self.loss / LN2

    @property
    def entropy_bits(self) -> float:
        return self.entropy / LN2

    @property
    def excess_bits(self) -> float:
        return self.excess / LN2

    def metrics(self) -> dict[str, float | int]:
        """The scalars of a metrics.jsonl eval line (`eval/` keys)."""
        return {
            "eval/loss": self.loss,
            "eval/entropy": self.entropy,
            "eval/excess": self.excess,
            "eval/loss_bits": self.loss_bits,
            "eval/entropy_bits": self.entropy_bits,
            "eval/excess_bits": self.excess_bits,
            "eval/n_sequences": self.n_sequences,
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything, curves included, plus the derived figures (for JSON files)."""
        return asdict(self) | {
            "excess": self.excess,
            "loss_bits": self.loss_bits,
            "entropy_bits": self.entropy_bits,
            "excess_bits": self.excess_bits,
        }

    def record(self) -> EvalRecord:
        """The run directory's record of this evaluation (`eval/step_NNNNNN.json`)."""
        return EvalRecord.model_validate(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        fields = cls.__dataclass_fields__
        return cls(**{key: value for key, value in data.items() if key in fields})


def _rank_rows(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, stop) of rank `rank`: contiguous, balanced, covering 0..n."""
    return n * rank // world_size, n * (rank + 1) // world_size


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks when a process group is up; identity in a single process."""
    return distributed.all_reduce(values, "sum")


class EvalSet:
    """The sequences an evaluation reads, and their exact entropy (computed once).

    With a store: the first `max_sequences` rows (all by default) of `split`,
    or of its rows from `first` on (a validation slice at the end of the train
    split, beyond every training prefix). Online without a store: the first
    sequences of the generating process's test stream, which are the test split
    a store of the same graph and seed would hold.
    """

    def __init__(
        self,
        spec: DataSpec,
        *,
        split: str = "test",
        max_sequences: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        first: int = 0,
    ) -> None:
        self.spec = spec
        self.split = split
        self.seq_len = spec.seq_len
        if first and spec.store is None:
            raise LlamaTrainError("evaluating from a row offset needs a store")
        if spec.store is not None:
            if split not in spec.store.manifest.splits:
                known = ", ".join(spec.store.manifest.splits)
                raise LlamaTrainError(
                    f"eval.split={split!r}: the store {spec.store.path} has splits {known}"
                )
            available = spec.store.manifest.splits[split].n - first
            if available <= 0:
                raise LlamaTrainError(
                    f"the {split} split of {spec.store.path} has no rows from row {first} on"
                )
            self.n_sequences = available if max_sequences is None else min(max_sequences, available)
        else:
            if split not in STREAMS:
                raise LlamaTrainError(
                    f"eval.split={split!r}: online data has splits {', '.join(STREAMS)}"
                )
            self.n_sequences = max_sequences or ONLINE_EVAL_SEQUENCES
        if self.n_sequences == 0:
            raise LlamaTrainError(f"the {split} split has no sequences to evaluate on")
        start, stop = _rank_rows(self.n_sequences, rank, world_size)
        self.start, self.stop = first + start, first + stop
        self._entropy: tuple[np.ndarray, str] | None = None
        self._online_tokens: np.ndarray | None = None
        # Stored rows are read whole block by whole block (as zarr decodes them anyway),
        # each checked against its recorded CRC-32 like the training stream's.
        self._checker = None if spec.store is None else ChunkChecker(spec.store.path, split)

    # -- tokens --------------------------------------------------------------

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """This rank's sequences, `batch_size` at a time, each (rows, seq_len)."""
        for first in range(self.start, self.stop, batch_size):
            yield self._tokens(first, min(first + batch_size, self.stop))

    def batch_count(self, batch_size: int) -> int:
        """The most batches any rank has (ranks' shares differ by at most one sequence)."""
        share = math.ceil(self.n_sequences / distributed.world_size())
        return math.ceil(share / batch_size)

    def filler(self) -> np.ndarray:
        """One sequence for a forward pass whose losses are discarded (lockstep padding)."""
        return self._tokens(0, 1)

    def _tokens(self, start: int, stop: int) -> np.ndarray:
        if self._checker is not None:
            return self._checker.rows(start, stop)
        return self._online_rows()[start:stop]

    def _online_rows(self) -> np.ndarray:
        if self._online_tokens is None:
            sampler = online_sampler(self.spec)
            blocks = math.ceil(self.stop / sampler.block_size)
            stream = STREAMS[self.split]
            self._online_tokens = np.concatenate(
                [sampler.block(stream, block).tokens for block in range(blocks)]
            )[: self.stop]
        return self._online_tokens

    # -- entropy -------------------------------------------------------------

    def entropy_per_position(self) -> tuple[np.ndarray, str]:
        """Mean exact entropy at positions 1..L-1 over all ranks' sequences, and its source."""
        if self._entropy is None:
            # A rank that cannot read its share (a damaged chunk) stops every rank here.
            with distributed.together(f"computing the exact entropy of the {self.split} split"):
                sums, method = self._entropy_sums()
            total = _all_reduce_sum(torch.from_numpy(sums)).numpy()
            self._entropy = (total / self.n_sequences, method)
        return self._entropy

    def _entropy_sums(self) -> tuple[np.ndarray, str]:
        """Per-position sums of -log p(x_t | x_<t) over this rank's rows (float64)."""
        store = self.spec.store
        method = "known-kernel" if self.spec.graph.has_transition else "exact"
        if store is not None:
            stored = store.per_token_entropy(self.split)
            if stored is not None and stored.attrs.get("complete", True):
                return self._sum_stored(stored), f"{method} (stored per token)"
            stats = store.entropy(self.split)
            whole = self.n_sequences == store.manifest.splits[self.split].n
            single = (self.start, self.stop) == (0, self.n_sequences)
            if stats is not None and whole and single and stats.n_sequences == self.n_sequences:
                per_position = np.asarray(stats.per_position, dtype=np.float64)
                return per_position * self.n_sequences, f"{method} (manifest)"
            return self._sum_computed_store(), f"{method} (forward algorithm)"
        return self._sum_computed_online(), f"{method} (forward algorithm)"

    def _sum_stored(self, stored: Any) -> np.ndarray:
        sums = np.zeros(self.seq_len - 1)
        block = self.spec.store.manifest.block_size if self.spec.store else BLOCK_SIZE
        for first in range(self.start, self.stop, block):
            rows = np.asarray(stored[first : min(first + block, self.stop)], dtype=np.float64)
            sums += rows.sum(axis=0)
        return sums

    def _sum_computed_store(self) -> np.ndarray:
        sums = np.zeros(self.seq_len - 1)
        try:
            for _, _, nats in iter_split_entropy(
                self.spec.store, self.split, start=self.start, stop=self.stop
            ):
                sums += nats.sum(axis=0)
        except GssmDataError as error:
            raise LlamaTrainError(f"exact entropy of the eval set: {error}") from None
        return sums

    def _sum_computed_online(self) -> np.ndarray:
        sampler = online_sampler(self.spec)
        conditionals = draw_kernels(self.spec.graph, self.spec.seed)  # what the sampler draws
        stream = STREAMS[self.split]
        sums = np.zeros(self.seq_len - 1)
        for block in range(
            self.start // sampler.block_size, math.ceil(self.stop / sampler.block_size)
        ):
            first = block * sampler.block_size
            rows = slice(max(self.start - first, 0), min(self.stop - first, sampler.block_size))
            tokens = sampler.block(stream, block).tokens[rows]
            kernels = {}
            if self.spec.graph.has_transition:
                kernels = {
                    name: table[rows]
                    for name, table in sampler.transition_kernels(stream, block).items()
                }
            nats = sequence_entropy(
                self.spec.graph, conditionals, tokens, transition_kernels=kernels
            )
            sums += nats.sum(axis=0)
        return sums


def _token_losses(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """-log q(x_t | x_<t) of the model for t = 1..L-1: (B, L-1) float32."""
    logits = model(tokens[:, :-1]).logits  # (B, L-1, V)
    return F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="none")


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    eval_set: EvalSet,
    *,
    step: int,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> EvalResult:
    """Mean loss of `model` on the eval set next to the set's exact entropy.

    `amp_dtype` (bf16/fp16) runs the forward pass under autocast as training
    does; per-token losses are summed in float64 so the mean does not depend
    on the batch size beyond float32 rounding of each token's loss.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(eval_set.seq_len - 1, dtype=torch.float64, device=device)
    passes = 0
    try:
        for rows in eval_set.batches(batch_size):
            tokens = torch.from_numpy(rows.astype(np.int64)).to(device)
            with distributed.autocast(device, amp_dtype):
                losses = _token_losses(model, tokens)
            sums += losses.double().sum(dim=0)
            passes += 1
        if distributed.world_size() > 1:
            filler = torch.from_numpy(eval_set.filler().astype(np.int64)).to(device)
            for _ in range(eval_set.batch_count(batch_size) - passes):
                with distributed.autocast(device, amp_dtype):
                    _token_losses(model, filler)  # keeps a sharded model's gathers in step
    finally:
        model.train(was_training)
    loss_curve = (_all_reduce_sum(sums).cpu().numpy()) / eval_set.n_sequences
    entropy_curve, method = eval_set.entropy_per_position()
    return EvalResult(
        step=step,
        split=eval_set.split,
        n_sequences=eval_set.n_sequences,
        loss=float(loss_curve.mean()),
        entropy=float(entropy_curve.mean()),
        entropy_method=method,
        loss_per_position=loss_curve.tolist(),
        entropy_per_position=entropy_curve.tolist(),
    )
