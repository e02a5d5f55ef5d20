"""The dataset store: a Zarr v3 group laid out as docs/design.md, section Store format, says.

```
zarr.json                    group attributes: {"manifest": Manifest}
graph/<node>/conditional     float64 p(z_t | inputs) (absent for `transition` nodes)
<split>/tokens               (n, seq_len) uint8 | uint16, one chunk per sampler block
<split>/latents/<node>       same shape, when generated --with-latents
<split>/block_crc32          (blocks,) uint32, checksum of every block (verify rereads it)
<split>/entropy              (n, seq_len - 1) float32, optional (`gssm-data entropy --write`)
```

Any Zarr v3 client reads it; this module adds the manifest model, checks and
the names above. Chunks along rows are exactly one sampler block, so
concurrent writers (workers, shards) always write disjoint whole chunks.

A block's checksum is the CRC-32 of its tokens' bytes (row-major), continued
over the bytes of each latent array in topological order when latents are
stored: ``crc = crc32(latent_k, ... crc32(latent_1, crc32(tokens)))``.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from pydantic import ValidationError
from zarr.codecs import ZstdCodec
from zarr.errors import GroupNotFoundError

from gssm_data.common.atomicfile import atomic_write
from gssm_data.common.humanize import format_validation_error
from gssm_data.errors import GssmDataError
from gssm_data.graph import GraphSpec
from gssm_data.manifest import FORMAT_VERSION, Baselines, EntropyStats, Manifest
from gssm_data.sampler import BlockSampler, state_dtype

MANIFEST_KEY = "manifest"
PARTIAL_SUFFIX = ".partial"
# Inside a `.partial` store only: one marker file per finished block, and locks.
PROGRESS_DIR = "_progress"
CHECKSUM_ARRAY = "block_crc32"
# zstd level 3: about as fast to write as level 1, and reading is what repeats.
COMPRESSORS = (ZstdCodec(level=3),)
# A block of zeros is still written: a missing chunk file is then always an error.
ARRAY_CONFIG: dict[str, Any] = {"write_empty_chunks": True}
# Zarr v3 dimension names: xarray (and any labelled-array reader) needs them on
# every array of a group to open it. Names are consistent across a split's arrays.
DIMENSIONS = ("sequence", "position")
ENTROPY_DIMENSIONS = ("sequence", "predicted_position")  # positions 1 .. seq_len-1
CHECKSUM_DIMENSIONS = ("block",)

Mode = Literal["r", "r+"]


def partial_path(path: str | Path) -> Path:
    """Where a store is written before it is complete (`<path>.partial`)."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def block_checksum(tokens: np.ndarray, latents: Sequence[np.ndarray] = ()) -> int:
    """CRC-32 of a block's tokens, continued over its latents (in the given order)."""
    crc = zlib.crc32(np.ascontiguousarray(tokens).data)
    for states in latents:
        crc = zlib.crc32(np.ascontiguousarray(states).data, crc)
    return crc


def block_rows(n: int, block_size: int, block: int) -> tuple[int, int]:
    """Rows [start, stop) of block `block` in a split of n sequences (last block short)."""
    start = block * block_size
    return start, min(start + block_size, n)


def n_blocks(n: int, block_size: int) -> int:
    return math.ceil(n / block_size)


