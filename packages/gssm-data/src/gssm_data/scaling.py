"""Data for scaling laws: entropy regimes x train sizes, from one recipe file.

A recipe (``datasets/scaling.yaml``) names *regimes* (a graph, optionally a
mode, and an entropy level: a target in bits per token, reached by
calibrating alpha, or an explicit alpha) and *scales* (the train sizes of a
data-scaling sweep and the test size; optionally a subset of the regimes).

:func:`materialise` writes, for each regime of a scale, one store holding the
largest train size and the test split: the smaller train sizes are prefixes
of it (the sampler's blocks are deterministic), so a sweep trains on
``n_train`` rows of that one store and evaluates all sizes on the same test
split. It also writes ``index-<scale>.json`` beside the stores: the regimes,
their alphas, store paths and entropies, for the sweep configs to read.
Calibrated alphas are kept in ``calibrations.json`` there too: a regime whose
definition is unchanged reuses its alpha instead of calibrating again, so
running a recipe twice is cheap (its stores are already complete). Every
entropy a calibration evaluates is kept in ``calibration-evaluations.json``,
per (graph, tuned node, seed, seq_len): regimes that share a graph share its
scan, and a calibration redone (another tolerance, a changed target) reuses
every alpha already evaluated.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gssm_data.calibrate import (
    CALIBRATION_SEARCH,
    DEFAULT_TOLERANCE_BITS,
    cache_key,
    calibrate,
)
from gssm_data.common.atomicfile import atomic_write
from gssm_data.common.humanize import format_duration, format_validation_error, parse_count
from gssm_data.common.yamlfile import load_yaml_file
from gssm_data.errors import GssmDataError
from gssm_data.generate import (
    GenerateOptions,
    available_cpus,
    default_store_path,
    generate,
)
from gssm_data.graph import GraphSpec, Mode, load_graph
from gssm_data.manifest import FORMAT_VERSION, Baselines, EntropyStats
from gssm_data.presets import load_preset
from gssm_data.store import open_store

INDEX_VERSION = 1
CALIBRATIONS_FILE = "calibrations.json"
EVALUATIONS_FILE = "calibration-evaluations.json"

Log = Callable[[str], None]


def _count(value: object) -> object:
    """Counts as people write them in YAML: 65536, 1e6 (a string for PyYAML), "2.5M"."""
    if isinstance(value, str):
        return parse_count(value, option="count")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Count = Annotated[int, Field(ge=1)]


class Regime(BaseModel):
    """One entropy regime: a graph and how its entropy level is set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$", description="store name prefix")
    preset: str | None = None
    graph: Path | None = Field(None, description="graph YAML, relative to the recipe file")
    mode: Mode | None = Field(None, description="set every latent node's mode")
    target_bits: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="calibrate alpha to this entropy"
    )
    target: Literal["latent", "observed"] = "latent"
    alpha: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="set alpha directly (no calibration)"
    )
    description: str = ""

    @model_validator(mode="after")
    def _check(self) -> Regime:
        if (self.preset is None) == (self.graph is None):
            raise ValueError(f"regime {self.name!r}: give exactly one of preset or graph")
        if self.target_bits is not None and self.alpha is not None:
            raise ValueError(f"regime {self.name!r}: give target_bits or alpha, not both")
        return self


