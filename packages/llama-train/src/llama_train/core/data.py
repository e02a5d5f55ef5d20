"""Training data: a deterministic, shardable, resumable stream of token batches.

Both sources are an *infinite row stream* that is a pure function of its
settings: row i of the stream is always the same sequence, whoever reads it.

- ``zarr``: epoch e visits the chunks of the selected prefix in an order
  permuted by (seed, e); consecutive groups of ``shuffle_window`` chunks form a
  window whose rows are permuted by (seed, e, window). Reads are whole chunks
  (per-row random reads from Zarr are about 50 times slower); the shuffle is
  exact within a window and coarse (chunk order) across windows.
- ``online``: row block k is ``BlockSampler.block(STREAMS["online"], k)`` with
  a block of ``batch_size`` rows, so each rank's share of a batch is one block
  that only one worker of one rank ever draws. The test stream is a different
  one, so training never sees the test sequences.

Global batch g is rows [g*G, (g+1)*G) of the stream, G = batch_size x
world_size; rank r takes the r-th slice of batch_size rows, and DataLoader
worker w produces the batches with g % num_workers == w (the DataLoader
returns them in order). So the whole position is one number, the next row,
and it does not depend on the number of ranks: a run saved on N ranks resumes
on M with no repetition and no gap, and 1 rank with 2 accumulation steps reads
the same rows per optimizer step as 2 ranks with 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gssm_data import (
    BLOCK_SIZE,
    STREAMS,
    BlockSampler,
    GraphSpec,
    GssmDataError,
    Store,
    draw_kernels,
    fingerprint,
    load_graph,
    load_preset,
    open_store,
)
from gssm_data.common.humanize import Count, format_validation_error
from llama_train.core.chunk_check import ChunkChecker, check_manifest
from llama_train.errors import LlamaTrainError

if TYPE_CHECKING:
    import zarr

TRAIN_SPLIT = "train"

# Tags that keep the shuffle's random streams apart for one seed.
_CHUNK_ORDER = 0
_WINDOW_ORDER = 1


# ---------------------------------------------------------------------------
# Configuration


class DataConfig(BaseModel):
    """The `data` section: where training sequences come from and how they are batched."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["zarr", "online"] = Field(
        "zarr",
        description="zarr = read a gssm-data store; online = draw fresh sequences (infinite data)",
    )
    path: Path | None = Field(
        None,
        description="gssm-data store; with source online, its generating process is sampled "
        "afresh (same graph, kernels, seed, seq_len) and its test split stays the eval set",
    )
    n_train: Count | None = Field(
        None, description="first sequences of the train split to use (1e5, 2.5M); None = all"
    )
    batch_size: int = Field(32, gt=0, description="sequences per rank per micro-step")
    num_workers: int = Field(
        0, ge=0, description="DataLoader worker processes; 0 reads in the training process"
    )
    shuffle_window: int = Field(
        8, gt=0, description="chunks (4096 sequences each) whose rows are shuffled together"
    )
    preset: str | None = Field(None, description="online without a store: a gssm-data preset")
    graph: Path | None = Field(None, description="online without a store: a graph YAML file")
    seed: int | None = Field(
        None, ge=0, description="online without a store: kernel and sequence seed (default 0)"
    )
    seq_len: int | None = Field(
        None, ge=2, description="online without a store: tokens per sequence"
    )
    mode: str | None = Field(
        None, description="online without a store: override every node's mode (gssm-data modes)"
    )

    @model_validator(mode="after")
    def _check_source(self) -> DataConfig:
        graph_keys = {
            "preset": self.preset,
            "graph": self.graph,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "mode": self.mode,
        }
        given = [f"data.{key}" for key, value in graph_keys.items() if value is not None]
        if self.source == "zarr":
            if self.path is None:
                raise ValueError("source zarr needs data.path (a store made by gssm-data generate)")
            if given:
                raise ValueError(
                    f"{', '.join(given)} only apply to source online; the store's manifest "
                    "fixes its graph, seed and seq_len"
                )
            return self
        if self.n_train is not None:
            raise ValueError("data.n_train applies to source zarr; online data is unlimited")
        if self.path is not None:
            if given:
                raise ValueError(
                    f"give either data.path or {', '.join(given)}: with a store, the online "
                    "source samples the store's own graph, seed and seq_len"
                )
            return self
        if (self.preset is None) == (self.graph is None):
            raise ValueError("source online needs one of data.path, data.preset or data.graph")
        if self.seq_len is None:
            raise ValueError("source online without a store needs data.seq_len")
        return self


# ---------------------------------------------------------------------------
# Resolution: what the data is (vocabulary, length, where it lives)


