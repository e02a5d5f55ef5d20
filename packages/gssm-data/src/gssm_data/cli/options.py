"""Options shared by several commands: the ones that decide a store, and how they resolve.

`generate` and `submit` take the same store options (one declaration here), and
`entropy` and `calibrate` pick a graph the same way (:func:`resolve_graph`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from gssm_data.common.humanize import parse_count
from gssm_data.errors import GssmDataError
from gssm_data.generate import GenerateOptions, Shard, default_store_path
from gssm_data.graph import MODES, GraphSpec, load_graph
from gssm_data.preflight import check_generatable, check_sizes, finite
from gssm_data.presets import load_preset
from gssm_data.sampler import BLOCK_SIZE

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
    from gssm_data.calibrate import calibrate  # imported when needed: it loads torch

    calibration = calibrate(
        graph, seed=seed, seq_len=seq_len, target_bits=bits, target=target, log=log
    )
    log(
        f"calibrated {target} alpha = {calibration.alpha:.4g}: "
        f"{calibration.achieved_bits:.4f} bits/token (target {bits:g} "
        f"± {calibration.tolerance_bits:g})"
    )
    return calibration.graph, f"{name}-{bits:g}bits"


# The options that decide a store, shared by `generate` and `submit`.
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
    str, typer.Option(help="Tokens per sequence, start token included (257: 256 targets).")
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
EntropyStderrOption = Annotated[
    float,
    typer.Option(
        help="Measure the test split's exact entropy on its first sequences until the "
        "standard error of their mean is at most this many bits (the train split's: ten "
        "times that); `gssm-data entropy --write` measures every sequence.",
    ),
]
RegimesOption = Annotated[
    str | None,
    typer.Option(help="Build only these regimes of the scale, comma-separated: hmm-low,hmm-high."),
]
RegimesFromOption = Annotated[
    Path | None,
    typer.Option(
        help="Build only the regimes named under the `regimes:` key of this YAML file "
        "(a llama-train study)."
    ),
]
ThreadsOption = Annotated[
    int | None,
    typer.Option(
        help="CPU threads of the exact-entropy computation. Default: the CPUs this process "
        "may use that are idle (affinity, cgroup quota and 1-minute load; OMP_NUM_THREADS "
        "wins). On a busy machine PyTorch's one-per-core default can be several times slower.",
    ),
]


def store_options(
    *,
    preset: str | None,
    graph: Path | None,
    mode: str | None,
    n: str,
    n_test: str,
    seq_len: str | int,
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
    """Validated GenerateOptions from the command-line options (calibrating alpha if asked).

    Every number is checked before the (possibly long) calibration runs.
    """
    spec, name = resolve_graph(preset, graph, mode)
    n_train, n_testing = parse_count(n, option="--n"), parse_count(n_test, option="--n-test")
    seq_len = parse_count(seq_len, option="--seq-len")
    if n_train < 1:
        raise GssmDataError("--n must be at least 1")
    if seq_len < 2:
        raise GssmDataError("--seq-len must be at least 2 (a start token and one target)")
    if seed < 0:
        raise GssmDataError("--seed must not be negative")
    if workers < 1:
        raise GssmDataError("--workers must be at least 1")
    check_sizes(n_train=n_train, n_test=n_testing, seq_len=seq_len, block_size=BLOCK_SIZE)
    check_generatable(spec)
    if target_bits is not None:
        finite(target_bits, "--target-bits")
        spec, name = _calibrated(
            spec, name, seed=seed, seq_len=seq_len, bits=target_bits, target=target, log=log
        )
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