class Scale(BaseModel):
    """Train sizes of a sweep (prefixes of the largest) and the test size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    train_sizes: list[Count] = Field(min_length=1)
    n_test: Count
    regimes: list[str] | None = Field(None, description="subset of the regimes; default all")

    @field_validator("train_sizes", mode="before")
    @classmethod
    def _train_counts(cls, value: object) -> object:
        return [_count(item) for item in value] if isinstance(value, list) else value

    @field_validator("n_test", mode="before")
    @classmethod
    def _test_count(cls, value: object) -> object:
        return _count(value)

    @property
    def n_train(self) -> int:
        return max(self.train_sizes)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    seed: int = Field(0, ge=0)
    seq_len: int = Field(257, ge=2)
    tolerance_bits: float = Field(
        DEFAULT_TOLERANCE_BITS,
        gt=0,
        allow_inf_nan=False,
        description="calibration tolerance of every regime",
    )
    regimes: list[Regime] = Field(min_length=1)
    scales: dict[str, Scale] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        names = [regime.name for regime in self.regimes]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate regime names: {', '.join(duplicates)}")
        for scale_name, scale in self.scales.items():
            unknown = [name for name in scale.regimes or () if name not in names]
            if unknown:
                raise ValueError(
                    f"scale {scale_name!r} lists unknown regime(s) {', '.join(unknown)}; "
                    f"regimes: {', '.join(names)}"
                )
        return self

    def regimes_of(self, scale: str) -> list[Regime]:
        chosen = self.scales[scale].regimes
        return [r for r in self.regimes if chosen is None or r.name in chosen]


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe; every problem is one GssmDataError line."""
    path = Path(path)
    data = load_yaml_file(path, what="recipe")
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise GssmDataError(f"invalid recipe {path}: {format_validation_error(error)}") from None


@dataclass(frozen=True)
class RegimeResult:
    """One materialised regime: its store and figures (bits per predicted token)."""

    regime: Regime
    path: Path
    alpha: float | None  # the calibrated or set alpha; None keeps the graph's own
    calibrated_bits: float | None  # on the calibration sample, when calibrated
    entropy: EntropyStats  # of the store's test split
    baselines: Baselines
    train_sizes: list[int]


def regime_graph(regime: Regime, recipe_dir: Path) -> GraphSpec:
    """The regime's graph before any alpha is set: preset or file, then mode."""
    if regime.preset is not None:
        graph = load_preset(regime.preset)
    else:
        assert regime.graph is not None
        graph_path = regime.graph if regime.graph.is_absolute() else recipe_dir / regime.graph
        graph = load_graph(graph_path)
    return graph.with_mode(regime.mode) if regime.mode is not None else graph


def materialise(
    recipe_path: str | Path,
    *,
    scale: str = "small",
    out_dir: str | Path = "datasets",
    workers: int | None = None,
    show_progress: bool = False,
    log: Log | None = None,
    regimes: Sequence[str] | None = None,
) -> list[RegimeResult]:
    """Write every store of a recipe's scale, or of the named `regimes` (resuming or
    skipping finished ones).

    Stores go to ``<out_dir>/<recipe name>/``; the index of the run is written
    there as ``index-<scale>.json`` after each regime, so an interrupted run
    keeps what it did. Regimes the index lists from an earlier run and this one
    does not build stay in it.
    """
    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path)
    say = log or (lambda message: None)
    index_path = Path(out_dir) / recipe_path.stem / f"index-{scale}.json"
    chosen = chosen_regimes(recipe, recipe_path, scale, regimes)
    say(_announcement(recipe, recipe_path.parent, scale, chosen, index_path, workers))
    results: list[RegimeResult] = []
    names = [regime.name for regime in chosen]
    for planned in plan_stores(
        recipe_path, scale=scale, out_dir=out_dir, workers=workers, log=say, regimes=names
    ):
        options = planned.options
        generate(options, show_progress=show_progress, log=say)
        store = open_store(options.out)
        entropy, baselines = store.entropy("test"), store.baselines("test")
        assert entropy is not None and baselines is not None, "generate measures the test split"
        results.append(
            RegimeResult(
                planned.regime,
                options.out,
                planned.alpha,
                planned.calibrated_bits,
                entropy,
                baselines,
                recipe.scales[scale].train_sizes,
            )
        )
        _write_index(index_path, recipe, scale, results)
    return results


def chosen_regimes(
    recipe: Recipe, recipe_path: Path, scale: str, regimes: Sequence[str] | None
) -> list[Regime]:
    """The regimes of `scale`, or the named ones of them, in recipe order."""
    if scale not in recipe.scales:
        raise GssmDataError(
            f"--scale {scale!r} is not in {recipe_path}; scales: {', '.join(recipe.scales)}"
        )
    of_scale = recipe.regimes_of(scale)
    if regimes is None:
        return of_scale
    available = [regime.name for regime in of_scale]
    unknown = [name for name in regimes if name not in available]
    if unknown:
        raise GssmDataError(
            f"--regimes: {', '.join(unknown)} not in scale {scale!r} of {recipe_path}; "
            f"it has {', '.join(available)}"
        )
    return [regime for regime in of_scale if regime.name in regimes]


