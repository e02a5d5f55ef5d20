"""Materialise a store: blocks, workers, shards, resume, progress, disk check.

The unit of work is one sampler block = one zarr chunk of every per-sequence
array, so any number of processes can write a store at once without ever
touching the same chunk. The life of a store:

0. The writer takes `<out>.lock` before it looks at anything (exclusive for a
   whole run, shared by Slurm array tasks; see :mod:`gssm_data.storelock`),
   after the request passed :mod:`gssm_data.preflight` (sizes, memory, a graph
   whose store can be finished) and, for a new store, the disk check.
1. `<out>.partial` is laid out (manifest with `complete: false`, conditional
   tables, empty arrays) in a private folder, then renamed into place, so
   concurrent shards agree on one layout.
2. Writers draw their blocks (`BlockSampler.block(STREAMS[split], b)`, the last
   one truncated), write them, then drop a marker `_progress/<split>/<b>`
   holding the block's CRC-32. A killed run leaves at most unmarked blocks,
   which the next run of the same command rewrites.
3. Whoever writes the last block takes `_progress/finalise.lock` (O_EXCL),
   rereads every block against its marker, records the checksums, measures
   the entropy (test to a target standard error, train to ten times it; see
   :data:`DEFAULT_ENTROPY_STDERR_BITS`), marks the
   manifest complete, drops `_progress` and renames `<out>.partial` to `<out>`,
   still under the lock: a store it did not write is never moved.

Workers are spawned processes (never a fork of a threaded parent), each
building its sampler once from the stored tables; at most two blocks per
worker are in flight, so memory does not grow with `--n`.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zstandard
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from gssm_data.common import resources
from gssm_data.common.humanize import format_si
from gssm_data.common.progress import as_mode, progress_display
from gssm_data.common.version import package_version
from gssm_data.errors import GssmDataError
from gssm_data.graph import GraphSpec
from gssm_data.kernels import FIXED_KERNEL_DRAW, draw_kernels
from gssm_data.manifest import Manifest, SplitInfo, fingerprint
from gssm_data.preflight import check_generatable, check_memory, check_sizes
from gssm_data.sampler import BLOCK_SIZE, STREAMS, BlockSampler, state_dtype
from gssm_data.store import (
    PROGRESS_DIR,
    Store,
    block_checksum,
    block_rows,
    check_block,
    create_layout,
    iter_blocks,
    n_blocks,
    open_store,
    partial_path,
    write_checksums,
)
from gssm_data.storelock import identity, refuse_foreign, store_lock

# The manifest's entropy of a split is a mean over its first sequences, measured
# until its standard error is at most this many bits (or the split ends): the
# test split's is the floor losses are compared with; the train split's only
# checks that both splits come from one process, so it is measured to ten
# times that, on at most TRAIN_ENTROPY_SEQUENCES.
DEFAULT_ENTROPY_STDERR_BITS = 1e-3
TRAIN_STDERR_FACTOR = 10
TRAIN_ENTROPY_SEQUENCES = 4096
# Blocks submitted per worker ahead of completion: keeps workers busy, memory flat.
_IN_FLIGHT_PER_WORKER = 2
# Free disk demanded on top of the estimate, and the estimate's safety factor.
_DISK_SLACK_BYTES = 64 << 20
_DISK_FACTOR = 1.15
_ESTIMATE_ROWS = 256
_HOST = socket.gethostname()

Log = Callable[[str], None]


# --- options and names ------------------------------------------------------


class Shard(BaseModel):
    """Task `index` of `count` (a Slurm array task): it writes blocks i with i % count == index.

    Blocks are numbered across splits, train first: i = 0 .. train blocks - 1,
    then the test blocks.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(ge=0)
    count: int = Field(ge=1)

    @classmethod
    def parse(cls, text: str) -> Shard:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise GssmDataError(f"--shard {text!r}: write it as k/N, e.g. 0/8 (task k of N)")
        index, count = int(match[1]), int(match[2])
        if count < 1 or index >= count:
            raise GssmDataError(f"--shard {text!r}: need 0 <= k < N (tasks are numbered from 0)")
        return cls(index=index, count=count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


class GenerateOptions(BaseModel):
    """Everything that decides what `generate` writes and how."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    graph: GraphSpec
    name: str = Field(min_length=1, description="preset or graph-file name, for humans")
    out: Path
    n_train: int = Field(ge=1)
    n_test: int = Field(default=10_000, ge=0)
    seq_len: int = Field(default=257, ge=2)
    seed: int = Field(default=0, ge=0)
    workers: int = Field(default=1, ge=1)
    # CPU threads of the entropy pass (run after the writers stop); None = free CPUs.
    threads: int | None = Field(default=None, ge=1)
    # Target standard error of the test split's entropy (module constants).
    entropy_stderr_bits: float = Field(
        default=DEFAULT_ENTROPY_STDERR_BITS, gt=0, allow_inf_nan=False
    )
    shard: Shard | None = None
    with_latents: bool = False
    force: bool = False
    # Part of the fingerprint; only tests use another value (small, fast blocks).
    block_size: int = Field(default=BLOCK_SIZE, ge=1)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.graph, self.seed, self.seq_len, self.block_size)


@dataclass(frozen=True)
class GenerateResult:
    """What a call did. `status`: "complete" (this call published the store),
    "already-complete" (nothing to do), "shard-done" (its blocks are written;
    another task publishes)."""

    path: Path
    status: Literal["complete", "already-complete", "shard-done"]
    blocks_written: int
    blocks_total: int
    seconds: float
    tokens_written: int = 0
    # Wall seconds of each phase this call ran: "write" (of which "first_block": worker
    # start-up and one block), "verify", "entropy".
    phase_seconds: dict[str, float] = field(default_factory=dict)
    # Write rate after the first block: what scales with --n.
    steady_tokens_per_second: float = 0.0

    def summary(self) -> str:
        """One line for people: what was written, how fast, where the time went."""
        write = self.phase_seconds.get("write", 0.0)
        parts = []
        if self.blocks_written:
            parts.append(
                f"wrote {self.blocks_written} blocks ({self.tokens_written / 1e6:.1f} M tokens) "
                f"in {write:.1f} s"
            )
            if self.steady_tokens_per_second:
                parts.append(
                    f"first block after {self.phase_seconds['first_block']:.1f} s, then "
                    f"{self.steady_tokens_per_second / 1e6:.2f} M tokens/s"
                )
        for phase in ("verify", "entropy"):
            if phase in self.phase_seconds:
                parts.append(f"{phase} {self.phase_seconds[phase]:.1f} s")
        parts.append(f"total {self.seconds:.1f} s")
        return "; ".join(parts)


def format_count(count: int) -> str:
    """Short, exact spelling of a count for file names: 1e8, 2.5M, 12345."""
    if count >= 10 and re.fullmatch(r"10*", str(count)):
        return f"1e{len(str(count)) - 1}"
    for suffix, unit in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if count >= unit and count % (unit // 10) == 0:  # at most one decimal
            return f"{count / unit:g}{suffix}"
    return str(count)


def default_store_path(
    name: str, graph: GraphSpec, *, seed: int, seq_len: int, n_train: int, n_test: int
) -> Path:
    """`datasets/<name>-<fingerprint>-n<train>-t<test>.zarr`, relative to the current directory."""
    key = fingerprint(graph, seed, seq_len, BLOCK_SIZE)
    safe = re.sub(r"[^A-Za-z0-9_.+-]", "_", name)
    return Path("datasets") / f"{safe}-{key}-n{format_count(n_train)}-t{format_count(n_test)}.zarr"


def build_manifest(options: GenerateOptions) -> Manifest:
    """The manifest of a store not yet written (`complete: false`, no entropy)."""
    sizes = {"train": options.n_train, "test": options.n_test}
    return Manifest(
        package_version=package_version("gssm-data"),
        name=options.name,
        fingerprint=options.fingerprint,
        graph=options.graph,
        seed=options.seed,
        seq_len=options.seq_len,
        vocab_size=options.graph.vocab_size,
        token_dtype=state_dtype(options.graph.vocab_size).name,
        block_size=options.block_size,
        with_latents=options.with_latents,
        kernel_draw=FIXED_KERNEL_DRAW,
        splits={
            split: SplitInfo(n=n, blocks=n_blocks(n, options.block_size))
            for split, n in sizes.items()
        },
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def available_cpus() -> int:
    """CPUs this process may use (Slurm, taskset, a cgroup quota), at least 1."""
    return resources.available_cpus()


# --- the entry point --------------------------------------------------------


def generate(
    options: GenerateOptions,
    *,
    show_progress: bool = False,
    log: Log | None = None,
    manifest: Manifest | None = None,
    conditionals: Mapping[str, np.ndarray] | None = None,
) -> GenerateResult:
    """Write (or resume, or finish) the store `options.out`; safe to run again after a kill.

    `manifest` and `conditionals` replace what `options` implies (its
    `build_manifest` and the tables drawn from its seed): `gssm_data.extend`
    writes a test-only store of a parent's tables that way, through the same
    writers, checks and publication. `options` then still gives out, workers,
    shard and force.

    Raises GssmDataError for every user-facing problem (existing store without
    `force`, a partial store with other settings, too little disk, a file
    system error such as a permission or a full disk mid-run).
    """
    try:
        return _generate(
            options,
            show_progress=show_progress,
            log=log,
            manifest=manifest,
            conditionals=conditionals,
        )
    except OSError as error:
        raise GssmDataError(
            f"{error}; fix that, then run the same command again to resume"
        ) from None


def _generate(
    options: GenerateOptions,
    *,
    show_progress: bool,
    log: Log | None,
    manifest: Manifest | None,
    conditionals: Mapping[str, np.ndarray] | None,
) -> GenerateResult:
    started = time.perf_counter()
    say = log or (lambda message: None)
    final, partial = options.out, partial_path(options.out)
    if options.force and options.shard is not None:
        raise GssmDataError(
            "--force cannot be combined with --shard (each task would discard the others' "
            f"work); delete {final} and {partial} first, then start the tasks"
        )
    manifest = manifest or build_manifest(options)
    check_sizes(
        n_train=manifest.splits["train"].n if "train" in manifest.splits else 0,
        n_test=manifest.splits["test"].n if "test" in manifest.splits else 0,
        seq_len=manifest.seq_len,
        block_size=manifest.block_size,
    )
    check_generatable(manifest.graph)
    check_memory(
        manifest.graph,
        seq_len=manifest.seq_len,
        block_size=manifest.block_size,
        workers=options.workers,
    )
    total = sum(info.blocks for info in manifest.splits.values())

    phases: dict[str, float] = {}
    tokens_written, steady_rate = 0, 0.0

    def result(status: Literal["complete", "already-complete", "shard-done"], written: int):
        seconds = time.perf_counter() - started
        return GenerateResult(
            final, status, written, total, seconds, tokens_written, phases, steady_rate
        )

    refuse_foreign(final, role="--out")
    refuse_foreign(partial, role="the unfinished store of --out")
    final.parent.mkdir(parents=True, exist_ok=True)
    # Nothing under `final` or `partial` is read, deleted or created before this lock.
    with store_lock(final, shared=options.shard is not None, wait=not options.force, log=say):
        refuse_foreign(final, role="--out")
        refuse_foreign(partial, role="the unfinished store of --out")
        if _already_written(options, manifest):
            say(f"{final} is already complete")
            return result("already-complete", 0)
        replacing = identity(final) if options.force else None
        if options.force and partial.exists():
            say(f"--force: discarding {partial}")
            shutil.rmtree(partial)
        store = _open_or_create_partial(partial, manifest, conditionals)
        if store.manifest.complete:  # finished earlier, killed before the rename
            return result(_publish(partial, final, manifest, replacing=replacing, log=say), 0)
        with contextlib.ExitStack() as stack:
            if options.shard is not None:  # the same task twice at once is refused
                stack.enter_context(_writer_lock(partial, options.shard))
            pool = stack.enter_context(_Workers(partial, options.workers))
            done = _finished_blocks(partial)
            todo = [
                (split, block)
                for i, (split, block) in enumerate(iter_blocks(manifest))
                if (split, block) not in done
                and (options.shard is None or i % options.shard.count == options.shard.index)
            ]
            if done:
                say(f"resuming {partial}: {len(done)}/{total} blocks already written")
            remaining = total - len(done)
            if remaining:
                _check_disk(store.manifest, store.conditionals(), store.path, remaining)
            tokens_written, steady_rate = _run_blocks(store, todo, pool, show_progress, phases)
            done = _finished_blocks(partial)
            if len(done) < total:
                if options.shard is None:
                    raise GssmDataError(
                        f"{total - len(done)} blocks are missing; run the command again"
                    )
                say(
                    f"shard {options.shard}: its blocks are written ({len(done)}/{total} of "
                    f"the store); the task that writes the last block publishes {final}"
                )
                return result("shard-done", len(todo))
            with _finalise_lock(partial, sharded=options.shard is not None) as owned:
                if not owned:
                    say(f"shard {options.shard}: done; another task is publishing {final}")
                    return result("shard-done", len(todo))
                _finalise(
                    store,
                    done,
                    pool,
                    show_progress,
                    phases,
                    threads=options.threads,
                    stderr_bits=options.entropy_stderr_bits,
                )
                status = _publish(partial, final, manifest, replacing=replacing, log=say)
        return result(status, len(todo) if status == "complete" else 0)


def _already_written(options: GenerateOptions, manifest: Manifest) -> bool:
    """True when `out` already holds this very store; raise when it holds another.

    Running the same command again is then a no-op (a requeued Slurm task
    finds nothing to do); another store of ours at `out` is replaced only with
    --force (anything else never: see `refuse_foreign`).
    """
    final = options.out
    if not final.exists():
        return False
    try:
        existing = open_store(final).manifest
    except GssmDataError as error:
        if options.force:
            return False
        raise GssmDataError(
            f"{final} exists but is not a complete store ({error}); "
            "add --force to replace it, or choose another --out"
        ) from None
    if _same_plan(existing, manifest):
        return True
    if options.force:
        return False
    raise GssmDataError(
        f"{final} already exists with other settings ({_plan_difference(existing, manifest)}); "
        "add --force to replace it, or choose another --out"
    )


def _plan(manifest: Manifest) -> dict[str, object]:
    """What must agree for two runs to write the same store."""
    return {
        "fingerprint": manifest.fingerprint,
        "with_latents": manifest.with_latents,
        **{f"n_{split}": info.n for split, info in manifest.splits.items()},
    }


def _same_plan(a: Manifest, b: Manifest) -> bool:
    return _plan(a) == _plan(b)


def _plan_difference(existing: Manifest, wanted: Manifest) -> str:
    old, new = _plan(existing), _plan(wanted)
    return ", ".join(
        f"{key} {old.get(key)} there, {new.get(key)} here"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    )


# --- the partial store ------------------------------------------------------


def _open_or_create_partial(
    partial: Path, manifest: Manifest, conditionals: Mapping[str, np.ndarray] | None
) -> Store:
    """Open `<out>.partial`, creating it first if needed; refuse one with other settings.

    A new store gets `conditionals`, or else the tables drawn from the manifest's
    seed; the disk is checked before anything is written.
    """
    _remove_stale_creations(partial)
    if not partial.exists():
        if conditionals is None:
            conditionals = draw_kernels(manifest.graph, manifest.seed)
        total = sum(info.blocks for info in manifest.splits.values())
        _check_disk(manifest, conditionals, partial.parent, total)  # before writing anything
        staging = partial.with_name(f"{partial.name}.creating-{_HOST}-{os.getpid()}")
        create_layout(staging, manifest, conditionals)
        for split in manifest.splits:
            (staging / PROGRESS_DIR / split).mkdir(parents=True)
        try:
            staging.rename(partial)
        except OSError:  # another shard created it first: use theirs
            shutil.rmtree(staging, ignore_errors=True)
    store = open_store(partial, mode="r+", allow_incomplete=True)
    if not _same_plan(store.manifest, manifest):
        raise GssmDataError(
            f"{partial} holds an interrupted run with other settings "
            f"({_plan_difference(store.manifest, manifest)}); run with those settings to "
            "resume it, or add --force to discard it"
        )
    if not store.manifest.complete and not (partial / PROGRESS_DIR).is_dir():
        raise GssmDataError(
            f"{partial} has no {PROGRESS_DIR} folder: another task may be publishing it "
            "(run again in a minute), or it was damaged (add --force to start over)"
        )
    return store


def _remove_stale_creations(partial: Path) -> None:
    """Delete staging folders left by a creator on this host that has died."""
    for staging in partial.parent.glob(f"{partial.name}.creating-*"):
        host, _, pid = staging.name.removeprefix(f"{partial.name}.creating-").rpartition("-")
        if host == _HOST and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _finished_blocks(partial: Path) -> dict[tuple[str, int], int]:
    """(split, block) -> CRC-32 of every block with a marker."""
    done = {}
    root = partial / PROGRESS_DIR
    for split_dir in root.iterdir():
        if not split_dir.is_dir():
            continue
        for marker in split_dir.iterdir():
            if marker.name.isdigit():
                done[(split_dir.name, int(marker.name))] = int(marker.read_text())
    return done


def _write_marker(partial: Path, split: str, block: int, crc: int) -> None:
    folder = partial / PROGRESS_DIR / split
    temporary = folder / f".{block}.{os.getpid()}.tmp"
    temporary.write_text(f"{crc}\n")
    os.replace(temporary, folder / f"{block:08d}")


@contextlib.contextmanager
def _writer_lock(partial: Path, shard: Shard | None) -> Iterator[None]:
    """Refuse a second concurrent run of the same task on the same store.

    An flock is released by the kernel when its holder dies, so a killed run
    never blocks the next one. File systems without flock are not guarded.
    """
    import fcntl

    label = "whole" if shard is None else f"shard-{shard.index}-of-{shard.count}"
    path = partial / PROGRESS_DIR / f"writer-{label}.lock"
    descriptor = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GssmDataError(
                f"another gssm-data generate is already writing {partial} "
                f"({'all blocks' if shard is None else f'shard {shard}'}); wait for it to end"
            ) from None
        except OSError:
            pass  # no flock on this file system
        yield
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def _finalise_lock(partial: Path, *, sharded: bool) -> Iterator[bool]:
    """Yield True to the one process that may finalise (O_EXCL lock file), else False."""
    lock = partial / PROGRESS_DIR / "finalise.lock"
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            if holder.get("host") == _HOST and not _alive(int(holder.get("pid", 0))):
                lock.unlink(missing_ok=True)  # its holder died: take over
                continue
            if sharded:
                yield False
                return
            raise GssmDataError(
                f"{partial} is being finalised by pid {holder.get('pid')} on "
                f"{holder.get('host')}; if that process is gone, delete {lock} and run again"
            ) from None
        with os.fdopen(descriptor, "w") as handle:
            json.dump({"host": _HOST, "pid": os.getpid()}, handle)
        try:
            yield True
        finally:
            lock.unlink(missing_ok=True)
        return
    raise GssmDataError(f"could not take {lock}; delete it and run again")


def _read_lock(lock: Path) -> dict[str, object]:
    try:
        data = json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# --- disk ---------------------------------------------------------------------


def _check_disk(
    m: Manifest, conditionals: Mapping[str, np.ndarray], where: Path, remaining_blocks: int
) -> None:
    """Refuse to start when the remaining blocks would not fit on the disk at `where`."""
    per_row = _compressed_bytes_per_row(m, conditionals)
    rows = remaining_blocks * m.block_size
    needed = int(rows * per_row * _DISK_FACTOR) + _DISK_SLACK_BYTES
    free = shutil.disk_usage(where).free
    if needed > free:
        raise GssmDataError(
            f"not enough free disk for {where}: about {_gigabytes(needed)} needed, "
            f"{_gigabytes(free)} free; free some space or choose --out on another disk"
        )


def _compressed_bytes_per_row(m: Manifest, conditionals: Mapping[str, np.ndarray]) -> float:
    """Compressed bytes per sequence, from a small sample drawn like the real blocks."""
    sampler = BlockSampler(m.graph, conditionals, m.seq_len, m.seed, _ESTIMATE_ROWS)
    sample = sampler.block(STREAMS["train"], 0, with_latents=m.with_latents)
    compressor = zstandard.ZstdCompressor(level=3)
    arrays = [sample.tokens, *sample.latents.values()]
    return sum(len(compressor.compress(a.tobytes())) for a in arrays) / _ESTIMATE_ROWS


def _gigabytes(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.2f} GB"


# --- workers ------------------------------------------------------------------


class BlockWriter:
    """Draws, writes and checks blocks of one partial store (one per process)."""

    def __init__(self, partial: Path) -> None:
        self.store = open_store(partial, mode="r+", allow_incomplete=True)
        self.sampler = self.store.sampler()
        m = self.store.manifest
        self.latent_names = [node.name for node in m.graph.latents] if m.with_latents else []
        # Per split: the tokens array, then each stored latent array (same order as the CRC).
        self.arrays = {
            split: [self.store.tokens(split)]
            + [self.store.latents(split, name) for name in self.latent_names]
            for split in m.splits
        }

    def write(self, split: str, block: int) -> int:
        """Draw block `block` of `split`, write its chunks, then mark it done; returns rows."""
        m = self.store.manifest
        start, stop = block_rows(m.splits[split].n, m.block_size, block)
        sampled = self.sampler.block(STREAMS[split], block, with_latents=m.with_latents)
        tokens = sampled.tokens[: stop - start]
        latents = [sampled.latents[name][: stop - start] for name in self.latent_names]
        for array, values in zip(self.arrays[split], [tokens, *latents], strict=True):
            array[start:stop] = values
        _write_marker(self.store.path, split, block, block_checksum(tokens, latents))
        return stop - start

    def check(self, split: str, block: int, expected_crc: int) -> str | None:
        return check_block(self.store, split, block, expected_crc)


_WRITER: BlockWriter | None = None


def _init_worker(partial: str, parent_pid: int) -> None:
    """Pool initializer: build this process's writer once; die with the parent."""
    global _WRITER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    _WRITER = BlockWriter(Path(partial))

    def watch_parent() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch_parent, daemon=True).start()