@dataclass(frozen=True)
class DataSpec:
    """The resolved data source: what the model must match and where rows come from.

    `store` is the opened store (always for zarr; for online when `path` is
    set, then also the evaluation set); `n_train` is the selected prefix of
    the train split (zarr only); `seed` is the data seed (kernels and online
    sequences), not the run seed that orders the zarr shuffle.
    """

    source: Literal["zarr", "online"]
    vocab_size: int
    seq_len: int
    graph: GraphSpec
    seed: int
    store: Store | None = None
    n_train: int | None = None


def resolve_data(cfg: DataConfig) -> DataSpec:
    """Open the store's manifest (or the online graph); vocabulary, length, prefix size.

    User errors (missing store, unknown preset, n_train larger than the
    store) raise LlamaTrainError with one line naming the values involved.
    """
    if cfg.path is not None:
        store = _open_store(cfg.path)
        check_manifest(store)
        manifest = store.manifest
        n_train = None
        if cfg.source == "zarr":
            n_train = _select_prefix(store, cfg.n_train, cfg.path)
        return DataSpec(
            source=cfg.source,
            vocab_size=manifest.vocab_size,
            seq_len=manifest.seq_len,
            graph=manifest.graph,
            seed=manifest.seed,
            store=store,
            n_train=n_train,
        )
    graph = _online_graph(cfg)
    assert cfg.seq_len is not None  # enforced by DataConfig
    return DataSpec(
        source="online",
        vocab_size=graph.vocab_size,
        seq_len=cfg.seq_len,
        graph=graph,
        seed=cfg.seed or 0,
    )


def _open_store(path: Path) -> Store:
    try:
        return open_store(path)
    except GssmDataError as error:
        raise LlamaTrainError(str(error)) from None


def _select_prefix(store: Store, n_train: int | None, path: Path) -> int:
    if TRAIN_SPLIT not in store.manifest.splits:
        raise LlamaTrainError(f"the store {path} has no {TRAIN_SPLIT!r} split")
    available = _train_tokens(store).shape[0]
    if n_train is None:
        if available == 0:
            raise LlamaTrainError(f"the train split of {path} is empty")
        return available
    if n_train > available:
        raise LlamaTrainError(
            f"data.n_train={n_train} but the train split of {path} holds {available} "
            "sequences; lower data.n_train or generate a larger store"
        )
    return n_train


def _train_tokens(store: Store) -> zarr.Array:
    try:
        return store.tokens(TRAIN_SPLIT)
    except GssmDataError as error:  # a truncated or damaged store
        raise LlamaTrainError(str(error)) from None


def _online_graph(cfg: DataConfig) -> GraphSpec:
    try:
        graph = load_preset(cfg.preset) if cfg.preset is not None else load_graph(cfg.graph)
        return graph.with_mode(cfg.mode) if cfg.mode is not None else graph
    except GssmDataError as error:
        raise LlamaTrainError(str(error)) from None
    except ValidationError as error:  # a mode the graph model rejects
        raise LlamaTrainError(f"data.mode={cfg.mode!r}: {format_validation_error(error)}") from None


def online_sampler(spec: DataSpec, block_size: int = BLOCK_SIZE) -> BlockSampler:
    """A sampler of the spec's generating process.

    With a store, its saved conditionals (the distribution actually sampled);
    without, the kernels drawn from (graph, seed), which are the same tables a
    store of that graph and seed would hold. At the default block size,
    ``.block(STREAMS["test"], b)`` is block b of such a store's test split.
    """
    if spec.store is not None:
        try:
            conditionals = spec.store.conditionals()
        except GssmDataError as error:
            raise LlamaTrainError(str(error)) from None
    else:
        conditionals = draw_kernels(spec.graph, spec.seed)
    return BlockSampler(spec.graph, conditionals, spec.seq_len, spec.seed, block_size=block_size)


# ---------------------------------------------------------------------------
# Row streams: row i of an infinite sequence of training rows