def regime_names(regimes: str | None, regimes_from: Path | None) -> list[str] | None:
    """The regimes a command's --regimes (comma-separated) or --regimes-from names; None: all."""
    if regimes is not None and regimes_from is not None:
        raise GssmDataError("give --regimes or --regimes-from, not both")
    if regimes_from is not None:
        return regimes_named_in(regimes_from)
    if regimes is None:
        return None
    names = [name.strip() for name in regimes.split(",") if name.strip()]
    if not names:
        raise GssmDataError("--regimes: name at least one regime")
    return names


def regimes_named_in(path: str | Path) -> list[str]:
    """The regime names under the `regimes:` key of a YAML file (a study file).

    Entries that are mappings with their own `store` are not the recipe's to
    build and are left out; a mapping's `name` alone counts as a name.
    """
    path = Path(path)
    data = load_yaml_file(path, what="study")
    listed = data.get("regimes") if isinstance(data, dict) else None
    if not isinstance(listed, list):
        raise GssmDataError(f"--regimes-from {path}: no `regimes:` list in it")
    names = []
    for entry in listed:
        if isinstance(entry, str):
            names.append(entry)
        elif (
            isinstance(entry, dict) and "store" not in entry and isinstance(entry.get("name"), str)
        ):
            names.append(entry["name"])
    return names


# Rough costs on one idle core of a 2-core laptop, for the announcement only: the
# forward algorithm costs about this many seconds per (joint latent state x summed
# latent sizes) per predicted token (fitted to `make scaling-data`'s small grid: 2 min
# of CPU), and the sampler writes about this many tokens per second per worker.
_FORWARD_SECONDS_PER_UNIT = 4e-10
_WRITE_TOKENS_PER_SECOND = 2e7
# Sequences the entropy pass measures, for the estimate: the test split up to what
# the default target standard error needs on the presets, and the train check.
_ESTIMATED_TEST_SEQUENCES = 10_000
_ESTIMATED_TRAIN_SEQUENCES = 256
_ESTIMATED_CALIBRATION_EVALUATIONS = 7


def estimated_seconds(
    graph: GraphSpec, *, seq_len: int, n_train: int, n_test: int, calibrated: bool, workers: int
) -> float:
    """About how long one store takes to build on an idle CPU (calibration, writing, entropy)."""
    from gssm_data.calibrate import calibration_sequences

    step = graph.joint_latent_states * sum(node.states for node in graph.latents)
    sequence = step * (seq_len - 1) * _FORWARD_SECONDS_PER_UNIT
    measured = min(n_test, _ESTIMATED_TEST_SEQUENCES) + min(n_train, _ESTIMATED_TRAIN_SEQUENCES)
    seconds = measured * sequence
    seconds += (n_train + n_test) * seq_len / (_WRITE_TOKENS_PER_SECOND * max(workers, 1))
    if calibrated:
        evaluations = _ESTIMATED_CALIBRATION_EVALUATIONS * calibration_sequences(graph)
        seconds += evaluations * sequence
    return seconds


def _announcement(
    recipe: Recipe,
    recipe_dir: Path,
    scale: str,
    chosen: list[Regime],
    index_path: Path,
    workers: int | None,
) -> str:
    """Which stores this run builds (finished ones, per the index, are skipped) and about
    how long that takes."""
    built = complete_stores(index_path)
    todo = [regime for regime in chosen if regime.name not in built]
    sizes = recipe.scales[scale]
    seconds = sum(
        estimated_seconds(
            regime_graph(regime, recipe_dir),
            seq_len=recipe.seq_len,
            n_train=sizes.n_train,
            n_test=sizes.n_test,
            calibrated=regime.target_bits is not None,
            workers=workers or available_cpus(),
        )
        for regime in todo
    )
    done = [regime.name for regime in chosen if regime.name in built]
    parts = [
        f"scale {scale}: building {len(todo)} of {len(chosen)} store(s)"
        + (f" ({', '.join(regime.name for regime in todo)})" if todo else "")
    ]
    if done:
        parts.append(f"already built: {', '.join(done)}")
    if todo:
        parts.append(f"about {format_duration(seconds)} on an idle CPU, longer on a busy one")
    return "; ".join(parts)