def _worker_write(split: str, block: int) -> int:
    assert _WRITER is not None
    return _WRITER.write(split, block)


def _worker_check(split: str, first: int, checksums: list[int]) -> list[tuple[int, str]]:
    """Check blocks first, first + 1, ... against their checksums; return the bad ones."""
    assert _WRITER is not None
    problems = []
    for block, crc in enumerate(checksums, start=first):
        problem = _WRITER.check(split, block, crc)
        if problem is not None:
            problems.append((block, problem))
    return problems


# Most blocks per verification task: a check takes about 2 ms, so one block per
# task would spend more time in inter-process messages than in checking.
_CHECK_BATCH = 64

BlockTask = tuple[Any, ...]


class _Workers:
    """Runs block tasks in this process (one worker) or in one spawned pool, made once.

    Spawn, not fork: the parent has threads (zarr's event loop), and forking a
    threaded process can deadlock. Each pool process builds its BlockWriter
    once (initializer). At most `workers * _IN_FLIGHT_PER_WORKER` tasks are
    pending, so memory stays flat whatever the number of blocks.
    """

    def __init__(self, partial: Path, workers: int) -> None:
        self.partial = partial
        self.workers = workers
        self._executor: futures.ProcessPoolExecutor | None = None

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def map(
        self,
        function: Callable[..., object],
        tasks: list[BlockTask],
        on_result: Callable[[BlockTask, object], None],
    ) -> None:
        """Call `on_result(task, function(*task))` for every task (in completion order)."""
        if not tasks:
            return
        if self.workers == 1 or len(tasks) == 1:
            self._map_here(function, tasks, on_result)
        else:
            self._map_pool(function, tasks, on_result)

    def _map_here(self, function, tasks, on_result) -> None:
        global _WRITER
        previous, _WRITER = _WRITER, BlockWriter(self.partial)
        try:
            for task in tasks:
                on_result(task, function(*task))
        finally:
            _WRITER = previous

    def _map_pool(self, function, tasks, on_result) -> None:
        if self._executor is None:
            self._executor = futures.ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(str(self.partial), os.getpid()),
            )
        pending: dict[futures.Future[object], BlockTask] = {}
        queue = iter(tasks)
        try:
            while True:
                for task in queue:
                    pending[self._executor.submit(function, *task)] = task
                    if len(pending) >= self.workers * _IN_FLIGHT_PER_WORKER:
                        break
                if not pending:
                    break
                finished, _ = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
                for future in finished:
                    task = pending.pop(future)
                    on_result(task, future.result())
        except futures.process.BrokenProcessPool:
            self._executor = None
            raise GssmDataError(
                "a worker process died (killed, or out of memory?); run the same command again "
                "to resume"
            ) from None
        finally:
            for future in pending:
                future.cancel()