class RowStream(Protocol):
    """An infinite, deterministic sequence of rows; any process reads any range."""

    seq_len: int

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the stream, shape (stop - start, seq_len)."""
        ...

    def identity(self) -> dict[str, Any]:
        """The settings that decide the stream: a saved position is valid only under them."""
        ...


@dataclass(frozen=True)
class _EpochLayout:
    chunk_order: np.ndarray  # chunk indices in visiting order
    window_starts: np.ndarray  # (n_windows + 1,) row offsets of windows within the epoch


class ZarrRowStream:
    """Epochs over the first `n_rows` rows of a (n, seq_len) array chunked along rows.

    Each process keeps the windows it last used (a worker reads each window
    once, then serves many batches from memory).
    """

    _CACHED_WINDOWS = 2

    def __init__(
        self,
        array: zarr.Array,
        *,
        n_rows: int,
        seed: int,
        window_chunks: int,
        fingerprint: str | None = None,
        checker: ChunkChecker | None = None,
    ) -> None:
        if not 0 < n_rows <= array.shape[0]:
            raise LlamaTrainError(
                f"cannot select {n_rows} rows of an array of {array.shape[0]} sequences"
            )
        if seed < 0:
            raise LlamaTrainError(f"the shuffle seed must be non-negative, got {seed}")
        self.array = array
        self.n_rows = n_rows
        self.seed = seed
        self.window_chunks = window_chunks
        self.fingerprint = fingerprint
        # Reads whole blocks checked against their CRC-32; None reads the array as is.
        self.checker = checker
        self.seq_len = int(array.shape[1])
        self.chunk_rows = int(array.chunks[0])
        self.n_chunks = math.ceil(n_rows / self.chunk_rows)
        self._layouts: dict[int, _EpochLayout] = {}
        self._windows: dict[tuple[int, int], np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes start with empty caches (matters under spawn/forkserver).
        state = self.__dict__.copy()
        state["_layouts"], state["_windows"] = {}, {}
        return state

    def identity(self) -> dict[str, Any]:
        return {
            "source": "zarr",
            "n_rows": self.n_rows,
            "seed": self.seed,
            "window_chunks": self.window_chunks,
            "chunk_rows": self.chunk_rows,
        }

    def rows(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, self.seq_len), dtype=self.array.dtype)
        position = start
        while position < stop:
            epoch, offset = divmod(position, self.n_rows)
            layout = self._layout(epoch)
            window = int(np.searchsorted(layout.window_starts, offset, side="right")) - 1
            rows = self._window(epoch, window, layout)
            first = offset - int(layout.window_starts[window])
            take = min(stop - position, rows.shape[0] - first)
            out[position - start : position - start + take] = rows[first : first + take]
            position += take
        return out

    def _chunk(self, c: int) -> np.ndarray:
        """Rows of chunk c within the selected prefix (checked when a checker is set)."""
        start, stop = c * self.chunk_rows, min((c + 1) * self.chunk_rows, self.n_rows)
        if self.checker is None:
            return self.array[start:stop]
        return self.checker.block(c)[: stop - start]

    def _layout(self, epoch: int) -> _EpochLayout:
        if epoch not in self._layouts:
            rng = np.random.default_rng([self.seed, _CHUNK_ORDER, epoch])
            order = rng.permutation(self.n_chunks)
            sizes = np.minimum(self.chunk_rows, self.n_rows - order * self.chunk_rows)
            per_window = np.add.reduceat(sizes, np.arange(0, self.n_chunks, self.window_chunks))
            starts = np.concatenate([[0], np.cumsum(per_window)])
            self._layouts = {epoch: _EpochLayout(order, starts)}
        return self._layouts[epoch]

    def _window(self, epoch: int, window: int, layout: _EpochLayout) -> np.ndarray:
        key = (epoch, window)
        if key not in self._windows:
            chunks = layout.chunk_order[window * self.window_chunks :][: self.window_chunks]
            parts = [self._chunk(c) for c in chunks.tolist()]
            rows = np.concatenate(parts)
            rng = np.random.default_rng([self.seed, _WINDOW_ORDER, epoch, window])
            if len(self._windows) >= self._CACHED_WINDOWS:
                self._windows.pop(next(iter(self._windows)))
            self._windows[key] = rows[rng.permutation(rows.shape[0])]
        return self._windows[key]


class OnlineRowStream:
    """Fresh sequences: rows [k*B, (k+1)*B) are block k of one sampler stream."""

    def __init__(self, sampler: BlockSampler, stream: int = STREAMS["online"]) -> None:
        self.sampler = sampler
        self.stream = stream
        self.seq_len = sampler.seq_len
        self.block_size = sampler.block_size
        self._cached: tuple[int, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cached"] = None
        return state

    def identity(self) -> dict[str, Any]:
        sampler = self.sampler
        return {
            "source": "online",
            "stream": self.stream,
            "block_size": self.block_size,
            "fingerprint": fingerprint(sampler.graph, sampler.seed, self.seq_len, self.block_size),
        }

    def rows(self, start: int, stop: int) -> np.ndarray:
        parts = []
        position = start
        while position < stop:
            block, first = divmod(position, self.block_size)
            tokens = self._block(block)
            take = min(stop - position, self.block_size - first)
            parts.append(tokens[first : first + take])
            position += take
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _block(self, block: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != block:
            self._cached = (block, self.sampler.block(self.stream, block).tokens)
        return self._cached[1]


# ---------------------------------------------------------------------------
# The loader


class _BatchDataset(IterableDataset):
    """This rank's slice of global batches start, start+1, ...; worker w takes g % W == w.

    Yields rows in the store's dtype (uint8/uint16) as numpy arrays: pickling
    a small array through the worker queue is several times cheaper than
    passing an int64 tensor through shared memory (measured: bench_loader).
    """

    def __init__(
        self, stream: RowStream, *, start_row: int, batch_size: int, rank: int, world_size: int
    ) -> None:
        super().__init__()
        self.stream = stream
        self.start_row = start_row
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[np.ndarray]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        global_rows = self.batch_size * self.world_size
        batch = worker
        while True:
            first = self.start_row + batch * global_rows + self.rank * self.batch_size
            yield self.stream.rows(first, first + self.batch_size)
            batch += n_workers


def _without_worker_traceback(message: str) -> str:
    """A worker's user error as its own message (DataLoader re-raises it with the traceback)."""
    marker = f"{LlamaTrainError.__module__}.{LlamaTrainError.__name__}: "
    return message.rsplit(marker, 1)[-1].strip() if marker in message else message


