"""`gssm-data generate`, `info`, `verify`, `presets`.

Thin commands over `gssm_data.generate` and `gssm_data.store`: they parse
options, turn GssmDataError into one line on stderr (exit 1), and keep stdout
for what scripts read (the store's path, the JSON manifest).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from gssm_data.cli.app import app, console, err_console, fail, progress_wanted, say
from gssm_data.cli.options import (
    EntropyStderrOption,
    GraphOption,
    ModeOption,
    NOption,
    NTestOption,
    OutOption,
    PresetOption,
    SeedOption,
    SeqLenOption,
    TargetBitsOption,
    TargetOption,
    ThreadsOption,
    WithLatentsOption,
    store_options,
)
from gssm_data.common.progress import progress_display, progress_mode
from gssm_data.errors import GssmDataError
from gssm_data.generate import (
    DEFAULT_ENTROPY_STDERR_BITS,
    GenerateResult,
    available_cpus,
    generate,
)
from gssm_data.graph import GraphSpec
from gssm_data.preflight import finite
from gssm_data.presets import load_preset, preset_names
from gssm_data.store import PROGRESS_DIR, Store, name_dimensions, open_store, verify_store


@app.command("generate")
def generate_command(
    preset: PresetOption = None,
    graph: GraphOption = None,
    mode: ModeOption = None,
    n: NOption = "100_000",
    n_test: NTestOption = "10_000",
    seq_len: SeqLenOption = "257",
    seed: SeedOption = 0,
    out: OutOption = None,
    workers: Annotated[
        int | None, typer.Option(help="Writer processes; default: every CPU available.")
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(help="k/N: write only task k's blocks of N (Slurm array tasks)."),
    ] = None,
    with_latents: WithLatentsOption = False,
    force: Annotated[
        bool, typer.Option("--force", help="Start over and replace an existing store.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress, no messages.")] = False,
    target_bits: TargetBitsOption = None,
    target: TargetOption = "latent",
    threads: ThreadsOption = None,
    entropy_stderr_bits: EntropyStderrOption = DEFAULT_ENTROPY_STDERR_BITS,
) -> None:
    """Sample a train/test dataset into a Zarr store and print the store's path.

    Resumable: after a kill, run the same command again. Same spec and seed
    give the same bytes whatever --workers or --shard.
    """
    log = say(quiet)
    try:
        options = store_options(
            preset=preset,
            graph=graph,
            mode=mode,
            n=n,
            n_test=n_test,
            seq_len=seq_len,
            seed=seed,
            out=out,
            with_latents=with_latents,
            target_bits=target_bits,
            target=target,
            workers=available_cpus() if workers is None else workers,
            shard=shard,
            force=force,
            log=log,
        )
        if threads is not None and threads < 1:
            raise GssmDataError("--threads must be at least 1")
        finite(entropy_stderr_bits, "--entropy-stderr-bits")
        if entropy_stderr_bits <= 0:
            raise GssmDataError("--entropy-stderr-bits must be positive")
        options = options.model_copy(
            update={"threads": threads, "entropy_stderr_bits": entropy_stderr_bits}
        )
        result = generate(options, show_progress=progress_wanted(quiet), log=log)
    except GssmDataError as error:
        raise fail(str(error)) from None
    except KeyboardInterrupt:
        raise fail("interrupted: run the same command again to resume", code=130) from None
    _report(result, log)


def _report(result: GenerateResult, log: Callable[[str], None]) -> None:
    if result.status == "shard-done":
        return  # the store is published by another task; stdout only names real stores
    if result.status == "complete":
        log(result.summary())
    typer.echo(str(result.path.absolute()))


@app.command("info")
def info_command(
    path: Annotated[Path, typer.Argument(help="Store (a .zarr folder).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Show a store's manifest: graph, sizes, fingerprint, entropy."""
    try:
        store = open_store(path, allow_incomplete=True)
    except GssmDataError as error:
        raise fail(str(error)) from None
    if as_json:
        typer.echo(store.manifest.model_dump_json(indent=2))
        return
    console.print(_summary_table(store))
    console.print(_graph_table(store.graph))
    console.print(_splits_table(store))


