"""Checkpoints: atomic step folders with checksums, retention, and corrupt fallback.

Layout of a checkpoint directory (the trainer's format, :class:`DcpPayload`)::

    step_000300/
        dcp/             model and optimizer through torch.distributed.checkpoint:
            .metadata        what every tensor is and where its pieces are
            __0_0.distcp     one file per rank (rank r's shards, or its share of
            __1_0.distcp     the replicated tensors): resharded on load, N -> M ranks
        state.pt         everything else: step, loader position, RNG states of every rank, ...
        meta.json        written last: step, payload format, size and sha256 of every file
        PENDING_EVAL     marker: retention never deletes the folder while it exists
    .step_000400.tmp/    a save in progress, or one killed midway: never read

A save writes into the hidden temporary folder, fsyncs every file and the
folder, then renames it to ``step_NNNNNN`` (atomic on POSIX) and fsyncs the
parent. A killed save therefore leaves only a hidden folder (removed by the
next save), and a folder that was damaged later (disk error, a partial copy)
fails its checksums: ``load_latest`` warns and falls back to the previous one.

The model and optimizer go through one seam, the payload format: DCP for
training (any number of ranks, sharded or not), or one torch.save file
(:class:`TorchPayload`, what one process without DCP would write). This module
keeps the atomic rename, checksums, retention and fallback for both.

With several ranks (a process group is up) every rank calls ``save`` and
``load_latest``: the payload is written and read by all of them, everything
else by rank 0 (the folder, state.pt, checksums, rename, retention), and the
choice of checkpoint is rank 0's, broadcast, so all ranks load the same step.
The checkpoint directory must be on a file system all ranks share.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from llama_train.core import distributed
from llama_train.errors import LlamaTrainError
from llama_train.rundir import fsync_directory

FORMAT_VERSION = 1
PAYLOAD_KEYS = ("model", "optimizer")
STATE_FILE = "state.pt"
META_FILE = "meta.json"
PENDING_EVAL_FILE = "PENDING_EVAL"

_STEP_FOLDER = re.compile(r"^step_(\d+)$")
_HIDDEN_LEFTOVER = re.compile(r"^\.step_\d+\.(tmp|delete)$")


class CheckpointConfig(BaseModel):
    """When checkpoints are written and how many are kept (the `checkpoint` section)."""

    model_config = ConfigDict(extra="forbid")

    every: int = Field(500, gt=0, description="steps between checkpoints (also at the end)")
    keep: int = Field(2, ge=1, description="most recent checkpoints kept on disk")


class CorruptCheckpointWarning(UserWarning):
    """A checkpoint failed its checks and an older one is used instead."""


class _Unusable(Exception):
    """Internal: why one checkpoint folder cannot be loaded."""


# ---------------------------------------------------------------------------
# The payload seam


class PayloadFormat(Protocol):
    """How the model and optimizer state dicts are written into a checkpoint folder.

    `write` puts files under `folder` (any names except state.pt, meta.json
    and PENDING_EVAL, subfolders allowed); every file it leaves is checksummed.
    `read` returns {"model": ..., "optimizer": ...} from such a folder.
    A format that can also load *into* existing (possibly sharded) state dicts,
    as a resuming run needs, has ``read_into(folder, into)`` (see DcpPayload).
    """

    name: str

    def write(self, folder: Path, payload: Mapping[str, Any]) -> None: ...

    def read(self, folder: Path, map_location: str | torch.device) -> dict[str, Any]: ...


class TorchPayload:
    """Model and optimizer in one torch.save file: one process holds the whole state."""

    name = "torch"
    filename = "model_optim.pt"

    def write(self, folder: Path, payload: Mapping[str, Any]) -> None:
        save_file(folder / self.filename, dict(payload))

    def read(self, folder: Path, map_location: str | torch.device) -> dict[str, Any]:
        return torch.load(folder / self.filename, map_location=map_location, weights_only=True)


class DcpPayload:
    """Model and optimizer through torch.distributed.checkpoint (DCP), in `dcp/`.

    Every rank writes its part (its FSDP shards; replicated DDP tensors are
    written once, spread over the ranks) and rank 0 the metadata. Keys are
    parameter names (get_state_dict), not positions, so a checkpoint loads into
    any number of ranks and either strategy: :meth:`read_into` fills the
    caller's state dicts in place, resharding as needed; :meth:`read` rebuilds
    plain, full tensors in one process (evaluation). Collective when a process
    group is up, coordinated over the host (gloo) group so that NCCL runs do
    not ship planning objects through the GPU; errors on any rank are raised
    on every rank (DCP gathers them).
    """

    name = "dcp"
    dirname = "dcp"

    def write(self, folder: Path, payload: Mapping[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        writer = dcp.FileSystemWriter(folder / self.dirname, sync_files=True)
        try:
            with _single_process_is_intended():
                dcp.save(
                    dict(payload),
                    storage_writer=writer,
                    process_group=distributed.host_group(),
                    no_dist=_no_group(),
                )
        except CheckpointException as error:
            raise _unwrapped(error) from None

    def read(self, folder: Path, map_location: str | torch.device) -> dict[str, Any]:
        # What torch's dcp_to_torch_save does: a planner that rebuilds full tensors from
        # the metadata, and the loader that fills the given dict (dcp.load would not).
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        from llama_train.core.dcp_reader import (
            SafeFileSystemReader,
            SafeFullLoadPlanner,
            check_metadata,
        )

        check_metadata(folder / self.dirname)
        state: dict[str, Any] = {}
        try:
            _load_state_dict(
                state,
                storage_reader=SafeFileSystemReader(folder / self.dirname),
                planner=SafeFullLoadPlanner(),
                no_dist=True,
            )
        except CheckpointException as error:
            raise _unwrapped(error) from None
        return _to_device(state, map_location)

    def read_into(self, folder: Path, into: dict[str, Any]) -> None:
        """Load in place into `into` (state dicts from get_state_dict; sharded or not)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        from llama_train.core.dcp_reader import (
            SafeFileSystemReader,
            SafeLoadPlanner,
            check_metadata,
        )

        check_metadata(folder / self.dirname)
        reader = SafeFileSystemReader(folder / self.dirname)
        try:
            with _single_process_is_intended():
                dcp.load(
                    into,
                    storage_reader=reader,
                    planner=SafeLoadPlanner(),
                    process_group=distributed.host_group(),
                    no_dist=_no_group(),
                )
        except CheckpointException as error:
            raise _unwrapped(error) from None


