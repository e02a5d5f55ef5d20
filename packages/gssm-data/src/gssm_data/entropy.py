"""Exact next-token entropy: the forward algorithm over the joint latent state.

Because the generating distribution is known, the Bayes-optimal next-token
loss of a sequence is -log p(x_t | x_<t), the floor every training curve is
compared with (docs/design.md, section Entropy). It is computed by the forward algorithm:

- t = 0 is the fixed start: every node, the observed one included, is in
  state 0, so the forward vector starts as a point mass and token 0 is never
  predicted;
- from t = 1 each latent node moves, in topological order, with its table
  p(z_t | z_{t-1}, parents_t); then X_t is emitted from p(x_t | parents_t).

Three choices keep it fast and exact:

- scaled probability space: the forward vector is renormalised every step and
  the normaliser *is* p(x_t | x_<t), so no logsumexp is needed;
- the joint transition is never materialised: each latent's factor is applied
  as a tensor contraction over that latent's own axis (its parents' axes are
  shared indices), so a step costs O(S * sum of latent sizes), not O(S^2);
- sequences are batched, and `transition` tables (one per sequence) simply
  carry the batch axis.

Only the effective conditional tables are read (``kernels``, the store), so
``product`` and ``fullrank`` kernels and every mode are handled alike.

For `transition` graphs each sequence's kernel is drawn from a prior that an
in-context learner does not know: its Bayes loss has no closed form. What
:func:`measure_split` reports for them is the *known-kernel* (oracle) loss,
each sequence scored under its own kernel: a Monte Carlo average over kernel
draws and a lower bound on the in-context learner's loss, labelled
``monte-carlo`` with a note. :func:`bayes_transition_entropy` estimates the
unknown-kernel loss itself on short prefixes by importance averaging.
"""

from __future__ import annotations

import math
import string
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import zarr
import zstandard
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from gssm_data.common.progress import as_mode, progress_display
from gssm_data.errors import GssmDataError
from gssm_data.graph import GraphSpec
from gssm_data.kernels import draw_conditional
from gssm_data.manifest import Baselines, EntropyStats
from gssm_data.sampler import STREAMS, block_rng, state_dtype
from gssm_data.store import ENTROPY_DIMENSIONS

if TYPE_CHECKING:
    from gssm_data.store import Store

# Float64 elements of one chunk of forward vectors (B x S): 8 MiB. Bounds
# memory whatever the number of sequences, and is large enough that per-step
# Python overheads vanish.
CHUNK_ELEMENTS = 1 << 20

# Beyond this many joint latent states a single forward vector no longer fits
# sensibly in memory: the exact method is out of reach.
MAX_JOINT_STATES = 1 << 26

# A split measured to a target standard error counts at least this many sequences
# (or all it has): fewer give too rough an estimate of the standard error itself.
MIN_MEASURED_SEQUENCES = 256

# Floor of the normalised forward probabilities, applied after every step.
# States the data rules out keep shrinking (by factors like 1e-10 a step) into
# subnormal floats, which CPUs process tens of times slower; raising them to
# 1e-200 changes p(x_t | x_<t) by less than S * 1e-200 relative. The margin
# keeps a step's products (a few factors of >= 1e-10 each) above that range.
NEGLIGIBLE = 1e-200

# Compression levels of the baselines: the strongest standard settings, so that
# the figures are as tight an upper bound as these tools give.
ZSTD_LEVEL = 19
GZIP_LEVEL = 9

# Name of the per-token array inside a split group (`<split>/entropy`).
ENTROPY_ARRAY = "entropy"

# Random stream of the kernel draws of the Bayes estimate: distinct from the
# data streams, so it never reuses a sequence's own kernel.
BAYES_STREAM = 101

TRANSITION_NOTE = (
    "transition graph: each sequence is scored under its own kernel (known-kernel, oracle "
    "loss); the mean over sequences is a Monte Carlo average over kernel draws and a lower "
    "bound on the loss of a model that must infer the kernel in context"
)

Device = str | torch.device


# --------------------------------------------------------------------------
# The forward algorithm
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _LatentFactor:
    """One latent node's factor of the joint transition, applied as an einsum."""

    equation: str  # (B, *latents) x table -> (B, *latents) with this latent renewed
    name: str