def _as_is(batch: np.ndarray) -> np.ndarray:
    """The DataLoader's collate step: nothing (tensors are made in the training process)."""
    return batch


class TrainLoader:
    """An endless iterator of int64 (batch_size, seq_len) batches with an exact position.

    The position advances when a batch is handed out, so `state_dict()` taken
    after the batches of step s were consumed resumes at step s+1's batches.
    Iterate with one iterator at a time; a new `iter()` starts a fresh
    DataLoader at the current position (prefetched batches are dropped).
    """

    def __init__(
        self,
        stream: RowStream,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        start_row: int = 0,
    ) -> None:
        if not 0 <= rank < world_size:
            raise LlamaTrainError(f"rank {rank} is outside a world of {world_size} processes")
        self.stream = stream
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.next_row = start_row

    @property
    def global_batch_rows(self) -> int:
        """Rows all ranks consume together per micro-step."""
        return self.batch_size * self.world_size

    @property
    def epoch(self) -> float | None:
        """Epochs of the selected prefix consumed so far (None for unlimited data)."""
        n_rows = getattr(self.stream, "n_rows", None)
        return None if n_rows is None else self.next_row / n_rows

    def __iter__(self) -> Iterator[torch.Tensor]:
        dataset = _BatchDataset(
            self.stream,
            start_row=self.next_row,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
        )
        loader = DataLoader(
            dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is
        )
        try:
            for rows in loader:
                self.next_row += self.global_batch_rows
                yield torch.from_numpy(rows.astype(np.int64))  # (B, seq_len)
        except LlamaTrainError as error:
            raise LlamaTrainError(_without_worker_traceback(str(error))) from None

    def state_dict(self) -> dict[str, Any]:
        """The position (next row of the stream) and the settings it is valid under."""
        return {"next_row": self.next_row, "stream": self.stream.identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; refuses one saved under other data settings."""
        saved, current = state["stream"], self.stream.identity()
        if saved != current:
            differing = sorted(
                k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k)
            )
            details = ", ".join(f"{k}: {saved.get(k)} -> {current.get(k)}" for k in differing)
            raise LlamaTrainError(
                f"the checkpoint's data position belongs to other data settings ({details}); "
                "resume with the original data settings or start a new run directory"
            )
        self.next_row = int(state["next_row"])


def build_loader(
    cfg: DataConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    seq_len: int | None = None,
    seed: int = 0,
    start_batch: int = 0,
    spec: DataSpec | None = None,
) -> TrainLoader:
    """The training loader of this rank, starting after `start_batch` global batches.

    `seed` orders the zarr shuffle (the run seed); online sequences depend on
    the data seed only, so that a store of the same graph and seed is an exact
    held-out set. `seq_len`, when given, must equal the data's. Pass `spec`
    to skip re-opening the store.
    """
    spec = spec if spec is not None else resolve_data(cfg)
    if seq_len is not None and seq_len != spec.seq_len:
        raise LlamaTrainError(
            f"the model expects sequences of {seq_len} tokens but the data has {spec.seq_len}"
        )
    if spec.source == "zarr":
        assert spec.store is not None and spec.n_train is not None
        stream: RowStream = ZarrRowStream(
            _train_tokens(spec.store),
            n_rows=spec.n_train,
            seed=seed,
            window_chunks=cfg.shuffle_window,
            fingerprint=spec.store.manifest.fingerprint,
            checker=ChunkChecker(spec.store.path, TRAIN_SPLIT)
            if spec.store.manifest.block_size == _train_tokens(spec.store).chunks[0]
            else None,
        )
    else:
        stream = OnlineRowStream(online_sampler(spec, block_size=cfg.batch_size))
    return TrainLoader(
        stream,
        batch_size=cfg.batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.num_workers,
        start_row=start_batch * cfg.batch_size * world_size,
    )
