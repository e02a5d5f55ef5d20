"""The filtered posterior p(z_t | x_<=t): what an ideal observer believes about the latents.

The forward algorithm of :mod:`gssm_data.entropy` renormalises its forward
vector after every token; that normalised vector *is* the filtered posterior
over the joint latent state. This module reads it out of the very same
``_forward`` (through its step callback), so the posterior and the entropy can
never disagree about the model (start state, parent order, floor).

- per latent node: the marginal p(z_t = s | x_<=t), shape (B, T, states);
- the joint state (all latents, row-major in topological order), shape
  (B, T, S), only when S <= :data:`MAX_JOINT_STATES` (it is S times the size
  of the tokens).

Position 0 is the fixed start (every latent in state 0): its posterior is a
point mass on state 0, kept so that positions align with the token and latent
arrays. `transition` graphs are refused: their kernel is unknown to an
observer, and the known-kernel posterior is not what a learner can track.

In a store (``gssm-data posterior``), the posterior of the first `rows`
sequences of a split is written as::

    <split>/posterior/                 group; attributes: complete, rows, nodes, joint,
                                       fingerprint, description
    <split>/posterior/marginal/<node>  (rows, seq_len, states) float32
                                       dimensions (sequence, position, state)
    <split>/posterior/joint            (rows, seq_len, S) float32, with --joint only
                                       dimensions (sequence, position, joint_state)

It is built as ``<split>/_posterior.partial`` and renamed into place once
every row is written, so a reader never sees a half-written posterior.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import zarr

from gssm_data.entropy import (
    Device,
    _check_tokens,
    _forward,
    _progress,
    _to_torch,
    _torch_device,
    auto_device,
    default_batch_size,
)
from gssm_data.errors import GssmDataError
from gssm_data.graph import GraphSpec
from gssm_data.store import COMPRESSORS

if TYPE_CHECKING:
    from gssm_data.store import Store

# Largest joint latent space whose posterior is materialised: S floats per token.
MAX_JOINT_STATES = 1024

POSTERIOR_GROUP = "posterior"
PARTIAL_GROUP = "_posterior.partial"
RETIRED_GROUP = "_posterior.old"
MARGINAL_DIMENSIONS = ("sequence", "position", "state")
JOINT_DIMENSIONS = ("sequence", "position", "joint_state")
# Elements of one stored chunk (float32): 16 MiB, whole rows, whatever the node size.
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Posterior:
    """Filtered posteriors of a batch of sequences (float64, positions 0 .. T-1)."""

    marginals: dict[str, np.ndarray]  # node -> (B, T, states)
    joint: np.ndarray | None  # (B, T, S), latents row-major in topological order


def _check_graph(graph: GraphSpec, nodes: Sequence[str] | None, joint: bool) -> list[str]:
    """The latent nodes asked for (all by default); one-line errors for what cannot be done."""
    if graph.has_transition:
        raise GssmDataError(
            "the posterior of a `transition` graph is not supported: its kernel is drawn per "
            "sequence and unknown to an observer, so there is no exact filtered posterior"
        )
    names = [node.name for node in graph.latents]
    if not names:
        raise GssmDataError("the graph has no latent nodes: there is no posterior to compute")
    chosen = list(names if nodes is None else nodes)
    unknown = [name for name in chosen if name not in names]
    if unknown:
        raise GssmDataError(
            f"{', '.join(map(repr, unknown))} is not a latent node; latent nodes: "
            f"{', '.join(names)}"
        )
    if joint and graph.joint_latent_states > MAX_JOINT_STATES:
        raise GssmDataError(
            f"the joint latent space has {graph.joint_latent_states:,} states, too many to "
            f"store its posterior (at most {MAX_JOINT_STATES:,}); use the per-node marginals"
        )
    return chosen


def filtered_posterior(
    graph: GraphSpec,
    conditionals: dict[str, np.ndarray],
    tokens: np.ndarray,
    *,
    nodes: Sequence[str] | None = None,
    joint: bool = False,
    device: Device = "cpu",
    batch_size: int | None = None,
) -> Posterior:
    """p(z_t | x_<=t) of every sequence and position t = 0 .. T-1, by the forward algorithm.

    `tokens` (B, T) are whole sequences starting with token 0; `conditionals`
    the effective tables (``Store.conditionals()``, ``kernels.draw_kernels``).
    `nodes` picks latent nodes for the marginals (default all); `joint` adds
    the posterior of the joint state. Float64 work on `device`, in chunks of
    `batch_size` sequences (default as for the entropy).
    """
    chosen = _check_graph(graph, nodes, joint)
    tokens = _check_tokens(graph, tokens)
    if batch_size is not None and batch_size < 1:
        raise GssmDataError(f"batch_size must be at least 1, got {batch_size}")
    n_seq, n_steps = tokens.shape
    sizes = {node.name: node.states for node in graph.latents}
    marginals = {name: np.zeros((n_seq, n_steps, sizes[name])) for name in chosen}
    joint_out = np.zeros((n_seq, n_steps, graph.joint_latent_states)) if joint else None
    for name in chosen:
        marginals[name][:, 0, 0] = 1.0  # the fixed start
    if joint_out is not None:
        joint_out[:, 0, 0] = 1.0
    if n_steps < 2 or n_seq == 0:
        return Posterior(marginals, joint_out)
    torch_device = _torch_device(device)
    tables = _to_torch(graph, conditionals, torch_device)
    chunk = batch_size or default_batch_size(graph)
    for start in range(0, n_seq, chunk):
        stop = min(start + chunk, n_seq)
        chunk_tokens = torch.tensor(tokens[start:stop], device=torch_device)
        collector = _Collector(graph, chosen, joint)
        _forward(graph, tables, chunk_tokens, on_step=collector)
        for name in chosen:
            marginals[name][start:stop, 1:] = collector.stacked(name)
        if joint_out is not None:
            joint_out[start:stop, 1:] = collector.stacked(None)
    return Posterior(marginals, joint_out)


class _Collector:
    """The step callback of `_forward`: keeps each step's marginals (and joint), renormalised.

    The forward vector is floored after normalisation (``entropy.NEGLIGIBLE``), so it sums
    to 1 only up to S * 1e-200; dividing by the sum makes every posterior sum to one.
    """

    def __init__(self, graph: GraphSpec, nodes: list[str], joint: bool) -> None:
        axes = {node.name: i for i, node in enumerate(graph.latents)}
        n_latents = len(graph.latents)
        self.summed_axes = {
            name: tuple(1 + i for i in range(n_latents) if i != axes[name]) for name in nodes
        }
        self.steps: dict[str | None, list[torch.Tensor]] = {name: [] for name in nodes}
        if joint:
            self.steps[None] = []

    def __call__(self, t: int, alpha: torch.Tensor) -> None:
        flat = alpha.reshape(alpha.shape[0], -1)
        total = flat.sum(dim=1, keepdim=True)
        for name, axes in self.summed_axes.items():
            marginal = alpha.sum(dim=axes) if axes else alpha.clone()
            self.steps[name].append(marginal / total)
        if None in self.steps:
            self.steps[None].append(flat / total)

    def stacked(self, name: str | None) -> np.ndarray:
        """(B, steps, states) of a node, or of the joint state for None."""
        return torch.stack(self.steps[name], dim=1).cpu().numpy()


def _split_rows(store: Store, split: str, rows: int | None) -> int:
    splits = store.manifest.splits
    if split not in splits:
        raise GssmDataError(
            f"store {store.path} has no split {split!r}; splits: {', '.join(splits) or 'none'}"
        )
    n = splits[split].n
    if rows is None:
        return n
    if not 1 <= rows <= n:
        raise GssmDataError(f"--rows {rows}: the {split} split has {n:,} sequences (1 .. {n:,})")
    return rows


def _conditionals(store: Store) -> dict[str, np.ndarray]:
    """The store's tables, or one line saying that this store cannot give a posterior."""
    if store.graph.has_transition:
        _check_graph(store.graph, None, False)
    try:
        return store.conditionals()
    except GssmDataError:
        raise GssmDataError(
            f"store {store.path} lacks the graph tables (graph/<node>/conditional) the "
            "posterior is computed from; regenerate it with this gssm-data"
        ) from None


