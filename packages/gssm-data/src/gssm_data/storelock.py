"""Who may touch a store path: the writers' lock, and what counts as a store of ours.

Every `generate` takes ``<out>.lock`` (an flock, released by the kernel when
its holder dies) *before* it looks at, deletes or creates anything under
``<out>`` or ``<out>.partial``:

- a whole run (no ``--shard``) holds it exclusively, from its first look at
  the paths to the publication of the store, so two runs never interleave: a
  second run waits, then finds the store complete; ``--force`` does not wait
  but refuses, so it can never discard the partial store of a running writer;
- Slurm array tasks (``--shard k/N``) hold it shared, so they write together;
  among them, the finalise lock inside the partial store picks the publisher.

The lock file stays beside the store while shards may hold it. An exclusive
holder removes it when done; a waiter that then gets the lock on the removed
file notices (its descriptor's inode is no longer the path's) and starts over,
so the lock is never held twice.

Anything at ``<out>`` or ``<out>.partial`` that is not a gssm-data store (a
user's folder or file, a symlink) is never replaced or deleted, whatever the
flags: :func:`refuse_foreign` says so in one line.

File systems without flock are not guarded (as before).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from gssm_data.errors import GssmDataError

LOCK_SUFFIX = ".lock"
# Seconds between attempts while another writer holds the lock.
POLL_SECONDS = 0.1
# The manifest sits in zarr.json; a store's zarr.json is a few kB.
_MAX_GROUP_JSON = 16 << 20


def lock_path(out: Path) -> Path:
    """`<out>.lock`, beside the store."""
    return out.with_name(out.name + LOCK_SUFFIX)


@contextlib.contextmanager
def store_lock(
    out: Path, *, shared: bool, wait: bool, log: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold `<out>.lock`: shared (shard tasks) or exclusive (whole runs).

    With `wait`, poll until the lock is free (telling `log` once); without it,
    a busy lock is a GssmDataError. The parent folder must exist.
    """
    path = lock_path(out)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    told = False
    while True:
        descriptor = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(descriptor, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            if not wait:
                raise GssmDataError(
                    f"another gssm-data generate is writing {out} (it holds {path}); "
                    "--force would discard its work: wait for it to end, then run again"
                ) from None
            if not told and log is not None:
                log(f"waiting for another gssm-data generate writing {out} to end")
                told = True
            time.sleep(POLL_SECONDS)
            continue
        except OSError:  # no flock on this file system: unguarded
            pass
        if _same_file(descriptor, path):
            break
        os.close(descriptor)  # the holder removed the file: lock the new one
    try:
        yield
    finally:
        if not shared:
            with contextlib.suppress(OSError):
                os.unlink(path)  # still held: nobody can lock this inode meanwhile
        os.close(descriptor)


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(descriptor)
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


def is_our_store(path: Path) -> bool:
    """True when `path` is a folder whose zarr.json carries a gssm-data manifest.

    Complete or not, damaged chunks or not: what matters is that gssm-data made
    it, so replacing it loses nothing the user put there.
    """
    if path.is_symlink() or not path.is_dir():
        return False
    group = path / "zarr.json"
    try:
        if not group.is_file() or group.stat().st_size > _MAX_GROUP_JSON:
            return False
        data = json.loads(group.read_bytes())
    except (OSError, ValueError):
        return False
    attributes = data.get("attributes") if isinstance(data, dict) else None
    manifest = attributes.get("manifest") if isinstance(attributes, dict) else None
    return isinstance(manifest, dict) and "fingerprint" in manifest


def refuse_foreign(path: Path, *, role: str) -> None:
    """One line when `path` exists but is not a store of ours (never replaced, whatever flags)."""
    if not (path.exists() or path.is_symlink()) or is_our_store(path):
        return
    kind = (
        "a symlink"
        if path.is_symlink()
        else "a folder"
        if path.is_dir()
        else "a file"
        if path.is_file()
        else "something"
    )
    raise GssmDataError(
        f"{path} ({role}) is {kind} that is not a gssm-data store; gssm-data never replaces "
        "or deletes it, even with --force: choose another --out or move it away yourself"
    )


def identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of `path`, None when absent: tells a store apart from its replacement."""
    try:
        info = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino
