"""`gssm-data entropy`, `calibrate`, `scaling`.

Thin commands over `gssm_data.entropy`, `gssm_data.calibrate` and
`gssm_data.scaling`: results on stdout (a table, or JSON with --json),
progress and messages on stderr, every user error one line and exit 1.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from gssm_data.cli.app import app, console, fail, progress_wanted, say
from gssm_data.cli.options import (
    GraphOption,
    ModeOption,
    PresetOption,
    ThreadsOption,
    resolve_graph,
)
from gssm_data.errors import GssmDataError
from gssm_data.manifest import Baselines, EntropyStats
from gssm_data.preflight import finite
from gssm_data.store import open_store

if TYPE_CHECKING:
    from gssm_data.scaling import RegimeResult

# The entropy modules import torch: they are imported inside the commands so that
# every other `gssm-data` command, and generate's spawned workers (which re-import
# this package), start without paying for torch.
DEFAULT_TOLERANCE_BITS = 0.05  # = gssm_data.calibrate.DEFAULT_TOLERANCE_BITS (checked in tests)

LN2 = math.log(2)


def _device(device: str) -> str | None:
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise GssmDataError(f"--device {device!r}: choose auto, cpu or cuda[:N]")
    return None if device == "auto" else device


def _set_threads(threads: int | None) -> None:
    """Set torch's CPU threads for this command (None: the idle CPUs, `common.resources`)."""
    if threads is not None and threads < 1:
        raise GssmDataError("--threads must be at least 1")
    from gssm_data.common.resources import set_torch_threads

    set_torch_threads(threads)