def complete_stores(index_path: Path) -> set[str]:
    """Regimes the index lists whose store is complete."""
    built = set()
    for entry in _read_json(index_path).get("regimes", []):
        try:
            open_store(entry["store"])
        except (GssmDataError, KeyError, TypeError):
            continue
        built.add(entry["name"])
    return built


@dataclass(frozen=True)
class PlannedStore:
    """One regime's store, ready to write: what `generate` needs, and how alpha was set."""

    regime: Regime
    options: GenerateOptions
    alpha: float | None
    calibrated_bits: float | None


def plan_stores(
    recipe_path: str | Path,
    *,
    scale: str = "small",
    out_dir: str | Path = "datasets",
    workers: int | None = None,
    log: Log | None = None,
    regimes: Sequence[str] | None = None,
) -> Iterator[PlannedStore]:
    """The stores of a recipe's scale (or of the named `regimes` of it), one regime at a
    time (calibrating, or reusing alphas).

    :func:`materialise` writes each as it comes; ``gssm-data submit-scaling``
    (``gssm_data.slurm``) hands each to a Slurm array instead.
    """
    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path)
    chosen = chosen_regimes(recipe, recipe_path, scale, regimes)
    say = log or (lambda message: None)
    folder = Path(out_dir) / recipe_path.stem
    calibrations_path = folder / CALIBRATIONS_FILE
    sizes = recipe.scales[scale]
    for regime in chosen:
        say(f"regime {regime.name}")
        graph, alpha, calibrated = _resolve_alpha(
            regime, recipe, recipe_path.parent, calibrations_path, say
        )
        path = (
            folder
            / default_store_path(
                regime.name,
                graph,
                seed=recipe.seed,
                seq_len=recipe.seq_len,
                n_train=sizes.n_train,
                n_test=sizes.n_test,
            ).name
        )
        options = GenerateOptions(
            graph=graph,
            name=regime.name,
            out=path,
            n_train=sizes.n_train,
            n_test=sizes.n_test,
            seq_len=recipe.seq_len,
            seed=recipe.seed,
            workers=workers or available_cpus(),
        )
        yield PlannedStore(regime, options, alpha, calibrated)


def _resolve_alpha(
    regime: Regime,
    recipe: Recipe,
    recipe_dir: Path,
    calibrations_path: Path,
    say: Log,
) -> tuple[GraphSpec, float | None, float | None]:
    """The regime's final graph, its alpha and calibrated figure (reusing a recorded one)."""
    graph = regime_graph(regime, recipe_dir)
    if regime.alpha is not None:
        return graph.with_alpha(regime.alpha, target=regime.target), regime.alpha, None
    if regime.target_bits is None:
        return graph, None, None
    key = _calibration_key(regime, recipe)
    recorded = _read_json(calibrations_path).get(regime.name)
    if isinstance(recorded, dict) and recorded.get("key") == key:
        alpha, bits = recorded["alpha"], recorded["calibrated_bits"]
        say(f"reusing calibrated {regime.target} alpha {alpha:.4g} ({bits:.4f} bits/token)")
        return graph.with_alpha(alpha, target=regime.target), alpha, bits
    evaluations_path = calibrations_path.with_name(EVALUATIONS_FILE)
    evaluation_key = cache_key(
        graph, target=regime.target, seed=recipe.seed, seq_len=recipe.seq_len
    )
    cache = _read_evaluations(evaluations_path, evaluation_key)
    known = len(cache)
    try:
        calibration = calibrate(
            graph,
            seed=recipe.seed,
            seq_len=recipe.seq_len,
            target_bits=regime.target_bits,
            target=regime.target,
            tolerance_bits=recipe.tolerance_bits,
            cache=cache,
        )
    finally:  # a failed calibration keeps what it evaluated, too
        if len(cache) > known:
            _write_evaluations(evaluations_path, evaluation_key, cache)
    say(
        f"calibrated {regime.target} alpha {calibration.alpha:.4g}: "
        f"{calibration.achieved_bits:.4f} bits/token (target {regime.target_bits:g} "
        f"± {calibration.tolerance_bits:g})"
    )
    records = _read_json(calibrations_path)
    records[regime.name] = {
        "key": key,
        "alpha": calibration.alpha,
        "calibrated_bits": calibration.achieved_bits,
    }
    _write_json(calibrations_path, records)
    return calibration.graph, calibration.alpha, calibration.achieved_bits