def split_posterior(
    store: Store,
    split: str,
    start: int = 0,
    stop: int | None = None,
    *,
    nodes: Sequence[str] | None = None,
    joint: bool = False,
    device: Device | None = None,
) -> Posterior:
    """Filtered posterior of stored rows start .. stop of a split, computed afresh."""
    n = _split_rows(store, split, None)
    stop = n if stop is None else min(stop, n)
    if not 0 <= start <= stop:
        raise GssmDataError(f"row range {start}..{stop} is not within 0..{n}")
    _check_graph(store.graph, nodes, joint)
    tokens = np.asarray(store.tokens(split)[start:stop])
    return filtered_posterior(
        store.graph,
        _conditionals(store),
        tokens,
        nodes=nodes,
        joint=joint,
        device=device or auto_device(),
    )


@dataclass(frozen=True)
class WrittenPosterior:
    path: Path  # the posterior group
    rows: int
    nodes: list[str]
    joint: bool
    status: Literal["written", "already-written"]


def _attributes(store: Store, rows: int, joint: bool) -> dict[str, object]:
    return {
        "complete": False,
        "rows": rows,
        "nodes": [node.name for node in store.graph.latents],
        "joint": joint,
        "fingerprint": store.manifest.fingerprint,
        "description": "filtered posterior p(z_t | x_<=t) of the first `rows` sequences, "
        "t = 0 .. seq_len-1 (t = 0: the fixed start, a point mass on state 0); marginal/<node> "
        "per latent node, joint over all latents (row-major, topological order) if present",
    }


def _existing(group_path: Path) -> dict[str, object] | None:
    if not (group_path / "zarr.json").exists():
        return None
    try:
        return dict(zarr.open_group(group_path, mode="r", zarr_format=3).attrs)
    except (FileNotFoundError, ValueError, TypeError):
        return None


def _chunk_rows(store: Store, states: int) -> int:
    """Rows per stored chunk: a power of two within the block size, about CHUNK_ELEMENTS."""
    per_row = store.manifest.seq_len * states
    rows = 1
    while rows * 2 * per_row <= CHUNK_ELEMENTS and rows * 2 <= store.manifest.block_size:
        rows *= 2
    return rows


def write_split_posterior(
    store: Store,
    split: str,
    *,
    rows: int | None = None,
    joint: bool = False,
    force: bool = False,
    quiet: bool = False,
    device: Device | None = None,
    log: Callable[[str], None] | None = None,
) -> WrittenPosterior:
    """Write the posterior of the first `rows` sequences (default all) into the store.

    Idempotent: a complete posterior of the same rows (and joint, if asked)
    already in the store is kept unless `force`. Built beside the store's
    arrays and renamed into place when complete (layout: module docstring).
    """
    graph = store.graph
    rows = _split_rows(store, split, rows)
    nodes = _check_graph(graph, None, joint)
    conditionals = _conditionals(store)
    split_dir = store.path / split
    final = split_dir / POSTERIOR_GROUP
    existing = _existing(final)
    if (
        not force
        and existing is not None
        and existing.get("complete") is True
        and existing.get("rows") == rows
        and existing.get("fingerprint") == store.manifest.fingerprint
        and (existing.get("joint") is True or not joint)
    ):
        return WrittenPosterior(final, rows, nodes, bool(existing.get("joint")), "already-written")
    partial = split_dir / PARTIAL_GROUP
    if partial.exists():
        shutil.rmtree(partial)  # left by an interrupted write: never read, start over
    group = zarr.open_group(partial, mode="w-", zarr_format=3)
    seq_len = store.manifest.seq_len
    sizes = [node.states for node in graph.latents]
    chunk_rows = _chunk_rows(store, max(sizes + ([graph.joint_latent_states] if joint else [])))
    arrays = {
        node.name: group.create_array(
            f"marginal/{node.name}",
            shape=(rows, seq_len, node.states),
            chunks=(chunk_rows, seq_len, node.states),
            dtype="float32",
            fill_value=float("nan"),
            compressors=COMPRESSORS,
            dimension_names=MARGINAL_DIMENSIONS,
        )
        for node in graph.latents
    }
    joint_array = None
    if joint:
        joint_array = group.create_array(
            "joint",
            shape=(rows, seq_len, graph.joint_latent_states),
            chunks=(chunk_rows, seq_len, graph.joint_latent_states),
            dtype="float32",
            fill_value=float("nan"),
            compressors=COMPRESSORS,
            dimension_names=JOINT_DIMENSIONS,
        )
    group.attrs.update(_attributes(store, rows, joint))
    tokens = store.tokens(split)
    torch_device = device or auto_device()
    with _progress(f"posterior of {split}", rows, quiet) as progress:
        for start in range(0, rows, chunk_rows):
            stop = min(start + chunk_rows, rows)
            posterior = filtered_posterior(
                graph,
                conditionals,
                np.asarray(tokens[start:stop]),
                joint=joint,
                device=torch_device,
            )
            for name, array in arrays.items():
                array[start:stop] = posterior.marginals[name].astype(np.float32)
            if joint_array is not None and posterior.joint is not None:
                joint_array[start:stop] = posterior.joint.astype(np.float32)
            progress.advance(progress.task_ids[0], stop - start)
    group.attrs["complete"] = True
    _publish(partial, final, split_dir / RETIRED_GROUP)
    if log is not None:
        log(f"wrote {final} ({rows:,} sequences, {len(nodes)} nodes{', joint' if joint else ''})")
    return WrittenPosterior(final, rows, nodes, joint, "written")


def _publish(partial: Path, final: Path, retired: Path) -> None:
    """Put the complete `partial` group at `final`; an older posterior is removed after."""
    if retired.exists():
        shutil.rmtree(retired)
    if final.exists():
        os.replace(final, retired)
    os.replace(partial, final)
    if retired.exists():
        shutil.rmtree(retired)


def read_posterior(store: Store, split: str, node: str | None = None) -> zarr.Array:
    """A stored posterior array: the marginal of `node`, or the joint when node is None."""
    _split_rows(store, split, None)
    attributes = _existing(store.path / split / POSTERIOR_GROUP)
    if attributes is None or attributes.get("complete") is not True:
        raise GssmDataError(
            f"store {store.path} has no posterior of the {split} split: "
            f"run `gssm-data posterior {store.path} --split {split}`"
        )
    if node is None and attributes.get("joint") is not True:
        raise GssmDataError(
            f"the stored posterior of {split} has no joint array: write it with --joint"
        )
    if node is not None:
        _check_graph(store.graph, [node], False)
    key = "joint" if node is None else f"marginal/{node}"
    group = zarr.open_group(store.path / split / POSTERIOR_GROUP, mode="r", zarr_format=3)
    array = group[key]
    assert isinstance(array, zarr.Array), key
    return array