DeviceOption = Annotated[
    str, typer.Option(help="Where the forward algorithm runs: auto (GPU if any), cpu, cuda.")
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress, no messages.")]


# --- entropy --------------------------------------------------------------------


@app.command("entropy")
def entropy_command(
    path: Annotated[Path, typer.Argument(help="Store (a .zarr folder).")],
    split: Annotated[str, typer.Option(help="Split to measure: test or train.")] = "test",
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    max_sequences: Annotated[
        int | None, typer.Option(help="Measure only the first N sequences of the split.")
    ] = None,
    write: Annotated[
        bool,
        typer.Option(
            "--write",
            help="Store -log p(x_t | x_<t) of every sequence as <split>/entropy (for the "
            "trainer's excess loss) and the figures in the manifest.",
        ),
    ] = False,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    quiet: QuietOption = False,
) -> None:
    """Exact entropy of a split (the Bayes-optimal loss) beside unigram, zstd and gzip.

    `transition` graphs have no exact figure: the known-kernel loss is shown,
    labelled monte-carlo (see its note).
    """
    try:
        if write and max_sequences is not None:
            raise GssmDataError("--write stores every sequence's values: drop --max-sequences")
        chosen = _device(device)
        _set_threads(threads)
        from gssm_data.entropy import measure_split, write_split_entropy

        store = open_store(path, mode="r+" if write else "r")
        if write:
            stats, baselines = write_split_entropy(
                store, split, quiet=not progress_wanted(quiet), device=chosen
            )
        else:
            stats, baselines = measure_split(
                store,
                split,
                max_sequences=max_sequences,
                quiet=not progress_wanted(quiet),
                device=chosen,
            )
    except GssmDataError as error:
        raise fail(str(error)) from None
    if as_json:
        typer.echo(json.dumps(entropy_json(path, split, stats, baselines), indent=2))
        return
    console.print(_entropy_table(path, split, stats, baselines))
    console.print(_position_table(stats))
    if stats.note:
        console.print(f"note: {stats.note}", highlight=False, soft_wrap=True)
    if write:
        say(quiet)(f"wrote {path}/{split}/entropy ({stats.n_sequences:,} sequences)")


def entropy_json(path: Path, split: str, stats: EntropyStats, baselines: Baselines) -> dict:
    """The figures `entropy --json` prints: entropy (nats and bits), stderr, baselines."""
    return {
        "path": str(path),
        "split": split,
        "method": stats.method,
        "nats_per_token": stats.nats_per_token,
        "bits_per_token": stats.bits_per_token,
        "stderr": stats.stderr,
        "stderr_bits": stats.stderr / LN2,
        "n_sequences": stats.n_sequences,
        "unigram_bits": baselines.unigram_bits,
        "zstd_bits": baselines.zstd_bits,
        "gzip_bits": baselines.gzip_bits,
        "note": stats.note,
        "per_position": stats.per_position,
    }


def _entropy_table(path: Path, split: str, stats: EntropyStats, baselines: Baselines) -> Table:
    table = Table(
        title=f"{split} split: bits per predicted token",
        caption=escape(f"{stats.n_sequences:,} sequences of {path}"),
        title_justify="left",
        caption_justify="left",
    )
    for column in ("measure", "bits/token", "± stderr", "nats/token"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    label = "exact (Bayes-optimal)" if stats.method == "exact" else "known-kernel (monte-carlo)"
    table.add_row(
        label,
        f"{stats.bits_per_token:.4f}",
        f"{stats.stderr / LN2:.4f}",
        f"{stats.nats_per_token:.4f}",
    )
    for name, bits in (
        ("unigram", baselines.unigram_bits),
        ("zstd -19", baselines.zstd_bits),
        ("gzip -9", baselines.gzip_bits),
    ):
        table.add_row(name, f"{bits:.4f}", "", f"{bits * LN2:.4f}")
    return table


def _position_table(stats: EntropyStats) -> Table:
    """The per-position curve at positions 1, 2, 4, ... and the last: context helps."""
    curve = stats.per_position
    positions = sorted(
        {*(2**k for k in range(len(curve).bit_length()) if 2**k <= len(curve)), len(curve)}
    )
    table = Table(title="mean bits at position t", title_justify="left")
    for position in positions:
        table.add_column(f"t={position}", justify="right")
    table.add_row(*(f"{curve[position - 1] / LN2:.3f}" for position in positions))
    return table


# --- calibrate ------------------------------------------------------------------


@app.command("calibrate")
def calibrate_command(
    target_bits: Annotated[float, typer.Option(help="Wanted entropy, bits per predicted token.")],
    preset: PresetOption = None,
    graph: GraphOption = None,
    mode: ModeOption = None,
    target: Annotated[
        str, typer.Option(help="Which alphas to tune: latent (all latent nodes) or observed.")
    ] = "latent",
    seed: Annotated[int, typer.Option(help="Seed of the kernels (as for generate).")] = 0,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence (as for generate).")] = 257,
    tolerance_bits: Annotated[
        float, typer.Option(help="Accept an alpha whose entropy is this close to the target.")
    ] = DEFAULT_TOLERANCE_BITS,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    quiet: QuietOption = False,
) -> None:
    """Find the Dirichlet alpha that gives a target entropy (coarse scan, then refine).

    Scans alpha over 1e-4 .. 100 coarse first, refines brackets that straddle
    the target (best first), then around the closest alphas; a target not
    found names the closest alpha and the range seen. Reproducible: the same
    graph, seed, seq_len and target give the same alpha. Then `gssm-data
    generate --target-bits B` (same options) builds that dataset.
    """
    log = say(quiet)
    try:
        finite(target_bits, "--target-bits")  # before the slow imports
        finite(tolerance_bits, "--tolerance-bits")
        spec, name = resolve_graph(preset, graph, mode)
        if target not in ("latent", "observed"):
            raise GssmDataError(f"--target {target!r}: choose latent or observed")
        _set_threads(threads)
        from gssm_data.calibrate import calibrate

        result = calibrate(
            spec,
            seed=seed,
            seq_len=seq_len,
            target_bits=target_bits,
            target=target,  # type: ignore[arg-type]  (checked above)
            tolerance_bits=tolerance_bits,
            device=_device(device),
            log=log,
        )
    except GssmDataError as error:
        raise fail(str(error)) from None
    if as_json:
        payload = {
            "name": name,
            "target": result.target,
            "alpha": result.alpha,
            "target_bits": result.target_bits,
            "achieved_bits": result.achieved_bits,
            "stderr_bits": result.stderr_bits,
            "tolerance_bits": result.tolerance_bits,
            "evaluations": [list(item) for item in result.evaluations],
            "scanned_range_bits": list(result.scanned_range_bits),
            "graph": result.graph.model_dump(mode="json"),
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    typer.echo(
        f"{name}: {result.target} alpha = {result.alpha:.6g} gives "
        f"{result.achieved_bits:.4f} ± {result.stderr_bits:.4f} bits/token "
        f"(target {result.target_bits:g} ± {result.tolerance_bits:g}; "
        f"{len(result.evaluations)} evaluations, seed {seed}, seq_len {seq_len})"
    )


# --- scaling --------------------------------------------------------------------


@app.command("scaling")
def scaling_command(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (e.g. datasets/scaling.yaml).")],
    scale: Annotated[str, typer.Option(help="Which grid of the recipe: small or full.")] = "small",
    out_dir: Annotated[Path, typer.Option(help="Stores go to <out-dir>/<recipe name>/.")] = Path(
        "datasets"
    ),
    workers: Annotated[
        int | None, typer.Option(help="Writer processes per store; default every CPU.")
    ] = None,
    threads: ThreadsOption = None,
    regimes: Annotated[
        str | None,
        typer.Option(
            help="Build only these regimes of the scale, comma-separated: hmm-low,hmm-high."
        ),
    ] = None,
    regimes_from: Annotated[
        Path | None,
        typer.Option(
            help="Build only the regimes named under the `regimes:` key of this YAML file "
            "(a llama-train study)."
        ),
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """Materialise a recipe of entropy regimes x train sizes for data-scaling laws.

    One store per regime with the largest train size (smaller sizes are its
    prefixes: train with n_train) and the test split; then a table of the
    regimes' exact entropies. It first says which stores it builds and about
    how long that takes. Resumable and idempotent: run it again.
    """
    try:
        if workers is not None and workers < 1:
            raise GssmDataError("--workers must be at least 1")
        _set_threads(threads)
        from gssm_data.scaling import materialise, regime_names

        names = regime_names(regimes, regimes_from)
        results = materialise(
            recipe,
            scale=scale,
            out_dir=out_dir,
            workers=workers,
            show_progress=progress_wanted(quiet),
            log=say(quiet),
            regimes=names,
        )
    except GssmDataError as error:
        raise fail(str(error)) from None
    except KeyboardInterrupt:
        raise fail("interrupted: run the same command again to resume", code=130) from None
    console.print(_scaling_table(results, scale))
    if any(result.entropy.method != "exact" for result in results):
        console.print("mc: known-kernel loss of a transition graph, a Monte Carlo estimate")
    for result in results:
        typer.echo(f"{result.regime.name}: {result.path}")


def _scaling_table(results: list[RegimeResult], scale: str) -> Table:
    sizes = results[0].train_sizes if results else []
    table = Table(
        title=f"{scale}: test split, bits per predicted token; train sizes "
        + (f"{sizes[0]:,} .. {sizes[-1]:,}" if sizes else "-"),
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        collapse_padding=True,
        pad_edge=False,
    )
    columns = ("regime", "alpha", "target", "entropy", "stderr", "unigram", "zstd", "gzip")
    for column in columns:
        justify = "left" if column in ("regime", "alpha") else "right"
        table.add_column(column, justify=justify, no_wrap=True)
    for result in results:
        regime, entropy = result.regime, result.entropy
        table.add_row(
            regime.name,
            "-" if result.alpha is None else f"{result.alpha:.3g} {regime.target[:3]}",
            "-" if regime.target_bits is None else f"{regime.target_bits:g}",
            f"{entropy.bits_per_token:.4f}" + ("" if entropy.method == "exact" else " mc"),
            f"{entropy.stderr / LN2:.4f}",
            f"{result.baselines.unigram_bits:.3f}",
            f"{result.baselines.zstd_bits:.3f}",
            f"{result.baselines.gzip_bits:.3f}",
        )
    return table