def _calibration_key(regime: Regime, recipe: Recipe) -> dict:
    """What a calibration depends on; a recorded alpha is reused only if this matches."""
    return {
        "regime": regime.model_dump(mode="json", exclude={"description"}),
        "seed": recipe.seed,
        "seq_len": recipe.seq_len,
        "tolerance_bits": recipe.tolerance_bits,
        # Alphas found with other kernel draws or another search are not reused.
        "format_version": FORMAT_VERSION,
        "search": CALIBRATION_SEARCH,
    }


def _key_hash(key: dict) -> str:
    payload = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _read_evaluations(path: Path, key: dict) -> dict[float, tuple[float, float]]:
    """The recorded evaluations under `key`: alpha -> (bits, stderr); empty when none."""
    entry = _read_json(path).get(_key_hash(key))
    if not isinstance(entry, dict) or entry.get("key") != key:
        return {}
    try:
        return {float(a): (float(b), float(e)) for a, b, e in entry["evaluations"]}
    except (KeyError, TypeError, ValueError):
        return {}


def _write_evaluations(path: Path, key: dict, cache: dict[float, tuple[float, float]]) -> None:
    records = _read_json(path)
    records[_key_hash(key)] = {
        "key": key,
        "evaluations": [[alpha, bits, stderr] for alpha, (bits, stderr) in sorted(cache.items())],
    }
    _write_json(path, records)


def _read_json(path: Path) -> dict:
    """A JSON object from a file of ours; empty when absent or unreadable (then rebuilt)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict) -> None:
    """Write atomically (fsynced): a reader never sees half an index."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data, indent=2) + "\n")


def _write_index(path: Path, recipe: Recipe, scale: str, results: list[RegimeResult]) -> None:
    """The index of a run: where each regime's store is, and its figures.

    Entries of an earlier run with the same sizes, seed and seq_len for regimes
    this run did not build are kept, in recipe order.
    """
    sizes = recipe.scales[scale]
    entries = {
        result.regime.name: {
            "name": result.regime.name,
            "store": str(result.path),
            "alpha": result.alpha,
            "target": result.regime.target,
            "calibrated_bits": result.calibrated_bits,
            "test_entropy": result.entropy.model_dump(mode="json", exclude={"per_position"}),
            "test_baselines": result.baselines.model_dump(mode="json"),
        }
        for result in results
    }
    earlier = _read_json(path)
    same = all(
        earlier.get(key) == value
        for key, value in (
            ("index_version", INDEX_VERSION),
            ("seed", recipe.seed),
            ("seq_len", recipe.seq_len),
            ("train_sizes", sizes.train_sizes),
            ("n_test", sizes.n_test),
        )
    )
    if same:
        for entry in earlier.get("regimes", []):
            if isinstance(entry, dict) and entry.get("name") not in entries:
                entries[entry.get("name")] = entry
    order = [regime.name for regime in recipe.regimes]
    names = sorted((name for name in entries if name in order), key=lambda name: order.index(name))
    _write_json(
        path,
        {
            "index_version": INDEX_VERSION,
            "scale": scale,
            "seed": recipe.seed,
            "seq_len": recipe.seq_len,
            "train_sizes": sizes.train_sizes,
            "n_test": sizes.n_test,
            "regimes": [entries[name] for name in names],
        },
    )