def _run_blocks(
    store: Store,
    todo: list[tuple[str, int]],
    pool: _Workers,
    progress: bool,
    phases: dict[str, float],
) -> tuple[int, float]:
    """Write every block of `todo`, showing tokens/s and ETA when asked.

    Returns the tokens written and the rate after the first block (worker
    start-up excluded: the figure that scales with --n).
    """
    m = store.manifest
    clock = time.perf_counter()
    first_tokens = 0
    rows = [block_rows(m.splits[split].n, m.block_size, block) for split, block in todo]
    tokens_total = sum((stop - start) * m.seq_len for start, stop in rows)
    with _progress_bar(progress) as bar:
        task = bar.add_task("writing blocks", total=tokens_total, blocks=f"0/{len(todo)}")
        count = 0

        def on_result(_: BlockTask, rows: object) -> None:
            nonlocal count, first_tokens
            count += 1
            assert isinstance(rows, int)
            if count == 1:
                phases["first_block"] = time.perf_counter() - clock
                first_tokens = rows * m.seq_len
            bar.update(task, advance=rows * m.seq_len, blocks=f"{count}/{len(todo)}")

        pool.map(_worker_write, list(todo), on_result)
    phases["write"] = time.perf_counter() - clock
    steady = phases["write"] - phases.get("first_block", 0.0)
    rate = (tokens_total - first_tokens) / steady if len(todo) > 1 and steady > 0 else 0.0
    return tokens_total, rate


