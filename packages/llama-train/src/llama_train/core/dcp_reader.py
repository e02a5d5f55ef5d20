"""Read torch.distributed.checkpoint (DCP) folders without letting them run code.

DCP's own reader is not safe on a folder someone else wrote: `FileSystemReader`
unpickles `dcp/.metadata` with plain :mod:`pickle`, and the default load planner
reads every non-tensor entry (the optimizer's hyper-parameters, say) with
``torch.load(weights_only=False)``. Either lets a forged checkpoint execute
code the moment it is opened, and the checksums in ``meta.json`` do not help:
whoever forges the folder recomputes them.

This module closes both paths:

- :class:`SafeFileSystemReader` unpickles the metadata with
  :class:`MetadataUnpickler`, which resolves only the classes a DCP metadata
  file is made of (the dataclasses of ``torch.distributed.checkpoint.metadata``,
  the file reader's storage records, ``torch.Size``, dtypes and layouts, paths).
  Anything else (``os.system``, ``builtins.eval``, a class with a hostile
  ``__reduce__``) raises :class:`UnsafeCheckpointError` before it is called.
- :class:`SafeLoadPlanner` and :class:`SafeFullLoadPlanner` read non-tensor
  entries with ``torch.load(weights_only=True)``: plain numbers, strings,
  tuples and tensors only. Tensor entries were already read that way by DCP.

What the allowed classes can do when a forged file calls them (build a
dataclass, a ``torch.Size``, a path) has no side effect, so reading a forged
folder can at worst fail or load wrong numbers, never run code.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    _EmptyStateDictLoadPlanner,
)
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from llama_train.errors import LlamaTrainError

METADATA_FILE = ".metadata"
METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[str, frozenset[str]] = {
    METADATA_MODULE: frozenset(
        {
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "ChunkStorageMetadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),
    "pathlib": frozenset({"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}),
    "collections": frozenset({"OrderedDict"}),
}


class UnsafeCheckpointError(LlamaTrainError):
    """A checkpoint file asks to build something a DCP checkpoint never holds."""


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP `.metadata` file, resolving only the classes such a file uses.

    `find_class` is the one door through which a pickle reaches any Python
    callable (the standard library documents this as the way to restrict
    unpickling), so refusing every other name refuses every code path.
    """

    def __init__(self, file: io.BufferedIOBase, *, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self.source} refers to {module}.{name}, which a checkpoint's metadata never "
            "holds: refusing to load it (the folder was altered or forged)"
        )


def load_metadata(file: io.BufferedIOBase, *, source: str) -> Metadata:
    """The Metadata object of a DCP folder, read with :class:`MetadataUnpickler`."""
    try:
        metadata = MetadataUnpickler(file, source=source).load()
    except UnsafeCheckpointError:
        raise
    except Exception as error:  # truncated or garbled: not a pickle of ours
        raise LlamaTrainError(f"{source} is not readable DCP metadata: {error}") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(
            f"{source} holds a {type(metadata).__name__}, not DCP metadata: refusing to load it"
        )
    return metadata


def check_metadata(folder: Path) -> None:
    """Refuse a DCP folder whose `.metadata` asks for anything but DCP's own classes.

    DCP's loader catches errors of the reader and retries other metadata files,
    so a refusal raised inside it would surface as a vague failure; checking
    first makes it one clear UnsafeCheckpointError. A missing file is left to
    DCP to report.
    """
    path = folder / METADATA_FILE
    if not path.is_file():
        return
    with open(path, "rb") as file:
        load_metadata(file, source=str(path))


class SafeFileSystemReader(FileSystemReader):
    """`FileSystemReader` whose metadata goes through :class:`MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = load_metadata(stream, source=str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _PlainBytes:
    """`load_bytes` of DCP's planners with ``weights_only=True`` (their own uses False)."""

    flatten_state_dict: bool
    mappings: Any
    original_state_dict: Any
    state_dict: Any

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            plain = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as error:
            raise UnsafeCheckpointError(
                f"the checkpoint entry {read_item.dest_index.fqn} holds something other than "
                "plain numbers, strings and tensors: refusing to load it "
                f"({str(error).splitlines()[0]})"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], plain)
        else:
            self.state_dict[read_item.dest_index.fqn] = plain


class SafeLoadPlanner(_PlainBytes, DefaultLoadPlanner):
    """DCP's default planner (loads into existing state dicts), non-tensor entries safely."""


class SafeFullLoadPlanner(_PlainBytes, _EmptyStateDictLoadPlanner):
    """Rebuilds full tensors from the metadata in one process, non-tensor entries safely."""