def _summary_table(store: Store) -> Table:
    m = store.manifest
    table = Table(title=f"{store.path}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    total = sum(info.blocks for info in m.splits.values())
    status = "yes" if m.complete else f"no ({_written_blocks(store)}/{total} blocks written)"
    for key, value in (
        ("name", m.name),
        ("fingerprint", m.fingerprint),
        ("complete", status),
        ("seed", m.seed),
        ("seq_len", m.seq_len),
        ("vocab_size", m.vocab_size),
        ("token dtype", m.token_dtype),
        ("block size", m.block_size),
        ("latents stored", "yes" if m.with_latents else "no"),
        *(
            (f"{split} split", f"{info.n:,} sequences ({info.blocks:,} blocks)")
            for split, info in m.splits.items()
        ),
        *(
            [("parent", f"{m.parent.fingerprint} (seq_len {m.parent.seq_len}, {m.parent.path})")]
            if m.parent
            else []
        ),
        ("created", m.created_at),
        ("format", f"{m.format_version} (gssm-data {m.package_version})"),
        ("kernel draw", m.kernel_draw),
    ):
        table.add_row(key, str(value))
    return table


def _written_blocks(store: Store) -> int:
    progress = store.path / PROGRESS_DIR
    if not progress.is_dir():
        return 0
    return sum(
        1
        for folder in progress.iterdir()
        if folder.is_dir()
        for f in folder.iterdir()
        if f.name.isdigit()
    )


def _graph_table(graph: GraphSpec) -> Table:
    table = Table(title=f"graph: {graph.description}" if graph.description else "graph")
    for column in ("node", "states", "alpha", "parents", "kernel", "mode", "observed"):
        table.add_column(column)
    for node in graph.order:
        table.add_row(
            node.name,
            str(node.states),
            f"{node.alpha:g}",
            ", ".join(node.parents) or "-",
            node.kernel,
            node.mode + (f" (c={node.c})" if node.mode == "dead" else ""),
            "yes" if node.observed else "",
        )
    return table


def _splits_table(store: Store) -> Table:
    """Entropy beside its three upper bounds; narrow enough for an 80-column terminal."""
    table = Table(title="bits per predicted token", box=box.SIMPLE_HEAD, title_justify="left")
    for column in ("split", "exact ± stderr", "over", "method", "unigram", "zstd", "gzip"):
        table.add_column(column, justify="left" if column in ("split", "method") else "right")
    for split, info in store.manifest.splits.items():
        entropy, baselines = info.entropy, info.baselines
        measured = (
            [
                f"{entropy.bits_per_token:.4f} ± {entropy.stderr / math.log(2):.4f}",
                f"{entropy.n_sequences:,}",
                entropy.method,
            ]
            if entropy
            else ["-"] * 3
        )
        bounds = (
            [
                f"{baselines.unigram_bits:.3f}",
                f"{baselines.zstd_bits:.3f}",
                f"{baselines.gzip_bits:.3f}",
            ]
            if baselines
            else ["-"] * 3
        )
        table.add_row(split, *measured, *bounds)
    return table


@app.command("verify")
def verify_command(
    path: Annotated[Path, typer.Argument(help="Store (a .zarr folder).")],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Check a store: complete, shapes, dtypes, token range, every block's checksum."""
    try:
        store = open_store(path)
        total = sum(info.blocks for info in store.manifest.splits.values())
        with progress_display(
            TextColumn("verifying"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("blocks"),
            TimeRemainingColumn(),
            console=err_console,
            mode=progress_mode(quiet),
        ) as progress:
            task = progress.add_task("verify", total=total)
            problems = verify_store(store, on_block=lambda *_: progress.advance(task))
    except GssmDataError as error:
        raise fail(str(error)) from None
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise fail(f"{path} is damaged: {problems[0]}{more}")
    typer.echo(f"ok: {path} ({total} block{'s' if total != 1 else ''}, every checksum matches)")


@app.command("upgrade")
def upgrade_command(
    path: Annotated[Path, typer.Argument(help="Store (a .zarr folder).")],
) -> None:
    """Add what newer gssm-data writes to an older store: dimension names (for xarray).

    Rewrites only array metadata, atomically; data, checksums and the
    fingerprint are unchanged. Running it again changes nothing.
    """
    try:
        named = name_dimensions(path)
    except GssmDataError as error:
        raise fail(str(error)) from None
    if named:
        typer.echo(f"named the dimensions of {len(named)} array(s) in {path}")
    else:
        typer.echo(f"{path} is up to date")


@app.command("presets")
def presets_command(
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print every preset (name, sizes, full graph) as JSON."),
    ] = False,
) -> None:
    """List the named graphs shipped with gssm-data."""
    if as_json:
        typer.echo(json.dumps([_preset_json(name) for name in preset_names()], indent=2))
        return
    table = Table(title="presets (gssm-data generate --preset NAME)")
    for column in ("name", "nodes", "latent states", "vocab", "description"):
        table.add_column(column, justify="right" if column in ("nodes", "vocab") else "left")
    for name in preset_names():
        graph = load_preset(name)
        sizes = " x ".join(str(node.states) for node in graph.latents)
        joint = graph.joint_latent_states
        table.add_row(
            name,
            str(len(graph.nodes)),
            f"{sizes} = {joint:,}" if len(graph.latents) > 1 else sizes,
            str(graph.vocab_size),
            graph.description,
        )
    console.print(table)


def _preset_json(name: str) -> dict:
    """One preset for `presets --json`: the figures of the table and the graph spec itself."""
    graph = load_preset(name)
    return {
        "name": name,
        "description": graph.description,
        "nodes": len(graph.nodes),
        "latent_states": [node.states for node in graph.latents],
        "joint_latent_states": graph.joint_latent_states,
        "vocab_size": graph.vocab_size,
        "graph": graph.model_dump(mode="json"),
    }