def _finalise(
    store: Store,
    done: dict[tuple[str, int], int],
    pool: _Workers,
    progress: bool,
    phases: dict[str, float],
    *,
    threads: int | None = None,
    stderr_bits: float = DEFAULT_ENTROPY_STDERR_BITS,
) -> None:
    """Check every block against its marker, then record checksums, entropy, completion."""
    m = store.manifest
    clock = time.perf_counter()
    batch = max(1, min(_CHECK_BATCH, len(done) // (4 * pool.workers)))
    tasks: list[BlockTask] = [
        (split, first, [done[(split, b)] for b in range(first, min(first + batch, n))])
        for split, n in ((split, info.blocks) for split, info in m.splits.items())
        for first in range(0, n, batch)
    ]
    problems: list[tuple[str, int, str]] = []
    with _progress_bar(progress) as bar:
        task = bar.add_task(
            "verifying blocks", total=len(done), blocks=f"{len(done)} blocks", unit="blocks"
        )

        def on_result(check_task: BlockTask, found: object) -> None:
            assert isinstance(found, list)
            problems.extend((check_task[0], block, problem) for block, problem in found)
            bar.update(task, advance=len(check_task[2]))

        pool.map(_worker_check, tasks, on_result)
    phases["verify"] = time.perf_counter() - clock
    pool.close()  # free the workers' memory before the entropy pass
    if problems:
        for split, block, _ in problems:  # unmark them: the next run rewrites them
            (store.path / PROGRESS_DIR / split / f"{block:08d}").unlink(missing_ok=True)
        split, block, message = problems[0]
        raise GssmDataError(
            f"{len(problems)} block(s) failed verification (first: block {block} of {split}: "
            f"{message}); they were unmarked: run the same command again to rewrite them"
        )
    for split, info in m.splits.items():
        checksums = np.array([done[(split, b)] for b in range(info.blocks)], dtype=np.uint32)
        write_checksums(store, split, checksums)
    clock = time.perf_counter()
    resources.set_torch_threads(threads)  # the writers are gone: the free CPUs are ours
    splits = {split: _measured(store, split, progress, stderr_bits) for split in m.splits}
    phases["entropy"] = time.perf_counter() - clock
    _remove_temporary_files(store.path)
    store.write_manifest(m.model_copy(update={"splits": splits, "complete": True}))
    shutil.rmtree(store.path / PROGRESS_DIR, ignore_errors=True)


def _measured(store: Store, split: str, progress: bool, stderr_bits: float) -> SplitInfo:
    """A split's info with its entropy and baselines, over its first sequences (module
    constants)."""
    from gssm_data.entropy import measure_split  # imported when needed: it loads torch

    info = store.manifest.splits[split]
    if info.n == 0:
        return info
    limit, target = None, stderr_bits
    if split == "train":
        limit, target = TRAIN_ENTROPY_SEQUENCES, stderr_bits * TRAIN_STDERR_FACTOR
    entropy, baselines = measure_split(
        store, split, max_sequences=limit, stderr_bits=target, quiet=not progress
    )
    return info.model_copy(update={"entropy": entropy, "baselines": baselines})


def _remove_temporary_files(root: Path) -> None:
    """Drop the temporary files a killed zarr write may leave beside chunks."""
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".partial") or name.endswith(".tmp"):
                Path(folder, name).unlink(missing_ok=True)


def _publish(
    partial: Path,
    final: Path,
    manifest: Manifest,
    *,
    replacing: tuple[int, int] | None,
    log: Log,
) -> Literal["complete", "already-complete"]:
    """Rename the finished partial store into place; called under the store lock.

    Only the store this run was asked to replace (--force: `replacing` is its
    identity when the run started) is moved aside, and deleted once the new
    one is in place. Any other store at `final` is never touched: another
    shard task that published first, or (where flock does not work) another
    run; see :func:`_keep_theirs`.
    """
    current = identity(final)
    if current is not None and current != replacing:
        return _keep_theirs(partial, final, manifest, log)
    replaced = None
    if current is not None:
        replaced = final.with_name(f"{final.name}.replaced-{os.getpid()}")
        final.rename(replaced)
    try:
        partial.rename(final)
    except OSError:  # gone (published by another task), or `final` appeared meanwhile
        if replaced is not None:
            raise
        return _keep_theirs(partial, final, manifest, log)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    return "complete"


def _keep_theirs(
    partial: Path, final: Path, manifest: Manifest, log: Log
) -> Literal["already-complete"]:
    """Leave a store published by someone else in place.

    The same store (same plan; the bytes are deterministic): drop this run's
    copy and report the path. Anything else: stop, keeping this run's copy.
    """
    try:
        theirs = open_store(final).manifest
    except GssmDataError:
        theirs = None
    if theirs is not None and _same_plan(theirs, manifest):
        log(f"{final} was published by another run meanwhile; keeping it")
        shutil.rmtree(partial, ignore_errors=True)
        return "already-complete"
    raise GssmDataError(
        f"{final} appeared while this run was writing; it was left alone and this run's "
        f"finished store is at {partial}"
    )


# --- progress -------------------------------------------------------------------


class _Speed(ProgressColumn):
    """Items per second in the task's own unit (field `unit`: tokens written, blocks checked)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "tok")
        if speed is None:
            return Text(f"-- {unit}/s", style="progress.data.speed")
        return Text(f"{format_si(speed)} {unit}/s", style="progress.data.speed")


@contextlib.contextmanager
def _progress_bar(show: bool) -> Iterator[Progress]:
    """A rich progress bar on a terminal, periodic lines in a log, or nothing."""
    progress = progress_display(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[blocks]}"),
        _Speed(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        mode=as_mode(show),
    )
    with progress:
        yield progress