def _no_group() -> bool:
    return not distributed.is_initialized()


@contextlib.contextmanager
def _single_process_is_intended() -> Iterator[None]:
    """Silence DCP's warning that it saves or loads in one process: that is what we ask."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


PAYLOAD_FORMATS: dict[str, type[PayloadFormat]] = {"torch": TorchPayload, "dcp": DcpPayload}


def _unwrapped(error: BaseException) -> Exception:
    """DCP's CheckpointException (a BaseException) as an ordinary exception.

    An OSError of any rank comes back as itself, so a full disk still reads as
    one line; anything else as a RuntimeError with the first rank's reason.
    """
    failures = getattr(error, "failures", {})
    causes = [cause for cause, _ in failures.values()]
    for cause in causes:
        if isinstance(cause, OSError | LlamaTrainError):  # a refused forged file, too
            return cause
    first = causes[0] if causes else error
    return RuntimeError(f"torch.distributed.checkpoint failed: {type(first).__name__}: {first}")


def _to_device(value: Any, map_location: str | torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(map_location)
    if isinstance(value, dict):
        return {key: _to_device(item, map_location) for key, item in value.items()}
    if isinstance(value, list):
        return [_to_device(item, map_location) for item in value]
    return value


def save_file(path: Path, obj: Any) -> None:
    """torch.save through a Python file (so a full disk is an OSError), then fsync."""
    with open(path, "wb") as file:
        torch.save(obj, file)
        file.flush()
        os.fsync(file.fileno())


# ---------------------------------------------------------------------------
# The manager


class CheckpointManager:
    """Saves and finds checkpoints in `directory` (created on the first save).

    `keep` is how many of the newest checkpoints survive a save (None keeps
    all); a checkpoint marked pending evaluation, or of a `pinned` step (a
    trunk's fork points, :mod:`llama_train.recipe.branches`), survives regardless. Saved
    states may hold tensors, numbers, strings, None, and lists, tuples and
    dicts of them: they are loaded with ``weights_only=True``.
    """

    def __init__(
        self,
        directory: str | Path,
        keep: int | None = 2,
        *,
        payload: PayloadFormat | None = None,
        pinned: Iterable[int] = (),
    ) -> None:
        if keep is not None and keep < 1:
            raise LlamaTrainError(f"checkpoint.keep must be at least 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.payload = payload if payload is not None else TorchPayload()
        self.pinned = frozenset(pinned)

    def folder(self, step: int) -> Path:
        """Where the checkpoint of `step` lives (whether or not it exists)."""
        return self.directory / f"step_{step:06d}"

    # -- saving --------------------------------------------------------------

    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        extra_files: Mapping[str, Callable[[Path], None]] | None = None,
    ) -> Path:
        """Write `state` as the checkpoint of `step` atomically, then apply retention.

        `state` holds "model" and "optimizer" state dicts (written by the
        payload format) and anything else (loader position, RNG states, step)
        in state.pt. A full disk or unwritable directory raises
        LlamaTrainError and leaves no folder that looks like a checkpoint.
        With a process group, every rank calls it (the payload is collective)
        and rank 0's non-payload state is the one written; when it returns, on
        any rank, the checkpoint is published. `extra_files` maps a file name to
        a function that writes it (rank 0 only; e.g. the safetensors weights),
        published and checksummed with the rest.
        """
        if step < 0:
            raise LlamaTrainError(f"checkpoint step must be non-negative, got {step}")
        final = self.folder(step)
        temporary = self.directory / f".{final.name}.tmp"
        writer = distributed.rank() == 0
        payload = {key: state[key] for key in PAYLOAD_KEYS if key in state}
        rest = {key: value for key, value in state.items() if key not in PAYLOAD_KEYS}
        try:
            with distributed.together(f"preparing checkpoint step {step}"):
                if writer:
                    self.directory.mkdir(parents=True, exist_ok=True)
                    self._remove_leftovers()
                    temporary.mkdir()
            with distributed.together(f"writing checkpoint step {step}"):
                self.payload.write(temporary, payload)
            with distributed.together(f"publishing checkpoint step {step}"):
                if writer:
                    for name, write in (extra_files or {}).items():
                        write(temporary / name)
                    self._write_rest(temporary, step, rest, sorted(payload))
                    self._publish(temporary, final)
        except OSError as error:
            if writer:
                shutil.rmtree(temporary, ignore_errors=True)
            raise LlamaTrainError(self._write_error(error, step)) from None
        except BaseException:
            if writer:
                shutil.rmtree(temporary, ignore_errors=True)
            raise
        with distributed.together(f"removing checkpoints older than step {step}"):
            if writer:
                self._apply_retention(protect=step)
        return final

    def _write_rest(
        self, folder: Path, step: int, rest: Mapping[str, Any], payload_keys: list[str]
    ) -> None:
        """state.pt, then meta.json listing every file (the payload's too), all made durable."""
        save_file(folder / STATE_FILE, dict(rest))
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "payload": self.payload.name,
            "payload_keys": payload_keys,
            "world_size": distributed.world_size(),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": {name: _file_record(folder / name, sync=True) for name in _files(folder)},
        }
        with open(folder / META_FILE, "w") as file:
            json.dump(meta, file, indent=1)
            file.flush()
            os.fsync(file.fileno())
        for directory in sorted({path.parent for path in folder.rglob("*")}, reverse=True):
            fsync_directory(directory)  # subfolders first: a multi-file payload's entries too

    def _publish(self, temporary: Path, final: Path) -> None:
        if final.exists():  # saving the same step again: swap, never two at one name
            old = final.with_name(f".{final.name}.delete")
            os.rename(final, old)
            os.rename(temporary, final)
            shutil.rmtree(old)
        else:
            os.rename(temporary, final)
        fsync_directory(self.directory)

    def _write_error(self, error: OSError, step: int) -> str:
        where = f"checkpoint step {step} to {self.directory}"
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return (
                f"no space left on the device while writing {where}; free space or lower "
                "checkpoint.keep"
            )
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"cannot write {where}: permission denied or read-only file system"
        return f"cannot write {where}: {error.strerror or error}"

    # -- retention and evaluation markers ------------------------------------

    def steps(self) -> list[int]:
        """Steps that have a checkpoint folder, oldest first (not yet verified)."""
        return sorted(step for step, _ in self._step_folders())

    def mark_pending_eval(self, step: int) -> None:
        """Protect the checkpoint of `step` from retention until its evaluation is done."""
        folder = self._existing(step)
        (folder / PENDING_EVAL_FILE).touch()
        fsync_directory(folder)

    def clear_pending_eval(self, step: int) -> None:
        """Evaluation of `step` is done: it falls under normal retention again."""
        (self._existing(step) / PENDING_EVAL_FILE).unlink(missing_ok=True)
        self._apply_retention()

    def pending_eval(self) -> list[int]:
        """Steps whose checkpoints are marked pending evaluation, oldest first."""
        return sorted(
            step for step, folder in self._step_folders() if (folder / PENDING_EVAL_FILE).exists()
        )

    def _apply_retention(self, protect: int | None = None) -> None:
        """Delete all but the newest `keep`, the pending ones and `protect` (just saved)."""
        if self.keep is None:
            return
        steps = self.steps()
        protected = set(steps[-self.keep :]) | set(self.pending_eval()) | {protect} | self.pinned
        for step in steps:
            if step not in protected:
                folder = self.folder(step)
                doomed = folder.with_name(f".{folder.name}.delete")
                try:
                    os.rename(folder, doomed)  # a half-deleted folder must not look sound
                    shutil.rmtree(doomed)
                except OSError as error:
                    raise LlamaTrainError(
                        f"cannot delete the old checkpoint {folder}: {error.strerror or error}"
                    ) from None

    def _remove_leftovers(self) -> None:
        for entry in self.directory.iterdir():
            if _HIDDEN_LEFTOVER.match(entry.name):
                shutil.rmtree(entry, ignore_errors=True)

    # -- loading -------------------------------------------------------------

    def load_latest(
        self,
        *,
        map_location: str | torch.device = "cpu",
        into: dict[str, Any] | None = None,
    ) -> tuple[int, dict[str, Any]] | None:
        """The newest sound checkpoint as (step, state); None when there is none yet.

        A checkpoint that fails its checks is skipped with a
        CorruptCheckpointWarning naming the reason; when none is sound,
        LlamaTrainError lists every reason. `into` ({"model": ...,
        "optimizer": ...} from get_state_dict, sharded or not) is filled in
        place by a payload that can (DCP) and returned inside the state. With
        a process group every rank calls it and gets the same step.
        """
        problems = []
        for step in reversed(self.agreed_steps()):
            try:
                return step, self._load(step, map_location, into)
            except _Unusable as reason:
                problems.append(f"{self.folder(step).name} ({reason})")
                if distributed.rank() == 0:
                    warnings.warn(
                        f"checkpoint {self.folder(step)} is unusable ({reason}); "
                        "trying the previous one",
                        CorruptCheckpointWarning,
                        stacklevel=2,
                    )
        if not problems:
            return None
        raise LlamaTrainError(
            f"no usable checkpoint in {self.directory}: {'; '.join(problems)}; "
            "move the directory away to start the run afresh"
        )

    def load(
        self,
        step: int,
        *,
        map_location: str | torch.device = "cpu",
        into: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The state of the checkpoint of `step`; LlamaTrainError if missing or corrupt."""
        folder = self._existing(step)
        try:
            return self._load(step, map_location, into)
        except _Unusable as reason:
            raise LlamaTrainError(f"checkpoint {folder} is unusable: {reason}") from None

    def verified_meta(self, step: int) -> dict[str, Any]:
        """meta.json of `step` once every file it lists matches its size and sha256.

        Reads JSON and hashes files only: nothing in the folder is unpickled.
        LlamaTrainError says why a checkpoint is missing or unusable.
        """
        folder = self._existing(step)
        verdict = self._verdict(folder, step)
        if isinstance(verdict, str):
            raise LlamaTrainError(f"checkpoint {folder} is unusable: {verdict}")
        return verdict

    def agreed_steps(self) -> list[int]:
        """Rank 0's list of checkpoint steps, on every rank (collective; steps() alone is not)."""
        with distributed.together(f"listing the checkpoints in {self.directory}"):
            steps = self.steps() if distributed.rank() == 0 else []
        return distributed.broadcast_object(steps)

    def _load(
        self, step: int, map_location: str | torch.device, into: dict[str, Any] | None
    ) -> dict[str, Any]:
        folder = self.folder(step)
        meta = distributed.broadcast_object(
            self._verdict(folder, step) if distributed.rank() == 0 else None
        )
        if isinstance(meta, str):
            raise _Unusable(meta)
        payload = self._reader(meta["payload"], in_place=into is not None)
        try:
            with distributed.together(f"loading {folder / STATE_FILE}"):
                state = torch.load(
                    folder / STATE_FILE, map_location=map_location, weights_only=True
                )
            if meta["payload_keys"]:
                with distributed.together(f"loading the model and optimizer of {folder}"):
                    if into is not None:
                        payload.read_into(folder, into)  # type: ignore[attr-defined]
                        state.update(into)
                    else:
                        state.update(payload.read(folder, map_location))
        except LlamaTrainError:
            raise  # a refused forged file (core.dcp_reader): refuse outright, no fallback
        except Exception as error:  # checksums passed, yet the content does not load
            raise _Unusable(f"cannot be loaded: {str(error).splitlines()[0]}") from None
        return state

    @staticmethod
    def _verdict(folder: Path, step: int) -> dict[str, Any] | str:
        """The verified metadata of a folder, or why it is unusable (rank 0 checks for all)."""
        try:
            return _verified_meta(folder, step)
        except _Unusable as reason:
            return str(reason)
        except Exception as error:  # a meta.json of the right version but the wrong shape
            return f"{META_FILE} is malformed: {error!r}"

    def _reader(self, name: str, *, in_place: bool) -> PayloadFormat:
        """The payload format a checkpoint was written with (this manager's, or a known one)."""
        if name == self.payload.name:
            payload = self.payload
        elif name in PAYLOAD_FORMATS:
            payload = PAYLOAD_FORMATS[name]()
        else:
            raise _Unusable(f"payload written as {name!r}, this run reads {self.payload.name!r}")
        if in_place and not hasattr(payload, "read_into"):
            raise _Unusable(
                f"payload written as {name!r}, which cannot be resumed in place (an older "
                "single-process format); evaluate it with llama-train eval or use another run.dir"
            )
        return payload

    def _existing(self, step: int) -> Path:
        folder = self.folder(step)
        if not folder.is_dir():
            raise LlamaTrainError(
                f"no checkpoint of step {step} in {self.directory} "
                f"(found: {self.steps() or 'none'})"
            )
        return folder

    def _step_folders(self) -> list[tuple[int, Path]]:
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:
            return []
        except OSError as error:
            raise LlamaTrainError(
                f"cannot read checkpoint directory {self.directory}: {error.strerror or error}"
            ) from None
        found = []
        for entry in entries:
            match = _STEP_FOLDER.match(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
        return found


# ---------------------------------------------------------------------------
# Files, checksums, fsync


def _files(folder: Path) -> list[str]:
    """Every regular file under `folder`, as sorted relative POSIX paths."""
    return sorted(
        path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()
    )


def _file_record(path: Path, *, sync: bool = False) -> dict[str, Any]:
    """Size and sha256 of a file; with `sync`, also make its content durable.

    Syncing here covers payload formats that do not fsync what they write.
    """
    with open(path, "rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
        if sync:
            os.fsync(file.fileno())
    return {"bytes": path.stat().st_size, "sha256": digest}


def _verified_meta(folder: Path, step: int) -> dict[str, Any]:
    """The folder's metadata once every listed file matches its size and checksum."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except FileNotFoundError:
        raise _Unusable(f"{META_FILE} is missing (an interrupted save or copy)") from None
    except (OSError, ValueError) as error:
        raise _Unusable(f"{META_FILE} is unreadable: {error}") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise _Unusable(f"{META_FILE} is not a format {FORMAT_VERSION} checkpoint description")
    if meta.get("step") != step:
        raise _Unusable(f"{META_FILE} says step {meta.get('step')}, the folder says {step}")
    for name, record in meta["files"].items():
        path = folder / name
        if not path.is_file():
            raise _Unusable(f"{name} is missing")
        if path.stat().st_size != record["bytes"]:
            raise _Unusable(f"{name} has {path.stat().st_size} bytes, expected {record['bytes']}")
        if _file_record(path)["sha256"] != record["sha256"]:
            raise _Unusable(f"{name} fails its checksum")
    return meta


# ---------------------------------------------------------------------------
# Random number generator states


def rng_state() -> dict[str, Any]:
    """Every global RNG this process draws from: Python, NumPy, torch CPU and current CUDA.

    Plain types and tensors only, so checkpoints load with weights_only=True.
    CUDA is captured only once initialised (asking would initialise it).
    """
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": keys.tolist(),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (a CUDA state without CUDA: skipped, warned)."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            np.asarray(numpy_state["keys"], dtype=np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"].cpu())
        else:
            warnings.warn(
                "the checkpoint holds a CUDA RNG state but CUDA is not available; "
                "GPU random draws will differ from the original run",
                stacklevel=2,
            )
