"""`gssm-data posterior`: write the filtered posterior p(z_t | x_<=t) into a store.

A thin command over `gssm_data.posterior.write_split_posterior`; the layout it
writes is documented there. Messages on stderr, every user error one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gssm_data.cli.app import app, fail, progress_wanted, say
from gssm_data.cli.entropy import DeviceOption, QuietOption, ThreadsOption, _device, _set_threads
from gssm_data.errors import GssmDataError
from gssm_data.store import open_store


@app.command("posterior")
def posterior_command(
    path: Annotated[Path, typer.Argument(help="Store (a .zarr folder).")],
    split: Annotated[str, typer.Option(help="Split whose sequences to filter.")] = "test",
    rows: Annotated[
        int | None,
        typer.Option(help="Filter only the first N sequences of the split; default all."),
    ] = None,
    joint: Annotated[
        bool,
        typer.Option(
            "--joint",
            help="Also store the posterior of the joint latent state (small graphs only: "
            "at most 1,024 joint states).",
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Recompute even if the same posterior is stored.")
    ] = False,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    quiet: QuietOption = False,
) -> None:
    """Store p(z_t | x_<=t) of every latent node, for every position of the split's rows.

    Computed by the same forward algorithm as the entropy and written to
    <split>/posterior/marginal/<node> (rows, seq_len, states) float32, plus
    <split>/posterior/joint with --joint. The arrays appear only once complete;
    running the same command again does nothing.
    """
    log = say(quiet)
    try:
        chosen = _device(device)
        _set_threads(threads)
        from gssm_data.posterior import write_split_posterior

        store = open_store(path)
        written = write_split_posterior(
            store,
            split,
            rows=rows,
            joint=joint,
            force=force,
            quiet=not progress_wanted(quiet),
            device=chosen,
        )
    except GssmDataError as error:
        raise fail(str(error)) from None
    if written.status == "already-written":
        log(f"{written.path} already holds this posterior ({written.rows:,} sequences)")
    else:
        log(
            f"wrote {written.path} ({written.rows:,} sequences; nodes "
            f"{', '.join(written.nodes)}{'; joint' if written.joint else ''})"
        )