@dataclass(frozen=True)
class _EmissionLayout:
    """How to turn p(x_t | parents_t) into a likelihood over the joint state.

    `permutation` reorders the table (parents in declared order, x) into
    (x, parents in latent-axis order), with a leading batch axis for a
    per-sequence table; one looked-up slice is then reshaped to `shape`, which
    broadcasts onto the forward vector (B, *latents).
    """

    permutation: tuple[int, ...]
    shape: tuple[int, ...]
    per_sequence: bool


def _latent_factors(graph: GraphSpec) -> tuple[_LatentFactor, ...]:
    """Einsum equations of the latents' factors, in update (topological) order.

    Letters: 'a' is the batch, lower case the latents' current states and upper
    case a latent's next state. A factor sums its latent's previous state out
    and writes the next one in the same position; its parents' axes, already
    renewed (parents come first), are shared indices of the contraction.
    """
    latents = graph.latents
    if len(latents) > 25:
        raise GssmDataError(
            f"the graph has {len(latents)} latent nodes; the exact forward algorithm "
            "supports at most 25"
        )
    old = {node.name: string.ascii_lowercase[1 + i] for i, node in enumerate(latents)}
    new = {node.name: string.ascii_uppercase[1 + i] for i, node in enumerate(latents)}
    forward = "a" + "".join(old[node.name] for node in latents)
    factors = []
    for node in latents:
        per_sequence = node.mode == "transition"
        table = (
            ("a" if per_sequence else "")
            + old[node.name]
            + "".join(old[parent] for parent in node.parents)
            + new[node.name]
        )
        renewed = forward.replace(old[node.name], new[node.name])
        factors.append(_LatentFactor(f"{forward},{table}->{renewed}", node.name))
    return tuple(factors)


def _emission_layout(graph: GraphSpec) -> _EmissionLayout:
    observed = graph.observed
    axis = {node.name: i for i, node in enumerate(graph.latents)}
    parents = sorted(range(len(observed.parents)), key=lambda k: axis[observed.parents[k]])
    per_sequence = observed.mode == "transition"
    offset = 1 if per_sequence else 0
    permutation = (
        *((0,) if per_sequence else ()),
        offset + len(observed.parents),
        *(offset + k for k in parents),
    )
    parent_names = set(observed.parents)
    shape = (-1, *(node.states if node.name in parent_names else 1 for node in graph.latents))
    return _EmissionLayout(permutation, shape, per_sequence)


def _to_torch(
    graph: GraphSpec, tables: Mapping[str, np.ndarray], device: torch.device
) -> dict[str, torch.Tensor]:
    """Float64 tensors of some nodes' tables; the observed one laid out for lookups."""
    layout = _emission_layout(graph)
    tensors = {}
    for name, table in tables.items():
        tensor = torch.as_tensor(np.ascontiguousarray(table), dtype=torch.float64).to(device)
        if name == graph.observed.name:
            tensor = tensor.permute(layout.permutation).contiguous()
        tensors[name] = tensor
    return tensors


# Called by `_forward` after each step with (t, alpha): alpha (B, *latent sizes) is the
# normalised forward vector, the filtered posterior p(z_t | x_<=t). It is updated in place by
# the next step: a callback copies or reduces what it keeps.
StepCallback = Callable[[int, torch.Tensor], None]


def _forward(
    graph: GraphSpec,
    tables: Mapping[str, torch.Tensor],
    tokens: torch.Tensor,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """p(x_t | x_<t) for t = 1 .. T-1 of a batch of sequences, shape (B, T-1).

    `tables` comes from :func:`_to_torch`: every node's table, per-sequence
    ones with the batch axis first. `on_step` sees the filtered posterior of
    every step (``gssm_data.posterior``); the entropy passes None and pays one
    test per step for it.
    """
    n_seq, n_steps = tokens.shape
    sizes = tuple(node.states for node in graph.latents)
    factors = _latent_factors(graph)
    layout = _emission_layout(graph)
    emission = tables[graph.observed.name]
    rows = torch.arange(n_seq, device=tokens.device)
    alpha = torch.zeros((n_seq, *sizes), dtype=torch.float64, device=tokens.device)
    alpha[(slice(None), *(0 for _ in sizes))] = 1.0  # the fixed start: every latent in 0
    norms = torch.empty((n_seq, max(n_steps - 1, 0)), dtype=torch.float64, device=tokens.device)
    norm_shape = (n_seq, *(1 for _ in sizes))
    for t in range(1, n_steps):
        for factor in factors:  # (B, *sizes): predicted p(z_t | x_<t), one latent at a time
            alpha = torch.einsum(factor.equation, alpha, tables[factor.name])
        token = tokens[:, t]
        likelihood = emission[rows, token] if layout.per_sequence else emission[token]
        alpha = alpha.mul_(likelihood.reshape(layout.shape))  # p(z_t, x_t | x_<t)
        norm = alpha.reshape(n_seq, -1).sum(dim=1)  # (B,) p(x_t | x_<t)
        alpha = alpha.div_(norm.reshape(norm_shape)).clamp_min_(NEGLIGIBLE)
        norms[:, t - 1] = norm
        if on_step is not None:
            on_step(t, alpha)
    return norms


def auto_device() -> str:
    """ "cuda" when a GPU is visible, else "cpu": the default of the store-level functions."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_device(device: Device) -> torch.device:
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise GssmDataError(f"device {device!r} requested but CUDA is not available; use 'cpu'")
    return resolved


def _check_tables(
    graph: GraphSpec,
    conditionals: Mapping[str, np.ndarray],
    transition_kernels: Mapping[str, np.ndarray] | None,
    n_sequences: int,
) -> None:
    for node in graph.nodes:
        expected = graph.table_shape(node.name)
        if node.mode == "transition":
            if transition_kernels is None or node.name not in transition_kernels:
                raise GssmDataError(
                    f"node {node.name!r} is in `transition` mode: pass its per-sequence "
                    "kernels as transition_kernels (BlockSampler.transition_kernels gives "
                    "those of stored sequences)"
                )
            shape = transition_kernels[node.name].shape
            if shape != (n_sequences, *expected):
                raise GssmDataError(
                    f"transition kernel of {node.name!r} has shape {shape}, expected "
                    f"{(n_sequences, *expected)} (one table per sequence)"
                )
        else:
            if node.name not in conditionals:
                raise GssmDataError(f"no conditional table for node {node.name!r}")
            shape = conditionals[node.name].shape
            if shape != expected:
                raise GssmDataError(
                    f"conditional of {node.name!r} has shape {shape}, expected {expected}"
                )


def _check_tokens(graph: GraphSpec, tokens: np.ndarray) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise GssmDataError(
            f"tokens must be a 2-D array (sequences, positions), got {tokens.shape}"
        )
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise GssmDataError(f"tokens must be integers, got dtype {tokens.dtype}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= graph.vocab_size):
        raise GssmDataError(
            f"tokens must lie in 0 .. {graph.vocab_size - 1} (the graph's vocabulary); "
            f"found {tokens.min()} .. {tokens.max()}"
        )
    if tokens.size and np.any(tokens[:, 0] != 0):
        raise GssmDataError(
            "position 0 of every sequence must be the fixed start token 0; pass whole "
            "sequences as stored (the first token is never predicted)"
        )
    return tokens.astype(np.int64, copy=False)


def default_batch_size(graph: GraphSpec) -> int:
    """Sequences per forward chunk: as many as fit :data:`CHUNK_ELEMENTS` states."""
    return max(1, CHUNK_ELEMENTS // graph.joint_latent_states)


def sequence_entropy(
    graph: GraphSpec,
    conditionals: Mapping[str, np.ndarray],
    tokens: np.ndarray,
    *,
    transition_kernels: Mapping[str, np.ndarray] | None = None,
    device: Device = "cpu",
    batch_size: int | None = None,
) -> np.ndarray:
    """-log p(x_t | x_<t) in nats for every sequence and t = 1 .. T-1, shape (B, T-1).

    `tokens` (B, T) are whole sequences starting with the fixed start token 0.
    `conditionals` are the effective tables of the non-`transition` nodes
    (``Store.conditionals()``, ``kernels.draw_kernels``); `transition_kernels`
    gives, for each `transition` node, one table per sequence, shape
    (B, *table_shape). Work is float64 on `device` (``"cpu"``, ``"cuda"``), in
    chunks of `batch_size` sequences (default: :func:`default_batch_size`).
    """
    tokens = _check_tokens(graph, tokens)
    n_seq, n_steps = tokens.shape
    _check_tables(graph, conditionals, transition_kernels, n_seq)
    if graph.joint_latent_states > MAX_JOINT_STATES:
        raise GssmDataError(
            f"the joint latent space has {graph.joint_latent_states:,} states, more than the "
            f"exact forward algorithm handles ({MAX_JOINT_STATES:,}); use fewer latent states"
        )
    if batch_size is not None and batch_size < 1:
        raise GssmDataError(f"batch_size must be at least 1, got {batch_size}")
    torch_device = _torch_device(device)
    chunk = batch_size or default_batch_size(graph)
    fixed = _to_torch(graph, conditionals, torch_device)
    result = np.empty((n_seq, max(n_steps - 1, 0)), dtype=np.float64)
    for start in range(0, n_seq, chunk):
        stop = min(start + chunk, n_seq)
        own = {name: table[start:stop] for name, table in (transition_kernels or {}).items()}
        tables = fixed | _to_torch(graph, own, torch_device)
        chunk_tokens = torch.tensor(tokens[start:stop], device=torch_device)
        result[start:stop] = (-torch.log(_forward(graph, tables, chunk_tokens))).cpu().numpy()
    return result


# --------------------------------------------------------------------------
# The unknown-kernel (Bayes) loss of `transition` graphs, by importance averaging
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class BayesEstimate:
    """Importance-sampling estimate of the unknown-kernel loss of a `transition` graph.

    `nats[b, t-1]` estimates -log p(x_t | x_<t) with the kernel integrated out
    under its prior: -log of (mean over K prior draws of p(x_1..t | kernel))
    divided by the same for t-1. The log of a mean is biased low (Jensen), more
    so as the importance weights degenerate, so the cumulative loss over a
    prefix is biased *high*; `effective_draws[b, t-1]` (the effective sample
    size of the weights, 1 .. K) says how far to trust each position.
    """

    nats: np.ndarray  # (B, positions)
    effective_draws: np.ndarray  # (B, positions)
    n_kernels: int


def bayes_transition_entropy(
    graph: GraphSpec,
    conditionals: Mapping[str, np.ndarray],
    tokens: np.ndarray,
    *,
    n_kernels: int = 1024,
    seed: int = 0,
    device: Device = "cpu",
) -> BayesEstimate:
    """Estimate the in-context learner's Bayes loss on (short) sequences of a transition graph.

    For every sequence, `n_kernels` kernels of the `transition` nodes are drawn
    from their prior (the same law the sampler draws from, with a generator
    seeded by `seed` only) and the sequence is scored under each by the exact
    forward algorithm. Cost is `n_kernels` times that of the known-kernel loss:
    keep sequences short (a few dozen positions), where the estimate is
    reliable anyway.
    """
    if not graph.has_transition:
        raise GssmDataError("the graph has no `transition` node: its loss is exact, use entropy")
    if n_kernels < 1:
        raise GssmDataError(f"n_kernels must be at least 1, got {n_kernels}")
    tokens = _check_tokens(graph, tokens)
    n_seq, n_steps = tokens.shape
    rng = block_rng(seed, BAYES_STREAM, 0)
    nats = np.empty((n_seq, max(n_steps - 1, 0)))
    effective = np.empty_like(nats)
    for b in range(n_seq):
        kernels = {
            node.name: draw_conditional(graph, node, rng, batch=(n_kernels,))
            for node in graph.nodes
            if node.mode == "transition"
        }
        repeated = np.repeat(tokens[b : b + 1], n_kernels, axis=0)
        per_draw = sequence_entropy(
            graph, conditionals, repeated, transition_kernels=kernels, device=device
        )
        log_joint = -np.cumsum(per_draw, axis=1)  # (K, T-1): log p(x_1..t | kernel k)
        top = log_joint.max(axis=0)
        weights = np.exp(log_joint - top)
        log_mean = top + np.log(weights.mean(axis=0))
        nats[b] = -np.diff(log_mean, prepend=0.0)
        effective[b] = weights.sum(axis=0) ** 2 / (weights**2).sum(axis=0)
    return BayesEstimate(nats=nats, effective_draws=effective, n_kernels=n_kernels)


# --------------------------------------------------------------------------
# Baselines: easy upper bounds a reader understands
# --------------------------------------------------------------------------


class _BaselineAccumulator:
    """Unigram counts and streaming zstd / gzip sizes of the predicted tokens.

    Positions 1 .. T-1 only (the fixed start token is not predicted), so the
    figures compare with the entropy per predicted token. Streaming keeps
    memory bounded and gives the same sizes as compressing all at once.
    """

    def __init__(self, vocab_size: int) -> None:
        self.counts = np.zeros(vocab_size, dtype=np.int64)
        self.dtype = state_dtype(vocab_size)
        self._zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
        self._gzip = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # 31: gzip container
        self._zstd_bytes = 0
        self._gzip_bytes = 0

    def add(self, tokens: np.ndarray) -> None:
        predicted = np.ascontiguousarray(tokens[:, 1:], dtype=self.dtype)
        self.counts += np.bincount(predicted.reshape(-1), minlength=self.counts.size)
        data = predicted.tobytes()
        self._zstd_bytes += len(self._zstd.compress(data))
        self._gzip_bytes += len(self._gzip.compress(data))

    def result(self) -> Baselines:
        n_tokens = int(self.counts.sum())
        if n_tokens == 0:
            raise GssmDataError("no predicted tokens: sequences need at least 2 positions")
        zstd_bytes = self._zstd_bytes + len(self._zstd.flush())
        gzip_bytes = self._gzip_bytes + len(self._gzip.flush())
        frequencies = self.counts[self.counts > 0] / n_tokens
        return Baselines(
            unigram_bits=float(-(frequencies * np.log2(frequencies)).sum()),
            zstd_bits=8.0 * zstd_bytes / n_tokens,
            gzip_bits=8.0 * gzip_bytes / n_tokens,
        )


def baselines(tokens: np.ndarray, *, vocab_size: int | None = None) -> Baselines:
    """Unigram entropy and zstd / gzip compressed size, bits per predicted token.

    Tokens are (B, T) whole sequences; positions 1 .. T-1 are counted. The
    unigram figure is the plug-in entropy of the token frequencies; the
    compressed sizes include the container headers.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise GssmDataError(
            f"tokens must be a 2-D array (sequences, positions), got {tokens.shape}"
        )
    accumulator = _BaselineAccumulator(vocab_size or int(tokens.max(initial=0)) + 1)
    accumulator.add(tokens)
    return accumulator.result()


# --------------------------------------------------------------------------
# Stores: entropy of stored splits, of arbitrary tokens, and the per-token array
# --------------------------------------------------------------------------


def entropy_stats(per_token: np.ndarray, *, transition: bool = False) -> EntropyStats:
    """Summarise per-token nats (B, T-1) as EntropyStats: mean, stderr, per-position curve.

    `transition` labels the figure `monte-carlo` (known-kernel loss averaged
    over the sequences' kernel draws) with :data:`TRANSITION_NOTE`.
    """
    if per_token.size == 0:
        raise GssmDataError("no predicted tokens: sequences need at least 2 positions")
    return _stats(per_token.mean(axis=1), per_token.mean(axis=0), transition=transition)


def _stats(
    sequence_means: np.ndarray, per_position: np.ndarray, *, transition: bool
) -> EntropyStats:
    return EntropyStats.from_nats(
        "monte-carlo" if transition else "exact",
        sequence_means.tolist(),
        per_position.tolist(),
        note=TRANSITION_NOTE if transition else "",
    )


def tokens_entropy(
    store: Store,
    tokens: np.ndarray,
    *,
    transition_kernels: Mapping[str, np.ndarray] | None = None,
    device: Device | None = None,
) -> np.ndarray:
    """-log p(x_t | x_<t) (B, T-1) of arbitrary sequences under a store's graph.

    For model samples or edited sequences: the store's graph and conditionals
    are the reference distribution. A `transition` graph needs the kernels to
    score against (:func:`rows_entropy` finds those of stored rows).
    """
    return sequence_entropy(
        store.graph,
        store.conditionals(),
        tokens,
        transition_kernels=transition_kernels,
        device=device or auto_device(),
    )


def _split_size(store: Store, split: str) -> int:
    splits = store.manifest.splits
    if split not in splits:
        raise GssmDataError(
            f"store {store.path} has no split {split!r}; splits: {', '.join(splits) or 'none'}"
        )
    return splits[split].n


def iter_split_entropy(
    store: Store,
    split: str,
    *,
    start: int = 0,
    stop: int | None = None,
    device: Device | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (first row, tokens (rows, T), nats (rows, T-1)) over rows start .. stop.

    Walks the split one sampler block (= one zarr chunk) at a time, so memory
    stays bounded; the rows of a `transition` split are scored under the
    kernels the sampler drew them with.
    """
    n = _split_size(store, split)
    stop = n if stop is None else min(stop, n)
    if not 0 <= start <= stop:
        raise GssmDataError(f"row range {start}..{stop} is not within 0..{n}")
    if store.graph.has_transition and split not in STREAMS:
        raise GssmDataError(f"split {split!r} has no sampler stream; expected one of {STREAMS}")
    device = device or auto_device()
    block_size = store.manifest.block_size
    conditionals = store.conditionals()
    sampler = store.sampler() if store.graph.has_transition else None
    tokens = store.tokens(split)
    # Rows are scored in pieces of one forward chunk, aligned on the block, so a
    # progress bar moves every few seconds and the figures do not depend on `start`.
    piece = min(default_batch_size(store.graph), block_size)
    row = start
    while row < stop:
        block = row // block_size
        first, end = block * block_size, min((block + 1) * block_size, stop)
        read_from, block_tokens = row, np.asarray(tokens[row:end])
        drawn = {}
        if sampler is not None:
            drawn = sampler.transition_kernels(STREAMS[split], block)
        while row < end:
            piece_end = min(first + ((row - first) // piece + 1) * piece, end)
            within = slice(row - first, piece_end - first)
            kernels = {name: table[within] for name, table in drawn.items()}
            piece_tokens = block_tokens[row - read_from : piece_end - read_from]
            nats = sequence_entropy(
                store.graph, conditionals, piece_tokens, transition_kernels=kernels, device=device
            )
            yield row, piece_tokens, nats
            row = piece_end


def rows_entropy(
    store: Store,
    split: str,
    start: int = 0,
    stop: int | None = None,
    *,
    device: Device | None = None,
) -> np.ndarray:
    """-log p(x_t | x_<t) (rows, T-1) of stored rows start .. stop of a split.

    Computed afresh (a `transition` split under each sequence's own kernel);
    ``Store.per_token_entropy`` reads the values :func:`write_split_entropy`
    stored instead.
    """
    blocks = iter_split_entropy(store, split, start=start, stop=stop, device=device)
    parts = [nats for _, _, nats in blocks]
    if not parts:
        return np.empty((0, store.manifest.seq_len - 1))
    return np.concatenate(parts)


@contextmanager
def _progress(description: str, total: int, quiet: bool) -> Iterator[Progress]:
    """Sequences done, elapsed, ETA: a bar on a terminal, lines in a log; silent if quiet."""
    progress = progress_display(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("sequences"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
        mode=as_mode(not quiet),
    )
    with progress:
        progress.add_task(description, total=total)
        yield progress


def _measure(
    store: Store,
    split: str,
    *,
    stop: int | None,
    quiet: bool,
    device: Device | None,
    write_to: zarr.Array | None = None,
    stderr_bits: float | None = None,
    minimum: int = MIN_MEASURED_SEQUENCES,
) -> tuple[EntropyStats, Baselines]:
    """One pass over a split: entropy statistics, baselines, optionally the per-token array.

    With `stderr_bits`, the pass stops at the first sequence count n (at least
    `minimum`) whose mean has a standard error of at most that many bits; the
    figures, baselines included, are those of the first n sequences.
    """
    n = _split_size(store, split)
    stop = n if stop is None else min(stop, n)
    seq_len = store.manifest.seq_len
    if stop == 0 or seq_len < 2:
        raise GssmDataError(f"split {split!r} has no predicted tokens to measure")
    sequence_means: list[np.ndarray] = []
    position_sums = np.zeros(seq_len - 1)
    accumulator = _BaselineAccumulator(store.graph.vocab_size)
    block_size = store.manifest.block_size
    pending: list[np.ndarray] = []  # pieces of the block being written: whole-chunk writes
    measured = 0
    with _progress(f"entropy of {split}", stop, quiet) as progress:
        for row, tokens, nats in iter_split_entropy(store, split, stop=stop, device=device):
            end = row + len(nats)
            if write_to is not None:
                pending.append(nats.astype(np.float32))
                if end % block_size == 0 or end == stop:
                    rows = sum(len(part) for part in pending)
                    write_to[end - rows : end] = np.concatenate(pending)
                    pending = []
            means = nats.mean(axis=1)
            enough = None
            if stderr_bits is not None:
                enough = _precise_count(sequence_means, means, stderr_bits, minimum)
            take = len(nats) if enough is None else enough - row
            sequence_means.append(means[:take])
            position_sums += nats[:take].sum(axis=0)
            accumulator.add(tokens[:take])
            measured = row + take
            progress.advance(progress.task_ids[0], len(nats))
            if enough is not None:
                break
    transition = store.graph.has_transition
    stats = _stats(np.concatenate(sequence_means), position_sums / measured, transition=transition)
    if stderr_bits is not None:
        stats = stats.model_copy(update={"target_stderr_bits": stderr_bits})
    return stats, accumulator.result()


def _precise_count(
    earlier: list[np.ndarray], means: np.ndarray, stderr_bits: float, minimum: int
) -> int | None:
    """The first count n >= `minimum` of sequences (earlier pieces, then `means`) whose
    mean's standard error is at most `stderr_bits`; None if none within these."""
    values = np.concatenate([*earlier, means]) if earlier else means
    first = len(values) - len(means)
    counts = np.arange(1, len(values) + 1)
    shifted = values - values[0]  # fewer cancellations in the running variance
    sums, squares = np.cumsum(shifted), np.cumsum(shifted**2)
    variance = (squares - sums**2 / counts) / np.maximum(counts - 1, 1)
    stderr = np.sqrt(np.maximum(variance, 0.0) / counts) / math.log(2)
    ok = (counts > max(first, minimum - 1)) & (counts >= 2) & (stderr <= stderr_bits)
    hits = np.flatnonzero(ok)
    return int(counts[hits[0]]) if hits.size else None


def measure_split(
    store: Store,
    split: str,
    *,
    max_sequences: int | None = None,
    stderr_bits: float | None = None,
    quiet: bool = False,
    device: Device | None = None,
) -> tuple[EntropyStats, Baselines]:
    """Entropy (exact, or the known-kernel Monte Carlo figure) and baselines of a split.

    Over all sequences, or the first `max_sequences`, or, with `stderr_bits`,
    the first ones (at least :data:`MIN_MEASURED_SEQUENCES`) whose mean has a
    standard error of at most that many bits: mean nats and bits per predicted
    token, its standard error over sequences, the per-position mean curve; and
    the unigram / zstd / gzip bits per token of the same tokens.
    """
    if max_sequences is not None and max_sequences < 1:
        raise GssmDataError(f"max_sequences must be at least 1, got {max_sequences}")
    if stderr_bits is not None and not stderr_bits > 0:
        raise GssmDataError(f"the target standard error must be positive, got {stderr_bits}")
    return _measure(
        store, split, stop=max_sequences, quiet=quiet, device=device, stderr_bits=stderr_bits
    )


def write_split_entropy(
    store: Store, split: str, *, quiet: bool = False, device: Device | None = None
) -> tuple[EntropyStats, Baselines]:
    """Write `<split>/entropy` (n, seq_len-1) float32 and record the figures in the manifest.

    The array holds -log p(x_t | x_<t) for every stored sequence, chunked like
    the tokens (block_size rows), so the trainer can report a model's excess
    loss sequence by sequence. Its attribute ``complete`` turns true only once
    every row is written; the manifest's entropy and baselines of the split are
    replaced by those of the whole split. Needs a store opened with mode "r+".
    """
    manifest = store.manifest
    n = _split_size(store, split)
    if n == 0:
        raise GssmDataError(f"split {split!r} has no sequences to measure")
    if store.mode != "r+":
        raise GssmDataError(f"store {store.path} is open read-only; open it with mode='r+'")
    array = store.group.require_group(split).create_array(
        ENTROPY_ARRAY,
        shape=(n, manifest.seq_len - 1),
        chunks=(manifest.block_size, manifest.seq_len - 1),
        dtype="float32",
        fill_value=float("nan"),
        overwrite=True,
        dimension_names=ENTROPY_DIMENSIONS,
        attributes={
            "complete": False,
            "units": "nats",
            "description": "-log p(x_t | x_<t) for t = 1 .. seq_len-1",
            "method": "monte-carlo" if store.graph.has_transition else "exact",
        },
    )
    stats, split_baselines = _measure(
        store, split, stop=None, quiet=quiet, device=device, write_to=array
    )
    array.attrs["complete"] = True
    splits = dict(manifest.splits)
    splits[split] = splits[split].model_copy(
        update={"entropy": stats, "baselines": split_baselines}
    )
    store.write_manifest(manifest.model_copy(update={"splits": splits}))
    return stats, split_baselines