class Store:
    """An opened dataset: manifest, token and latent arrays, conditional tables.

    Arrays are returned as `zarr.Array`s, read lazily: index them (`tokens[a:b]`)
    to get numpy arrays. Use :func:`open_store` rather than the constructor.
    """

    def __init__(self, path: Path, group: zarr.Group, manifest: Manifest, mode: Mode) -> None:
        self.path = path
        self.group = group
        self.manifest = manifest
        self.mode = mode

    def __repr__(self) -> str:
        splits = ", ".join(f"{name}={info.n}" for name, info in self.manifest.splits.items())
        state = "complete" if self.manifest.complete else "incomplete"
        return f"Store({str(self.path)!r}, {self.manifest.name}, {splits}, {state})"

    @property
    def graph(self) -> GraphSpec:
        return self.manifest.graph

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.manifest.splits)

    def _split(self, split: str) -> str:
        if split not in self.manifest.splits:
            known = ", ".join(self.manifest.splits)
            raise GssmDataError(f"store {self.path} has no split {split!r}; splits: {known}")
        return split

    def _array(self, key: str) -> zarr.Array:
        try:
            array = self.group[key]
        except KeyError:
            raise GssmDataError(
                f"store {self.path} has no array {key!r}: the store is truncated or damaged; "
                f"run `gssm-data verify {self.path}`"
            ) from None
        assert isinstance(array, zarr.Array), key
        if self.mode == "r+":
            # The array config is not stored in zarr.json: a reopened array would
            # skip all-zero chunks (a vocabulary of one writes nothing but zeros),
            # and a missing chunk fails verification.
            array = array.with_config(ARRAY_CONFIG)
        return array

    def tokens(self, split: str) -> zarr.Array:
        """Token array of a split, shape (n, seq_len), one chunk per block."""
        return self._array(f"{self._split(split)}/tokens")

    def latents(self, split: str, node: str) -> zarr.Array:
        """States of latent `node` in a split (stores generated --with-latents only)."""
        self._split(split)
        names = [latent.name for latent in self.graph.latents]
        if node not in names:
            raise GssmDataError(f"{node!r} is not a latent node; latent nodes: {', '.join(names)}")
        if not self.manifest.with_latents:
            raise GssmDataError(
                f"store {self.path} has no latents: generate it again with --with-latents"
            )
        return self._array(f"{split}/latents/{node}")

    def conditional(self, node: str) -> np.ndarray:
        """Effective table p(z_t | inputs) of a node (float64; axes as `graph.table_shape`)."""
        try:
            spec = self.graph.node(node)
        except KeyError:
            names = ", ".join(n.name for n in self.graph.nodes)
            raise GssmDataError(f"no node {node!r} in the graph; nodes: {names}") from None
        if spec.mode == "transition":
            raise GssmDataError(
                f"node {node!r} is in `transition` mode: its kernel is drawn per sequence "
                "(BlockSampler.transition_kernels), there is no fixed table"
            )
        return np.asarray(self._array(f"graph/{node}/conditional")[...])

    def conditionals(self) -> dict[str, np.ndarray]:
        """Every fixed conditional table, keyed by node name (no `transition` nodes)."""
        return {
            node.name: self.conditional(node.name)
            for node in self.graph.nodes
            if node.mode != "transition"
        }

    def sampler(self) -> BlockSampler:
        """The sampler that drew this store's blocks, built from the stored tables."""
        m = self.manifest
        return BlockSampler(m.graph, self.conditionals(), m.seq_len, m.seed, m.block_size)

    def entropy(self, split: str) -> EntropyStats | None:
        return self.manifest.splits[self._split(split)].entropy

    def baselines(self, split: str) -> Baselines | None:
        return self.manifest.splits[self._split(split)].baselines

    def per_token_entropy(self, split: str) -> zarr.Array | None:
        """-log p(x_t | x_<t), t = 1..seq_len-1, shape (n, seq_len-1), when it was written."""
        try:
            array = self.group[f"{self._split(split)}/entropy"]
        except KeyError:
            return None
        assert isinstance(array, zarr.Array)
        return array

    def block_checksums(self, split: str) -> np.ndarray | None:
        """The CRC-32 of every block of a split, as recorded when the store was finalised."""
        try:
            array = self.group[f"{self._split(split)}/{CHECKSUM_ARRAY}"]
        except KeyError:
            return None
        assert isinstance(array, zarr.Array)
        return np.asarray(array[...])

    def read_block(self, split: str, block: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """Tokens and latents (topological order) of one block, as stored."""
        info = self.manifest.splits[self._split(split)]
        start, stop = block_rows(info.n, self.manifest.block_size, block)
        tokens = np.asarray(self.tokens(split)[start:stop])
        latents = []
        if self.manifest.with_latents:
            latents = [
                np.asarray(self.latents(split, node.name)[start:stop])
                for node in self.graph.latents
            ]
        return tokens, latents

    def write_manifest(self, manifest: Manifest) -> None:
        """Replace the manifest (zarr writes zarr.json atomically). Mode "r+" only."""
        if self.mode != "r+":
            raise GssmDataError(f"store {self.path} is open read-only; open it with mode='r+'")
        self.group.attrs[MANIFEST_KEY] = manifest.model_dump(mode="json")
        self.manifest = manifest


def open_store(path: str | Path, *, mode: Mode = "r", allow_incomplete: bool = False) -> Store:
    """Open a dataset store; every problem is a GssmDataError with one actionable line.

    With `allow_incomplete`, an unfinished store opens too, and a path whose
    `<path>.partial` exists (an interrupted generate) opens that partial store.
    """
    if mode not in ("r", "r+"):
        raise GssmDataError(f"mode must be 'r' or 'r+', not {mode!r}")
    path = Path(path)
    partial = partial_path(path)
    if not path.exists():
        if partial.exists() and allow_incomplete:
            path = partial
        elif partial.exists():
            raise GssmDataError(
                f"no store at {path}, but an interrupted generate left {partial}: "
                "run the same generate command again to resume it"
            )
        else:
            raise GssmDataError(f"no store at {path}")
    if not path.is_dir():
        raise GssmDataError(f"{path} is not a store (a store is a folder ending in .zarr)")
    try:
        group = zarr.open_group(path, mode=mode, zarr_format=3)
    except (GroupNotFoundError, FileNotFoundError, ValueError, TypeError):
        raise GssmDataError(f"{path} is not a Zarr v3 group (no readable zarr.json)") from None
    manifest = _read_manifest(path, group)
    if not manifest.complete and not allow_incomplete:
        raise GssmDataError(
            f"store {path} is incomplete (its generate did not finish): run the same "
            "generate command again to resume it"
        )
    return Store(path, group, manifest, mode)


def _read_manifest(path: Path, group: zarr.Group) -> Manifest:
    data = group.attrs.get(MANIFEST_KEY)
    if not isinstance(data, dict):
        raise GssmDataError(f"{path} is not a gssm-data store (no manifest in zarr.json)")
    version = data.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise GssmDataError(
            f"{path} has format version {version}, newer than this gssm-data reads "
            f"({FORMAT_VERSION}): upgrade gssm-data"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as error:
        raise GssmDataError(
            f"{path} has an invalid manifest: {format_validation_error(error)}"
        ) from None


def create_layout(path: Path, manifest: Manifest, conditionals: dict[str, np.ndarray]) -> None:
    """Write an empty store at `path`: manifest, conditional tables, empty arrays.

    Token and latent arrays are created at their final shape and filled block
    by block later; nothing here depends on how many writers there will be.
    """
    group = zarr.open_group(path, mode="w-", zarr_format=3)
    for node, table in conditionals.items():
        array = group.create_array(
            f"graph/{node}/conditional",
            shape=table.shape,
            chunks=table.shape,
            dtype="float64",
            compressors=COMPRESSORS,
            dimension_names=conditional_dimensions(manifest.graph, node),
        )
        array[...] = table
    for split, info in manifest.splits.items():
        for key, dtype in split_arrays(manifest, split):
            group.create_array(
                key,
                shape=(info.n, manifest.seq_len),
                chunks=(manifest.block_size, manifest.seq_len),
                dtype=dtype,
                fill_value=0,
                compressors=COMPRESSORS,
                dimension_names=DIMENSIONS,
                config=ARRAY_CONFIG,
            )
    group.attrs[MANIFEST_KEY] = manifest.model_dump(mode="json")


def conditional_dimensions(graph: GraphSpec, name: str) -> tuple[str, ...]:
    """Axis names of `graph/<name>/conditional`: (`<name>_previous` if latent, parents, `<name>`).

    The next state's axis carries the node's own name, an input axis its
    parent's; the previous state of a latent node is `<name>_previous`.
    """
    node = graph.node(name)
    inputs = [] if node.observed else [f"{name}_previous"]
    return (*inputs, *node.parents, name)


def dimension_names(manifest: Manifest, key: str) -> tuple[str, ...] | None:
    """The dimension names an array of a store carries, by its key; None for an unknown key."""
    parts = key.strip("/").split("/")
    if parts[0] == "graph" and len(parts) == 3 and parts[2] == "conditional":
        return conditional_dimensions(manifest.graph, parts[1])
    if parts[0] not in manifest.splits:
        return None
    if parts[1:] == ["tokens"] or (len(parts) == 3 and parts[1] == "latents"):
        return DIMENSIONS
    if parts[1:] == ["entropy"]:
        return ENTROPY_DIMENSIONS
    if parts[1:] == [CHECKSUM_ARRAY]:
        return CHECKSUM_DIMENSIONS
    return None


def name_dimensions(path: str | Path) -> list[str]:
    """Give every array of a store written without dimension names its names; return their keys.

    Stores written before gssm-data named dimensions open in zarr but not in
    xarray. Only each array's metadata document (`<key>/zarr.json`) is
    rewritten, atomically; data chunks are not touched, so checksums and the
    fingerprint stay valid. Safe to run again (it then changes nothing).
    """
    store = open_store(path, allow_incomplete=True)
    named = []
    for key in _array_keys(store.group):
        names = dimension_names(store.manifest, key)
        metadata_path = store.path / key / "zarr.json"
        if names is None or not metadata_path.is_file():
            continue
        metadata = json.loads(metadata_path.read_text())
        if metadata.get("dimension_names") is not None:
            continue
        if len(names) != len(metadata["shape"]):
            raise GssmDataError(f"{key}: expected {len(names)} axes, found {metadata['shape']}")
        metadata["dimension_names"] = list(names)
        atomic_write(metadata_path, json.dumps(metadata, indent=2))
        named.append(key)
    return named


def _array_keys(group: zarr.Group, prefix: str = "") -> Iterator[str]:
    """Keys of every array below a group, depth first."""
    for name, member in group.members():
        key = f"{prefix}{name}"
        if isinstance(member, zarr.Group):
            yield from _array_keys(member, key + "/")
        else:
            yield key


def split_arrays(manifest: Manifest, split: str) -> list[tuple[str, np.dtype]]:
    """Keys and dtypes of a split's per-sequence arrays: tokens, then latents (topological)."""
    arrays = [(f"{split}/tokens", np.dtype(manifest.token_dtype))]
    if manifest.with_latents:
        arrays += [
            (f"{split}/latents/{node.name}", state_dtype(node.states))
            for node in manifest.graph.latents
        ]
    return arrays


def write_checksums(store: Store, split: str, checksums: np.ndarray) -> None:
    """Record a split's block checksums in the store (done once, by the finaliser)."""
    array = store.group.create_array(
        f"{split}/{CHECKSUM_ARRAY}",
        shape=checksums.shape,
        chunks=(max(checksums.shape[0], 1),),
        dtype="uint32",
        fill_value=0,
        compressors=COMPRESSORS,
        overwrite=True,
        dimension_names=CHECKSUM_DIMENSIONS,
    )
    array[...] = checksums.astype(np.uint32)


# --- verification -----------------------------------------------------------


@dataclass(frozen=True)
class BlockProblem:
    split: str
    block: int
    message: str

    def __str__(self) -> str:
        return f"block {self.block} of {self.split}: {self.message}"


def check_block(store: Store, split: str, block: int, expected_crc: int | None) -> str | None:
    """What is wrong with one block (None if sound): readable, in range, checksum."""
    m = store.manifest
    chunk = store.path / split / "tokens" / "c" / str(block) / "0"
    if not chunk.exists():
        return f"chunk file {chunk.relative_to(store.path)} is missing"
    try:
        tokens, latents = store.read_block(split, block)
    except Exception as error:  # a damaged chunk fails in the codec, with any error type
        return f"unreadable ({type(error).__name__}: {error})"
    if tokens.size and int(tokens.max()) >= m.vocab_size:
        return f"token {int(tokens.max())} out of range for vocab_size {m.vocab_size}"
    if tokens.size and np.any(tokens[:, 0] != 0):
        return "position 0 is not the start state 0"
    nodes = store.graph.latents if m.with_latents else ()
    for node, states in zip(nodes, latents, strict=True):
        if states.size and int(states.max()) >= node.states:
            return f"latent {node.name} state {int(states.max())} out of range"
    if expected_crc is not None:
        crc = block_checksum(tokens, latents)
        if crc != expected_crc:
            return (
                f"checksum mismatch (recorded {expected_crc:#010x}, read {crc:#010x}): "
                "the chunk was corrupted or overwritten"
            )
    return None


def check_structure(store: Store) -> list[str]:
    """Problems with a store's metadata: arrays present with the manifest's shapes and dtypes."""
    m = store.manifest
    problems = []
    expected_dtype = state_dtype(m.vocab_size)
    if m.token_dtype != expected_dtype.name:
        problems.append(f"token_dtype {m.token_dtype} should be {expected_dtype.name}")
    if m.vocab_size != m.graph.vocab_size:
        problems.append(f"vocab_size {m.vocab_size} differs from the graph's {m.graph.vocab_size}")
    for split, info in m.splits.items():
        if info.blocks != n_blocks(info.n, m.block_size):
            problems.append(f"{split}: {info.blocks} blocks recorded for {info.n} sequences")
        for key, dtype in split_arrays(m, split):
            problem = _check_array(store, key, (info.n, m.seq_len), dtype)
            if problem:
                problems.append(problem)
        if m.complete:
            checksums = store.block_checksums(split)
            if checksums is None or checksums.shape != (info.blocks,):
                problems.append(f"{split}/{CHECKSUM_ARRAY} is missing or has the wrong length")
    for node in m.graph.nodes:
        if node.mode == "transition":
            continue
        key = f"graph/{node.name}/conditional"
        problem = _check_array(store, key, m.graph.table_shape(node.name), np.dtype("float64"))
        if problem:
            problems.append(problem)
            continue
        table = store.conditional(node.name)
        if not (np.all(table > 0) and np.allclose(table.sum(axis=-1), 1.0, atol=1e-9)):
            problems.append(f"{key} is not a positive, normalised conditional table")
    return problems


def _check_array(store: Store, key: str, shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    try:
        array = store.group[key]
    except KeyError:
        return f"array {key} is missing"
    if not isinstance(array, zarr.Array):
        return f"{key} is not an array"
    if tuple(array.shape) != tuple(shape):
        return f"{key} has shape {tuple(array.shape)}, expected {tuple(shape)}"
    if np.dtype(array.dtype) != dtype:
        return f"{key} has dtype {array.dtype}, expected {dtype}"
    if key.endswith("/tokens") or "/latents/" in key:
        expected_chunks = (store.manifest.block_size, store.manifest.seq_len)
        if tuple(array.chunks) != expected_chunks:
            return f"{key} has chunks {tuple(array.chunks)}, expected {expected_chunks}"
    return None


def iter_blocks(manifest: Manifest) -> Iterator[tuple[str, int]]:
    """Every (split, block) of a store, train blocks first, in order."""
    for split, info in manifest.splits.items():
        for block in range(info.blocks):
            yield split, block


def verify_store(store: Store, *, on_block: Callable[[str, int], None] | None = None) -> list[str]:
    """Every problem found in a complete store (empty when sound).

    Checks completeness, array shapes and dtypes, conditional tables, and for
    every block: the chunk exists and decodes, tokens and latents are in range,
    and the CRC-32 matches the one recorded when the store was written.
    """
    if not store.manifest.complete:
        return [f"store {store.path} is incomplete (its generate did not finish)"]
    problems = check_structure(store)
    if problems:
        return problems
    for split in store.splits:
        checksums = store.block_checksums(split)
        assert checksums is not None
        for block in range(store.manifest.splits[split].blocks):
            problem = check_block(store, split, block, int(checksums[block]))
            if problem:
                problems.append(str(BlockProblem(split, block, problem)))
            if on_block:
                on_block(split, block)
    return problems
