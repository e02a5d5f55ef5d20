"""Longer test sequences from the same process: `gssm-data extend`.

A model trained at seq_len T is asked how it fares beyond T (length
extrapolation). A fair test set comes from the very process it learned: the
parent store's stored conditional tables, sampled by the same
:class:`~gssm_data.sampler.BlockSampler` with the same seed, at a longer
seq_len L. This module writes that set as a new store through
:func:`gssm_data.generate.generate` (same writers, checksums, resume, exact
entropy and atomic publication).

A new store rather than a new split of the parent: every split of a store has
the store's one `seq_len` (tokens are (n, seq_len), the manifest's contract
with every reader), so a longer split would break it. The new store:

- holds one split, `test`, of `n_test` sequences of length L, with latents
  when the parent has them;
- has the bytes `gssm-data generate` would write for the test split of the
  parent's graph and seed at seq_len L, hence that store's fingerprint
  (the tables are copied from the parent, never redrawn);
- is a prefix extension of the parent: the sampler consumes its random words
  in time order, so row i starts with row i of the parent's test split;
- records its exact per-position entropy (forward algorithm, whole split) in
  the manifest, and its parent's fingerprint, seq_len and path under `parent`.

`transition` graphs are refused: their kernels are drawn per sequence, so
there are no stored tables to extend and no exact entropy to report.
"""

from __future__ import annotations

import re
from pathlib import Path

from gssm_data.errors import GssmDataError
from gssm_data.generate import (
    GenerateOptions,
    GenerateResult,
    Log,
    build_manifest,
    format_count,
    generate,
)
from gssm_data.manifest import Parent
from gssm_data.store import Store, open_store

EXTENDED_SPLIT = "test"


def default_extended_path(parent: Path, seq_len: int, n_test: int) -> Path:
    """`<parent stem>-len<L>-t<K>.zarr`, beside the parent store."""
    stem = re.sub(r"\.zarr$", "", parent.name)
    return parent.with_name(f"{stem}-len{seq_len}-t{format_count(n_test)}.zarr")


def check_extendable(parent: Store, seq_len: int, n_test: int) -> None:
    """Refuse, in one line each, what extend cannot do with this store."""
    m = parent.manifest
    transition = [node.name for node in m.graph.nodes if node.mode == "transition"]
    if transition:
        raise GssmDataError(
            f"{parent.path} has transition nodes ({', '.join(transition)}): their kernels are "
            "drawn per sequence, so there are no stored tables to extend and no exact "
            "entropy; generate a longer store with `gssm-data generate --seq-len` instead"
        )
    if seq_len <= m.seq_len:
        raise GssmDataError(
            f"--seq-len {seq_len} is not longer than the store's seq_len {m.seq_len}: "
            "extend makes longer test sequences"
        )
    if n_test < 1:
        raise GssmDataError(f"--n-test must be at least 1, got {n_test}")


def extend(
    store: str | Path,
    *,
    seq_len: int,
    n_test: int,
    out: str | Path | None = None,
    workers: int = 1,
    force: bool = False,
    show_progress: bool = False,
    log: Log | None = None,
) -> GenerateResult:
    """Write a store of `n_test` test sequences of `seq_len` tokens from `store`'s tables.

    Safe to run again: a finished store is left alone, an interrupted one resumes.
    """
    parent = open_store(store)
    check_extendable(parent, seq_len, n_test)
    if workers < 1:
        raise GssmDataError(f"--workers must be at least 1, got {workers}")
    m = parent.manifest
    target = Path(out) if out is not None else default_extended_path(parent.path, seq_len, n_test)
    if target.resolve() == parent.path.resolve():
        raise GssmDataError(f"--out {target} is the parent store itself; choose another path")
    options = GenerateOptions(
        graph=m.graph,
        name=m.name,
        out=target,
        n_train=1,  # not written: the manifest below holds the test split only
        n_test=n_test,
        seq_len=seq_len,
        seed=m.seed,
        workers=workers,
        with_latents=m.with_latents,
        force=force,
        block_size=m.block_size,
    )
    full = build_manifest(options)
    manifest = full.model_copy(
        update={
            "splits": {EXTENDED_SPLIT: full.splits[EXTENDED_SPLIT]},
            "parent": Parent(
                fingerprint=m.fingerprint, seq_len=m.seq_len, path=str(parent.path.absolute())
            ),
        }
    )
    return generate(
        options,
        show_progress=show_progress,
        log=log,
        manifest=manifest,
        conditionals=parent.conditionals(),
    )
