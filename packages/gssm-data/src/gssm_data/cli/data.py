"""`gssm-data generate`, `info`, `verify`, `presets`.

Thin commands over `gssm_data.generate` and `gssm_data.store`: they parse
options, turn GssmDataError into one line on stderr (exit 1), and keep stdout
for what scripts read (the store's path, the JSON manifest).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from gssm_data.cli.app import app, console, err_console, fail, progress_wanted, say
from gssm_data.errors import GssmDataError
from gssm_data.generate import (
    GenerateOptions,
    GenerateResult,
    Shard,
    available_cpus,
    default_store_path,
    generate,
    parse_count,
)
from gssm_data.graph import MODES, GraphSpec, load_graph
from gssm_data.presets import load_preset, preset_names
from gssm_data.store import PROGRESS_DIR, Store, open_store, verify_store

# The upstream experiments' reference configuration, and the benchmark's.
DEFAULT_PRESET = "hmm"


def resolve_graph(
    preset: str | None, graph_file: Path | None, mode: str | None
) -> tuple[GraphSpec, str]:
    """The graph to sample and a name for it, from --preset / --graph / --mode."""
    if preset is not None and graph_file is not None:
        raise GssmDataError("give --preset or --graph, not both")
    if graph_file is not None:
        graph, name = load_graph(graph_file), graph_file.stem
    else:
        name = preset or DEFAULT_PRESET
        graph = load_preset(name)
    if mode is not None:
        mode = "default" if mode.lower() == "none" else mode.lower()
        if mode not in MODES:
            raise GssmDataError(f"--mode {mode!r}: choose one of {', '.join(MODES)} (or none)")
        graph = graph.with_mode(mode)
        name = f"{name}-{mode}"
    return graph, name


def _calibrated(
    graph: GraphSpec,
    name: str,
    *,
    seed: int,
    seq_len: int,
    bits: float,
    target: str,
    log: Callable[[str], None],
) -> tuple[GraphSpec, str]:
    if target not in ("latent", "observed"):
        raise GssmDataError(f"--target {target!r}: choose latent or observed")
    from gssm_data.calibrate import calibrate  # helper "entropy"; imported when needed

    calibration = calibrate(
        graph, seed=seed, seq_len=seq_len, target_bits=bits, target=target, log=log
    )
    log(
        f"calibrated {target} alpha = {calibration.alpha:.4g}: "
        f"{calibration.achieved_bits:.4f} bits/token (target {bits:g} "
        f"± {calibration.tolerance_bits:g})"
    )
    return calibration.graph, f"{name}-{bits:g}bits"


# Options shared by `generate` and `submit` (cli/slurm.py): the ones that decide a store.
PresetOption = Annotated[
    str | None,
    typer.Option(help=f"Named graph (see `gssm-data presets`); default {DEFAULT_PRESET}."),
]
GraphOption = Annotated[
    Path | None, typer.Option("--graph", help="Graph spec YAML file, instead of --preset.")
]
ModeOption = Annotated[
    str | None,
    typer.Option(help="Set every latent node's mode: default, transition, slow or dead."),
]
NOption = Annotated[
    str, typer.Option("--n", help="Training sequences: 100000, 100_000, 1e8 or 2.5M.")
]
NTestOption = Annotated[str, typer.Option("--n-test", help="Test sequences.")]
SeqLenOption = Annotated[
    int, typer.Option(help="Tokens per sequence, start token included (257: 256 targets).")
]
SeedOption = Annotated[int, typer.Option(help="Seed of the kernels and of every block.")]
OutOption = Annotated[
    Path | None,
    typer.Option(help="Store path; default datasets/<name>-<fingerprint>-n<N>-t<M>.zarr."),
]
WithLatentsOption = Annotated[
    bool, typer.Option("--with-latents", help="Also store every latent node's states.")
]
TargetBitsOption = Annotated[
    float | None,
    typer.Option(help="Calibrate alpha so the entropy is this many bits per token."),
]
TargetOption = Annotated[
    str, typer.Option(help="Which alphas --target-bits tunes: latent or observed.")
]


def store_options(
    *,
    preset: str | None,
    graph: Path | None,
    mode: str | None,
    n: str,
    n_test: str,
    seq_len: int,
    seed: int,
    out: Path | None,
    with_latents: bool,
    target_bits: float | None,
    target: str,
    workers: int,
    shard: str | None = None,
    force: bool = False,
    log: Callable[[str], None],
) -> GenerateOptions:
    """Validated GenerateOptions from the command-line options (calibrating alpha if asked)."""
    spec, name = resolve_graph(preset, graph, mode)
    if target_bits is not None:
        spec, name = _calibrated(
            spec, name, seed=seed, seq_len=seq_len, bits=target_bits, target=target, log=log
        )
    n_train, n_testing = parse_count(n, option="--n"), parse_count(n_test, option="--n-test")
    if n_train < 1:
        raise GssmDataError("--n must be at least 1")
    if seq_len < 2:
        raise GssmDataError("--seq-len must be at least 2 (a start token and one target)")
    if seed < 0:
        raise GssmDataError("--seed must not be negative")
    if workers < 1:
        raise GssmDataError("--workers must be at least 1")
    path = out or default_store_path(
        name, spec, seed=seed, seq_len=seq_len, n_train=n_train, n_test=n_testing
    )
    return GenerateOptions(
        graph=spec,
        name=name,
        out=path,
        n_train=n_train,
        n_test=n_testing,
        seq_len=seq_len,
        seed=seed,
        workers=workers,
        shard=Shard.parse(shard) if shard is not None else None,
        with_latents=with_latents,
        force=force,
    )


@app.command("generate")
def generate_command(
    preset: PresetOption = None,
    graph: GraphOption = None,
    mode: ModeOption = None,
    n: NOption = "100_000",
    n_test: NTestOption = "10_000",
    seq_len: SeqLenOption = 257,
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
        ("created", m.created_at),
        ("format", f"{m.format_version} (gssm-data {m.package_version})"),
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
        with Progress(
            TextColumn("verifying"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=err_console,
            disable=not progress_wanted(quiet),
        ) as progress:
            task = progress.add_task("verify", total=total)
            problems = verify_store(store, on_block=lambda *_: progress.advance(task))
    except GssmDataError as error:
        raise fail(str(error)) from None
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise fail(f"{path} is damaged: {problems[0]}{more}")
    typer.echo(f"ok: {path} ({total} block{'s' if total != 1 else ''}, every checksum matches)")


@app.command("presets")
def presets_command() -> None:
    """List the named graphs shipped with gssm-data."""
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
