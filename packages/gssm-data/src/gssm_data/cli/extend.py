"""`gssm-data extend`: longer test sequences from a store's own tables (`gssm_data.extend`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gssm_data.cli.app import app, fail, progress_wanted, say
from gssm_data.common.humanize import parse_count
from gssm_data.errors import GssmDataError
from gssm_data.extend import extend
from gssm_data.generate import available_cpus


@app.command("extend")
def extend_command(
    store: Annotated[Path, typer.Argument(help="Store to extend (a .zarr folder).")],
    seq_len: Annotated[
        int,
        typer.Option(
            "--seq-len", help="Tokens per sequence, longer than the store's (start token included)."
        ),
    ],
    n_test: Annotated[
        str, typer.Option("--n-test", help="Test sequences: 1000, 1_000, 1e3 or 1k.")
    ] = "1000",
    out: Annotated[
        Path | None,
        typer.Option(help="New store; default <store>-len<L>-t<K>.zarr beside the store."),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Writer processes; default: every CPU available.")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Start over and replace an existing store.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress, no messages.")] = False,
) -> None:
    """Write a new store: a test split of longer sequences from STORE's graph tables.

    Same tables, seed and sampler as STORE, so the sequences come from the very
    process a model trained on STORE learned (row i begins with row i of STORE's
    test split); the manifest records the exact entropy at every position and
    STORE's fingerprint as the parent. For length-extrapolation evaluations
    (`llama-train eval RUN --data NEW --rope-scaling ...`). Prints the new
    store's path; resumable like generate.
    """
    log = say(quiet)
    try:
        result = extend(
            store,
            seq_len=seq_len,
            n_test=parse_count(n_test, option="--n-test"),
            out=out,
            workers=available_cpus() if workers is None else workers,
            force=force,
            show_progress=progress_wanted(quiet),
            log=log,
        )
    except GssmDataError as error:
        raise fail(str(error)) from None
    except KeyboardInterrupt:
        raise fail("interrupted: run the same command again to resume", code=130) from None
    if result.status == "complete":
        log(result.summary())
    typer.echo(str(result.path.absolute()))
