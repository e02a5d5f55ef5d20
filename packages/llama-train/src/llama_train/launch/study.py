"""Scaling studies: a grid of regimes x model sizes x data sizes x learning rates x seeds.

A study file (YAML, examples in ``packages/llama-train/configs/studies/``) names a base
training config, the data *regimes* (names in a ``make scaling-data`` index, or store
paths), a *ladder* of model sizes (``model.*`` settings, or a target count of
non-embedding parameters that :func:`shape_for_parameters` turns into a shape), the
*data sizes* (``data.n_train`` prefixes of each regime's store), a *steps rule* (a
fixed number of tokens, epochs over n_train, or steps), the learning rates and the
seeds. :func:`plan_study` expands it into sweep points (:mod:`llama_train.sweep`):
one run directory per point under the study directory, every config validated before
anything runs. :func:`run_local` trains the points that are not done, K processes at a
time with one thread each; ``--slurm`` hands them to :func:`llama_train.slurm.submit_plan`
as one array job. Either way, running the study again trains only what is missing.

Learning rates are cross-validated on a held-out slice that is neither trained on nor
the test split: the last ``validation_sequences`` rows of each store's train split.
Every data size must end before that slice, so no point ever trains on it; smaller
prefixes are nested in larger ones as usual. After training, each point evaluates its
final checkpoint on the slice and writes ``validation.json``; ``study collect`` keeps,
for each (regime, model, data, seed), the learning rate with the lowest validation
loss, and reports that run's test loss. The test split decides nothing.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import functools
import itertools
import json
import math
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gssm_data import GssmDataError
from gssm_data.common.humanize import Count, format_validation_error
from gssm_data.common.progress import progress_display, progress_mode
from gssm_data.common.yamlfile import load_yaml_file
from llama_train.analysis.status import point_status
from llama_train.core import config_files
from llama_train.core.distributed import rank_info
from llama_train.core.model import ModelConfig
from llama_train.core.runlock import directory_lock
from llama_train.errors import LlamaTrainError
from llama_train.launch.lifeline import die_with_parent
from llama_train.launch.slurm import TrainJob, describe_error, submit_plan, tasks_per_node
from llama_train.launch.stacks import StackJob, stack_groups, stack_units
from llama_train.launch.submit_config import SubmitConfig, format_value
from llama_train.launch.sweep import Plan, Point, write_manifest
from llama_train.recipe.evaluate_run import evaluate_run
from llama_train.recipe.train_config import TrainConfig, link_to_data, raw_config
from llama_train.rundir import SUMMARY_FILENAME, ValidationRecord, atomic_write, read_validation
from llama_train.scaling.compute import parameter_count

STUDY_FILENAME = "study.json"
WIDENED_FILENAME = "lr_widened.json"
STUDY_VERSION = 1
STUDY_LOCK_FILENAME = ".study.lock"
COMPILE_CACHE_DIR = "compile-cache"  # torch.compile's cache, shared by the points (train.compile)

Log = Callable[[str], None]
P = ParamSpec("P")
R = TypeVar("R")


# ---------------------------------------------------------------------------
# The study file


class RegimeEntry(BaseModel):
    """A regime given by its store (instead of a name in the index)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9._+\-]+$", description="label in tables and plots")
    store: Path = Field(description="the store (the train split's prefixes are the data sizes)")


class PowerRule(BaseModel):
    """value = c * (N / reference)^exponent, N the size's total parameter count."""

    model_config = ConfigDict(extra="forbid")

    c: float = Field(gt=0, allow_inf_nan=False, description="the value at N = reference")
    exponent: float = Field(allow_inf_nan=False, description="power of N")
    reference: float = Field(1.0, gt=0, allow_inf_nan=False, description="N where value = c")

    def at(self, parameters: int) -> float:
        return self.c * (parameters / self.reference) ** self.exponent


class LrSweep(PowerRule):
    """An lr sweep per model size, centred by a rule: c * (N / reference)^exponent times
    each multiplier (Porian et al. 2024 / OLMo: 0.0047 (N / 108M)^(-1/3))."""

    exponent: float = Field(-1 / 3, allow_inf_nan=False, description="power of N")
    multipliers: list[float] = Field(
        min_length=1, description="factors on the centre; 3+ let collect interpolate"
    )

    @field_validator("multipliers")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if any(not math.isfinite(m) or m <= 0 for m in value) or len(set(value)) != len(value):
            raise ValueError("multipliers must be distinct, finite and positive")
        return sorted(value)


class Beta2Rule(BaseModel):
    """OLMo's ladder: beta2 = below when the global batch is under threshold tokens."""

    model_config = ConfigDict(extra="forbid")

    threshold_tokens: float = Field(524_288, gt=0, description="global batch tokens")
    below: float = Field(0.99, ge=0, lt=1)
    above: float = Field(0.95, ge=0, lt=1)


class PerSizeRules(BaseModel):
    """Batch size and beta2 per model size by rule (a size's overrides win over them)."""

    model_config = ConfigDict(extra="forbid")

    batch_tokens: PowerRule | None = Field(
        None,
        description="predicted tokens per global batch (OLMo: c 327680, exponent 2/3, "
        "reference 108e6); data.batch_size = round(tokens / (seq_len - 1) / ranks), >= 1",
    )
    beta2: Beta2Rule | None = Field(None, description="optim.betas[1] from the global batch")


class ModelSize(BaseModel):
    """One rung of the ladder: `model.*` settings, or a target non-embedding count."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9._+\-]+$", description="label; default from the shape"
    )
    parameters: Count | None = Field(
        None, description="target non-embedding parameters (shape_for_parameters)"
    )
    model: dict[str, Any] = Field(
        default_factory=dict, description="model.* settings, e.g. {dim: 64, n_layers: 2}"
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="config keys for this size only, e.g. {optim.betas: [0.9, 0.99], "
        "data.batch_size: 16} (win over per_size rules)",
    )

    @model_validator(mode="after")
    def _one_way(self) -> ModelSize:
        if (self.parameters is None) == (not self.model):
            raise ValueError("give either parameters (a target count) or model (settings)")
        for key in self.model:
            config_files.check_key(["model", key], TrainConfig)
        for key in self.overrides:
            config_files.check_key(key.split("."), TrainConfig)
        return self


class StoreRecipe(BaseModel):
    """The scaling-data recipe that writes the regimes a study names (study run builds
    the missing ones: :mod:`llama_train.launch.study_stores`)."""

    model_config = ConfigDict(extra="forbid")

    recipe: Path = Field(description="gssm-data scaling recipe, e.g. datasets/scaling.yaml")
    scale: str = Field("small", description="the recipe's scale (small or full)")

    @property
    def index(self) -> Path:
        """Where ``gssm-data scaling RECIPE --out-dir <recipe's folder>`` writes its index."""
        return self.recipe.parent / self.recipe.stem / f"index-{self.scale}.json"


class StepsRule(BaseModel):
    """How long each point trains: exactly one of tokens, epochs or steps."""

    model_config = ConfigDict(extra="forbid")

    tokens: Count | None = Field(None, description="predicted tokens seen by every point")
    epochs: float | None = Field(None, gt=0, description="passes over each point's n_train")
    steps: int | None = Field(None, gt=0, description="optimizer steps for every point")

    @model_validator(mode="after")
    def _exactly_one(self) -> StepsRule:
        given = [name for name in ("tokens", "epochs", "steps") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of tokens, epochs or steps")
        return self

    def steps_for(self, *, n_train: int, tokens_per_step: int, rows_per_step: int) -> int:
        if self.steps is not None:
            return self.steps
        if self.tokens is not None:
            return max(1, math.ceil(self.tokens / tokens_per_step))
        assert self.epochs is not None
        return max(1, math.ceil(self.epochs * n_train / rows_per_step))


class StudyConfig(BaseModel):
    """A scaling study (relative paths are relative to the current directory)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="default: the study file's stem")
    dir: Path | None = Field(None, description="study directory; default runs/studies/<name>")
    base: Path = Field(description="the training config every point starts from")
    index: Path | None = Field(
        None, description="scaling-data index (datasets/scaling/index-small.json) for names"
    )
    stores: StoreRecipe | None = Field(
        None,
        description="the recipe that writes the named regimes' stores (into the recipe's "
        "folder); study run builds the missing ones. index defaults to its index",
    )
    regimes: list[str | RegimeEntry] = Field(min_length=1)
    models: list[ModelSize] = Field(min_length=1, description="the ladder of model sizes")
    data: list[Count] = Field(min_length=1, description="data.n_train prefixes (sequences)")
    steps: StepsRule
    lr: list[float] | LrSweep = Field(
        description="learning rates, cross-validated: a list for every size, or a sweep per "
        "size centred by a rule ({c, exponent, reference, multipliers})"
    )
    per_size: PerSizeRules = Field(
        default_factory=PerSizeRules, description="batch size and beta2 by rule of N"
    )
    branches: bool = Field(
        False,
        description="one trunk per (regime, model, lr, seed) at the largest data size, with "
        "cooldown branches at the others (optim.schedule wsd; the steps rule must grow with "
        "the data, e.g. epochs: 1): the D axis from one run",
    )
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    validation_sequences: int = Field(
        512, gt=0, description="held-out rows at the end of each store's train split"
    )
    evaluations: int = Field(
        1,
        ge=1,
        description="test evaluations per point, evenly spaced (the last at the end): "
        "more give the data-constrained view, loss against epochs over the same data",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="config keys set for every point (train.threads: 1)"
    )

    @field_validator("lr")
    @classmethod
    def _finite(cls, value: list[float] | LrSweep) -> list[float] | LrSweep:
        if isinstance(value, list) and not value:
            raise ValueError("list at least one learning rate")
        if isinstance(value, list) and any(not math.isfinite(lr) or lr <= 0 for lr in value):
            raise ValueError("learning rates must be finite and positive")
        return value

    @model_validator(mode="after")
    def _check(self) -> StudyConfig:
        lrs = self.lr if isinstance(self.lr, list) else []
        for label, values in (("data", self.data), ("lr", lrs), ("seeds", self.seeds)):
            if len(set(values)) != len(values):
                raise ValueError(f"{label}: a value is listed twice")
        for key in self.overrides:
            config_files.check_key(key.split("."), SubmitConfig)
        if self.stores is not None:
            index = self.stores.index
            if self.index is None:
                self.index = index
            elif self.index != index:
                raise ValueError(
                    f"index {self.index} is not where stores.recipe writes its index ({index}); "
                    "drop index or make them agree"
                )
        return self


def load_study(path: str | Path) -> StudyConfig:
    """Read and validate a study file; every problem is a one-line user error."""
    path = Path(path)
    try:  # bounded: a regular file of at most 1 MB, UTF-8, nesting at most 64 deep
        raw = load_yaml_file(path, what="study file")
    except GssmDataError as error:
        raise LlamaTrainError(str(error)) from None
    if not isinstance(raw, dict):
        raise LlamaTrainError(f"{path}: expected a mapping (base, regimes, models, data, ...)")
    try:
        study = StudyConfig.model_validate(raw)
    except ValidationError as error:
        lines = format_validation_error(error, separator="\n")
        raise LlamaTrainError(f"{path}: invalid study:\n{lines}") from None
    except LlamaTrainError as error:
        raise LlamaTrainError(f"{path}: {error}") from None
    if study.name is None:
        study = study.model_copy(update={"name": path.stem})
    return study


# ---------------------------------------------------------------------------
# Model shapes


def non_embedding_parameters(model: ModelConfig, vocab_size: int) -> int:
    """Llama's parameter count without the input embedding (the model's own rule)."""
    return parameter_count(model, vocab_size=vocab_size, exclude_embeddings=True)


def shape_for_parameters(target: float, vocab_size: int) -> dict[str, int]:
    """A Llama shape whose non-embedding count is closest (in log) to `target`.

    The rule: heads of 16 channels, one layer per 32 of width (at least one),
    width a multiple of 16. Depth and width grow together, as in the ladders of
    Kaplan et al. and Hoffmann et al., so no rung is a degenerate one-layer giant.
    """
    best: tuple[float, dict[str, int]] | None = None
    for dim in range(16, 4097, 16):
        shape = {"dim": dim, "n_layers": max(1, dim // 32), "n_heads": dim // 16}
        count = non_embedding_parameters(ModelConfig(**shape), vocab_size)
        distance = abs(math.log(count / target))
        if best is None or distance < best[0]:
            best = (distance, shape)
    assert best is not None
    return best[1]


# ---------------------------------------------------------------------------
# Expansion


@dataclass(frozen=True)
class Regime:
    name: str
    store: Path
    train_rows: int
    seq_len: int
    vocab_size: int


@dataclass(frozen=True)
class StudyPoint:
    """What a point is in the study's terms (its sweep Point holds the config)."""

    name: str
    regime: str
    model: str
    n_train: int
    lr: float
    seed: int
    steps: int
    lr_multiplier: float | None = None  # on the size's lr centre (an lr rule's sweep)
    trunk: str | None = None  # a cooldown branch: the name of its trunk's point
    parameters_total: int | None = None  # N of the size's rules


class StudyPlan(Plan):
    """A sweep plan whose points come from a study (always a grid, never a single run)."""

    @property
    def is_sweep(self) -> bool:
        return True


@dataclass(frozen=True)
class ExpandedStudy:
    study: StudyConfig
    path: Path
    directory: Path
    plan: StudyPlan
    points: list[StudyPoint]  # one per plan point (a trunk when the study branches)
    regimes: dict[str, Regime]
    validation_first: dict[str, int]  # first held-out row of each regime's train split
    branch_points: list[StudyPoint] = field(default_factory=list)  # trained by their trunks

    @property
    def all_points(self) -> list[StudyPoint]:
        """Every point of the table: the planned runs and their cooldown branches."""
        return [*self.points, *self.branch_points]

    def branches_of(self, point: StudyPoint) -> list[StudyPoint]:
        return [branch for branch in self.branch_points if branch.trunk == point.name]

    def validation_of(self, point: StudyPoint) -> tuple[int, int]:
        return self.validation_first[point.regime], self.study.validation_sequences


def plan_study(path: str | Path, *, ranks: int = 1) -> ExpandedStudy:
    """Expand a study file into validated sweep points (nothing is written).

    `ranks` is the number of processes each point trains on (Slurm's nodes x tasks):
    the steps rule counts the global batch.
    """
    path = Path(path)
    study = load_study(path)
    overrides = [f"{key}={json.dumps(value)}" for key, value in study.overrides.items()]
    base_raw = raw_config(study.base, overrides, SubmitConfig)
    if base_raw.get("sweep"):
        raise LlamaTrainError(
            f"{study.base} has a sweep section: the study is the grid; remove it from the base"
        )
    directory = study.dir or Path("runs") / "studies" / str(study.name)
    regimes = {regime.name: regime for regime in _resolve_regimes(study)}
    first_rows = {}
    for regime in regimes.values():
        first_rows[regime.name] = regime.train_rows - study.validation_sequences
        if max(study.data) > first_rows[regime.name]:
            raise LlamaTrainError(
                f"regime {regime.name}: data size {max(study.data)} reaches into the validation "
                f"slice (the last {study.validation_sequences} of the {regime.train_rows} train "
                f"sequences of {regime.store}); lower the data sizes or validation_sequences"
            )
    widened = read_widened(directory)
    points: list[StudyPoint] = []
    branch_points: list[StudyPoint] = []
    sweep_points: list[Point] = []
    for regime in regimes.values():
        for rung, size in enumerate(study.models):
            shape = dict(size.model)
            if size.parameters is not None:
                shape = shape_for_parameters(size.parameters, regime.vocab_size)
            label = size.name or _model_label(shape, rung)
            fixed = {
                "data.path": str(regime.store),
                **{f"model.{key}": value for key, value in shape.items()},
            }
            probe = _validate(_with(base_raw, {**fixed, **size.overrides}), label)
            parameters = total_parameters(probe.model, regime.vocab_size)
            fixed |= _size_rules(study.per_size, probe, parameters, regime.seq_len, ranks)
            fixed |= size.overrides
            probe = _validate(_with(base_raw, fixed), label)
            if probe.train.compile and probe.train.compile_cache is None:
                # Points of one shape compile the same graphs: one cache for the study.
                fixed["train.compile_cache"] = str(directory / COMPILE_CACHE_DIR)
            rows = probe.data.batch_size * probe.train.grad_accum * ranks
            tokens_per_step = rows * (regime.seq_len - 1)

            def steps_for(n_train: int, rows: int = rows, tokens: int = tokens_per_step) -> int:
                return study.steps.steps_for(
                    n_train=n_train, tokens_per_step=tokens, rows_per_step=rows
                )

            sweep = _lr_sweep(study.lr, parameters, widened.get(f"{regime.name}/{label}", []))
            sizes = [max(study.data)] if study.branches else study.data
            for n_train, (lr, multiplier), seed in itertools.product(sizes, sweep, study.seeds):
                steps = steps_for(n_train)
                name = f"{regime.name}_{label}_n{n_train}_lr{format_value(lr)}_s{seed}"
                common = (regime.name, label, n_train, lr, seed, steps, multiplier)
                point = StudyPoint(name, *common, parameters_total=parameters)
                settings = {
                    **fixed,
                    "data.n_train": n_train,
                    "optim.lr": lr,
                    "run.seed": seed,
                    "run.dir": str(directory / name),
                    "run.name": f"{study.name}/{name}",
                    "train.steps": steps,
                    "eval.every": max(1, steps // study.evaluations),
                }
                if study.branches:
                    branches = _branch_points(study, point, steps_for, tokens_per_step)
                    settings["train.branches"] = [tokens for tokens, _ in branches]
                    branch_points.extend(branch for _, branch in branches)
                config = _validate(_with(base_raw, settings), name)
                described = {"regime": regime.name, "model": label, **settings}
                sweep_points.append(Point(len(sweep_points), name, described, config))
                points.append(point)
    # The study directory's own config: the first point's, pointing at the study directory.
    first = sweep_points[0].config
    base_config = first.model_copy(
        update={"run": first.run.model_copy(update={"dir": directory, "name": str(study.name)})}
    )
    names = [point.name for point in points]
    if len(set(names)) != len(names):
        raise LlamaTrainError("two points share a name: give the model sizes distinct names")
    return ExpandedStudy(
        study=study,
        path=path,
        directory=directory,
        plan=StudyPlan(base_config, sweep_points),
        points=points,
        branch_points=branch_points,
        regimes=regimes,
        validation_first=first_rows,
    )


def total_parameters(model: ModelConfig, vocab_size: int) -> int:
    """Every parameter: the non-embedding count plus the input embedding (the N of fits)."""
    return parameter_count(model, vocab_size=vocab_size)


def _lr_sweep(
    lr: list[float] | LrSweep, parameters: int, widened: list[float]
) -> list[tuple[float, float | None]]:
    """(lr, multiplier) of a size: the listed lrs, or the rule's centre times each multiplier
    (with those `study run --widen-edges` added for this size)."""
    if isinstance(lr, list):
        return [(float(value), None) for value in lr]
    centre = lr.at(parameters)
    return [(float(f"{centre * m:.6g}"), m) for m in sorted({*lr.multipliers, *widened})]


def _size_rules(
    rules: PerSizeRules, probe: Any, parameters: int, seq_len: int, ranks: int
) -> dict[str, Any]:
    """The settings the per-size rules give a size: data.batch_size and optim.betas."""
    settings: dict[str, Any] = {}
    batch_size = probe.data.batch_size
    if rules.batch_tokens is not None:
        per_rank = rules.batch_tokens.at(parameters) / (seq_len - 1) / probe.train.grad_accum
        batch_size = max(1, round(per_rank / ranks))
        settings["data.batch_size"] = batch_size
    if rules.beta2 is not None:
        tokens = batch_size * probe.train.grad_accum * ranks * (seq_len - 1)
        beta2 = rules.beta2.below if tokens < rules.beta2.threshold_tokens else rules.beta2.above
        settings["optim.betas"] = [probe.optim.betas[0], beta2]
    return settings


def _branch_points(
    study: StudyConfig,
    trunk: StudyPoint,
    steps_for: Callable[[int], int],
    tokens_per_step: int,
) -> list[tuple[int, StudyPoint]]:
    """(tokens, point) of each cooldown branch of a trunk: one per smaller data size."""
    branches = []
    for n_train in sorted(study.data)[:-1]:
        steps = steps_for(n_train)
        if steps >= trunk.steps or any(point.steps == steps for _, point in branches):
            raise LlamaTrainError(
                f"branches: data sizes {n_train} and {trunk.n_train} train the same number of "
                f"steps ({steps}) under the steps rule {study.steps.model_dump(exclude_none=True)}"
                "; branches need a rule that grows with the data (epochs: 1)"
            )
        tokens = steps * tokens_per_step
        name = f"{trunk.name}/branches/d{tokens}"
        point = StudyPoint(
            name,
            trunk.regime,
            trunk.model,
            n_train,
            trunk.lr,
            trunk.seed,
            steps,
            trunk.lr_multiplier,
            trunk=trunk.name,
            parameters_total=trunk.parameters_total,
        )
        branches.append((tokens, point))
    return branches


def _model_label(settings: Mapping[str, Any], rung: int) -> str:
    if "dim" in settings and "n_layers" in settings:
        return f"d{settings['dim']}l{settings['n_layers']}"
    return f"m{rung}"


def _with(raw: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a raw config with dotted `settings` set."""
    result = copy.deepcopy(dict(raw))
    for dotted, value in settings.items():
        config_files.set_dotted(result, dotted.split("."), value)
    return result


def _validate(raw: dict[str, Any], name: str) -> Any:
    try:
        return config_files.validate(link_to_data(raw), SubmitConfig)
    except LlamaTrainError as error:
        raise LlamaTrainError(f"study point {name}: {error}") from None


def _resolve_regimes(study: StudyConfig) -> list[Regime]:
    from gssm_data import open_store

    index = _read_index(study.index) if study.index is not None else {}
    regimes = []
    for entry in study.regimes:
        if isinstance(entry, str):
            if study.index is None:
                raise LlamaTrainError(
                    f"regime {entry!r} is a name: set index (e.g. "
                    "datasets/scaling/index-small.json from make scaling-data) or give "
                    "{name, store}"
                )
            if entry not in index:
                raise LlamaTrainError(
                    f"regime {entry!r} is not in {study.index}; it lists "
                    f"{', '.join(index) or 'nothing'}"
                )
            name, store_path = entry, Path(index[entry])
        else:
            name, store_path = entry.name, entry.store
        try:
            store = open_store(store_path)
        except GssmDataError as error:
            raise LlamaTrainError(f"regime {name}: {error}") from None
        manifest = store.manifest
        if "train" not in manifest.splits:
            raise LlamaTrainError(f"regime {name}: {store_path} has no train split")
        regimes.append(
            Regime(
                name,
                store_path,
                manifest.splits["train"].n,
                manifest.seq_len,
                manifest.vocab_size,
            )
        )
    if len({regime.name for regime in regimes}) != len(regimes):
        raise LlamaTrainError("a regime is listed twice")
    return regimes


def _read_index(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LlamaTrainError(
            f"index {path} not found: run `make scaling-data` (or gssm-data scaling) first"
        ) from None
    except (OSError, ValueError) as error:
        raise LlamaTrainError(f"cannot read index {path}: {error}") from None
    try:
        return {entry["name"]: entry["store"] for entry in data["regimes"]}
    except (KeyError, TypeError):
        raise LlamaTrainError(f"{path} is not a scaling-data index (no regimes)") from None


# ---------------------------------------------------------------------------
# The study record


def write_study_record(expanded: ExpandedStudy) -> Path:
    """study.json: the study file, its regimes and what each point is (read by collect)."""
    record = {
        "version": STUDY_VERSION,
        "name": expanded.study.name,
        "study_file": str(expanded.path),
        "study": expanded.study.model_dump(mode="json"),
        "regimes": {
            name: {
                "store": str(regime.store),
                "train_rows": regime.train_rows,
                "validation": {
                    "split": "train",
                    "first": expanded.validation_first[name],
                    "sequences": expanded.study.validation_sequences,
                },
            }
            for name, regime in expanded.regimes.items()
        },
        "points": [point.__dict__ for point in expanded.all_points],
    }
    expanded.directory.mkdir(parents=True, exist_ok=True)
    return atomic_write(expanded.directory / STUDY_FILENAME, json.dumps(record, indent=1) + "\n")


def read_study_record(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / STUDY_FILENAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LlamaTrainError(
            f"{directory} is not a study directory (no {STUDY_FILENAME}); "
            "give the directory `llama-train study run` printed"
        ) from None
    except (OSError, ValueError) as error:
        raise LlamaTrainError(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("points"), list):
        raise LlamaTrainError(f"{path} is not a study record")
    return data


def missing_from_table(directory: str | Path) -> dict[str, str]:
    """The points of a study with no row in its table (`study collect`), each with why:
    its state and the one-line reason its run recorded (failed, pending, running), or
    what is wrong with a result that is there but unusable."""
    from llama_train.scaling.points import point_rows

    directory = Path(directory)
    record = read_study_record(directory)
    # A point's name is its run directory under the study's (a branch's: <trunk>/branches/d<T>).
    finished = {
        Path(row["run_dir"]).relative_to(directory).as_posix()
        for row in point_rows(directory, record)
    }
    missing = {}
    for point in record["points"]:
        name = point.get("name")
        if not isinstance(name, str) or name in finished:
            continue
        status = point_status(directory / name)
        if (directory / name / SUMMARY_FILENAME).is_file() and status.state in ("done", "failed"):
            reason = (
                f"its {SUMMARY_FILENAME} is damaged or of another step; `llama-train study run` "
                "writes it again from the last checkpoint"
            )
        else:
            reason = status.state + (f": {status.message}" if status.message else "")
        missing[name] = reason
    return missing


def describe_missing(missing: Mapping[str, str], directory: str | Path, *, shown: int = 5) -> str:
    """One line naming the points a table leaves out (the first `shown`, then a count)."""
    named = [f"{name} ({reason})" for name, reason in itertools.islice(missing.items(), shown)]
    more = len(missing) - len(named)
    tail = f", and {more} more" if more else ""
    return (
        f"{len(missing)} point(s) not in the table: {', '.join(named)}{tail} "
        f"(llama-train study status {directory})"
    )


# ---------------------------------------------------------------------------
# Validation (the held-out slice)


def write_validation(
    run_dir: Path, first: int, sequences: int, device: str = "auto"
) -> ValidationRecord:
    """Evaluate a run's final checkpoint on train rows [first, first + sequences)."""
    result = evaluate_run(
        run_dir, split="train", first=first, max_sequences=sequences, device=device
    )
    record = ValidationRecord(
        step=result.step,
        split="train",
        first=first,
        sequences=result.n_sequences,
        loss=result.loss,
        entropy=result.entropy,
        excess=result.excess,
    )
    record.write(run_dir)
    return record


def ensure_validation(directory: str | Path, log: Log | None = None) -> int:
    """Write validation.json for every finished point that lacks it (or is stale); the count."""
    directory = Path(directory)
    record = read_study_record(directory)
    done = 0
    for point in record["points"]:
        run_dir = directory / point["name"]
        status = point_status(run_dir)
        if status.state != "done":
            continue
        validation = read_validation(run_dir)
        if validation is not None and validation.step == status.step:
            continue
        held_out = record["regimes"][point["regime"]]["validation"]
        if log:
            log(f"validating {point['name']}")
        write_validation(run_dir, held_out["first"], held_out["sequences"])
        done += 1
    return done


@dataclass
class StudyJob(TrainJob):
    """Train one point, then score its final checkpoint on the held-out slice."""

    validation_first: int = 0
    validation_sequences: int = 0
    branch_dirs: tuple[Path, ...] = ()  # its cooldown branches, trained with it

    def __call__(self) -> dict[str, Any]:
        summary = super().__call__()
        if rank_info().is_main:
            self.after_training()
        return summary

    def after_training(self) -> None:
        """Score the final checkpoints of the point and of its cooldown branches on the
        held-out slice (also after a stack trained it)."""
        for run_dir in (self.config.run_dir, *self.branch_dirs):
            write_validation(run_dir, self.validation_first, self.validation_sequences)


def _job_factory(expanded: ExpandedStudy) -> Callable[[Any], StudyJob]:
    by_dir = {
        str(sweep_point.config.run_dir): point
        for sweep_point, point in zip(expanded.plan.points, expanded.points, strict=True)
    }

    def make(config: Any) -> StudyJob:
        point = by_dir[str(config.run_dir)]
        first, sequences = expanded.validation_of(point)
        branches = tuple(expanded.directory / b.name for b in expanded.branches_of(point))
        return StudyJob(
            config, validation_first=first, validation_sequences=sequences, branch_dirs=branches
        )

    return make


# ---------------------------------------------------------------------------
# Running


@dataclass
class RunReport:
    total: int
    skipped: int
    trained: list[str]
    failed: dict[str, str]
    seconds: float


def _one_writer(
    function: Callable[Concatenate[ExpandedStudy, P], R],
) -> Callable[Concatenate[ExpandedStudy, P], R]:
    """Hold the study directory's lock for the call: a second `study run` on the same
    directory refuses in one line before writing anything, so no run directory ever
    has two writers. The kernel drops the lock when its holder dies."""

    @functools.wraps(function)
    def locked(expanded: ExpandedStudy, *args: P.args, **kwargs: P.kwargs) -> R:
        with directory_lock(
            expanded.directory,
            STUDY_LOCK_FILENAME,
            busy="is in use by another llama-train study run",
            advice="wait for it to end (llama-train study status shows its progress)",
        ):
            return function(expanded, *args, **kwargs)

    return locked


def points_to_run(expanded: ExpandedStudy) -> list[int]:
    """Indices of the points that are not done at their step count (a trunk is not done
    while one of its branches is not)."""
    todo = []
    for index, (point, study_point) in enumerate(
        zip(expanded.plan.points, expanded.points, strict=True)
    ):
        runs = [(point.config.run_dir, point.config.train.steps)] + [
            (expanded.directory / branch.name, branch.steps)
            for branch in expanded.branches_of(study_point)
        ]
        if all(_done(run_dir, steps) for run_dir, steps in runs):
            continue
        todo.append(index)
    return todo


def _done(run_dir: Path, steps: int) -> bool:
    status = point_status(run_dir)
    return status.state == "done" and (status.step or 0) >= steps


# ---------------------------------------------------------------------------
# Widening an lr sweep whose optimum is on its edge


def read_widened(directory: Path) -> dict[str, list[float]]:
    """The multipliers `--widen-edges` added, per "regime/model" (kept in the study dir)."""
    try:
        data = json.loads((Path(directory) / WIDENED_FILENAME).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        path = Path(directory) / WIDENED_FILENAME
        raise LlamaTrainError(f"cannot read {path}: {error}") from None
    return {str(key): [float(m) for m in value] for key, value in data.items()}


def edge_optima(directory: Path) -> list[dict[str, Any]]:
    """The table's rows (best lr per point) whose optimum is on the sweep's edge."""
    from llama_train.scaling.points import collect

    try:
        rows = collect(directory)
    except LlamaTrainError:
        return []
    return [row for row in rows if row.get("lr_edge")]


def widen_edges(expanded: ExpandedStudy, log: Log | None = None) -> int:
    """Add one multiplier beyond each edge an optimum sits on, per (regime, model size).

    The step is the ratio of the sweep's two outermost multipliers on that side (x2 for a
    single one). Recorded in lr_widened.json, so every later plan of the study has them;
    the caller plans again. Returns the number of multipliers added.
    """
    study = expanded.study
    if not isinstance(study.lr, LrSweep):
        raise LlamaTrainError(
            "--widen-edges needs an lr rule (lr: {c, exponent, multipliers}): "
            "with a list of learning rates, extend the list"
        )
    widened = read_widened(expanded.directory)
    added = 0
    by_size = {}
    for point in expanded.points:
        if point.lr_multiplier is not None:
            by_size.setdefault((point.regime, point.model), set()).add(point.lr_multiplier)
    edges = sorted(
        {(row["regime"], row["model"], row["lr_edge"]) for row in edge_optima(expanded.directory)}
    )
    for regime, model, edge in edges:
        multipliers = sorted(by_size.get((regime, model), set()))
        if not multipliers:
            continue
        if edge == "high":
            step = multipliers[-1] / multipliers[-2] if len(multipliers) > 1 else 2.0
            new = float(f"{multipliers[-1] * step:.6g}")
        else:
            step = multipliers[1] / multipliers[0] if len(multipliers) > 1 else 2.0
            new = float(f"{multipliers[0] / step:.6g}")
        key = f"{regime}/{model}"
        widened.setdefault(key, []).append(new)
        added += 1
        if log:
            log(f"{key}: lr optimum on the {edge} edge of the sweep; adding multiplier {new:g}")
    if added:
        expanded.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(expanded.directory / WIDENED_FILENAME, json.dumps(widened, indent=1) + "\n")
    return added


@_one_writer
def run_local(
    expanded: ExpandedStudy,
    *,
    parallel: int = 1,
    log: Log | None = None,
    progress: bool = True,
    stack: bool = True,
) -> RunReport:
    """Train every point not yet done here, `parallel` processes at a time, one thread each.

    With `stack` (the default), points that differ only in what a stack member may
    vary (lr, seed) train together as one stack in one process (`train_stack`);
    `stack=False` trains one point per process. With `parallel` > 1, stacks (or
    points) run in worker processes (spawned once, each training one after
    another); with 1, in this process. Either way each point's messages go to
    `<run dir>/train.log` (a stack's to its first member's, which the others'
    logs name), and a failing point is recorded (job_state.json) and reported while
    the others go on. Points already done are skipped.
    """
    say = log or (lambda message: None)
    write_study_record(expanded)
    todo = points_to_run(expanded)
    write_manifest(
        expanded.plan,
        {expanded.plan.points[index].name: "local" for index in todo},
        executor="local",
        log_dir=expanded.directory,
        config_path=expanded.path,
        overrides=(),
    )
    make_job = _job_factory(expanded)
    started = time.perf_counter()
    trained: list[str] = []
    failed: dict[str, str] = {}
    total = len(expanded.plan.points)
    if not todo:
        say(f"{expanded.directory}: all {total} points are done")
        return RunReport(total, total, [], {}, 0.0)
    units = _units(expanded, todo, stack=stack)
    how = f"in {len(units)} stacks, " if len(units) < len(todo) else ""
    say(
        f"{expanded.directory}: {len(todo)} of {total} points to train, "
        f"{how}{parallel} at a time (one thread each)"
    )

    def record(points: list[Point], problems: dict[str, str], bar: _Progress) -> None:
        for point in points:
            problem = problems.get(str(point.config.run_dir), "")
            if problem:
                failed[point.name] = problem
                say(f"failed {point.name}: {problem} (log {_unit_log(points)})")
            else:
                trained.append(point.name)
            bar.advance(point.name, ok=not problem)

    if parallel == 1:
        with _Progress(len(todo), enabled=progress) as bar:
            for points in units:
                record(points, _run_unit_here(points, make_job), bar)
        return RunReport(total, total - len(todo), trained, failed, time.perf_counter() - started)
    # Workers live for the whole study: a process imports torch once, not once per point.
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    with (
        _Progress(len(todo), enabled=progress) as bar,
        concurrent.futures.ProcessPoolExecutor(
            max_workers=parallel,
            mp_context=context,
            initializer=_start_worker,
            initargs=(stop, os.getpid()),
        ) as pool,
        _stop_workers_on_interrupt(pool, stop, say),
    ):
        futures = {
            pool.submit(_run_unit, [make_job(p.config) for p in points], _unit_log(points)): points
            for points in units
        }
        for future in concurrent.futures.as_completed(futures):
            points = futures[future]
            try:
                problems = future.result()
            except Exception as error:  # a worker that died (killed, out of memory)
                problem = f"{type(error).__name__}: {error}"
                problems = {str(p.config.run_dir): problem for p in points}
            record(points, problems, bar)
    return RunReport(total, total - len(todo), trained, failed, time.perf_counter() - started)


def _units(expanded: ExpandedStudy, todo: list[int], *, stack: bool) -> list[list[Point]]:
    """The points to train, grouped into stacks (or one per unit without stacking)."""
    points = [expanded.plan.points[index] for index in todo]
    groups = stack_groups([p.config.train_config() for p in points], enabled=stack)
    return [[points[i] for i in group] for group in groups]


def _unit_log(points: list[Point]) -> str:
    """The log of a unit: its first point's train.log (a stack writes there for all)."""
    return str(points[0].config.run_dir / "train.log")


def _run_unit_here(points: list[Point], make_job: Callable[[Any], StudyJob]) -> dict[str, str]:
    """A point or a stack in this process; {run dir: problem} for the points that failed."""
    jobs = [make_job(point.config) for point in points]
    log_path = Path(_unit_log(points))
    if len(jobs) == 1:
        problem = _run_in_this_process(jobs[0], log_path)
        return {str(points[0].config.run_dir): problem} if problem else {}
    _name_stack_log(jobs)
    with (
        log_path.open("a", buffering=1) as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        return _stack_problems(jobs, log)


def _run_unit(jobs: list[StudyJob], log_path: str) -> dict[str, str]:
    """In a worker process: a point or a stack, its output in its log; {run dir: problem}."""
    if len(jobs) == 1:
        problem = _run_point(jobs[0], log_path)
        return {str(jobs[0].config.run_dir): problem} if problem else {}
    if _STOP is not None and _STOP.is_set():
        return {str(job.config.run_dir): "not started: the study was stopped" for job in jobs}
    _name_stack_log(jobs)
    with open(log_path, "a", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        return _stack_problems(jobs, sys.stderr)


def _name_stack_log(jobs: list[StudyJob]) -> None:
    """Each member's train.log says where its stack writes."""
    log_path = jobs[0].config.run_dir / "train.log"
    for job in jobs:
        job.config.run_dir.mkdir(parents=True, exist_ok=True)
    for job in jobs[1:]:
        with (job.config.run_dir / "train.log").open("a") as log:
            print(f"trained in a stack of {len(jobs)}; its messages are in {log_path}", file=log)


def _stack_problems(jobs: list[StudyJob], log: Any) -> dict[str, str]:
    """Run the jobs as one StackJob: {run dir: problem}, every member's when it fails."""
    try:
        return StackJob(list(jobs))()
    except Exception as error:
        print(f"error: {describe_error(error)}", file=log, flush=True)
        return {str(job.config.run_dir): describe_error(error) for job in jobs}
    except SystemExit as stop:  # preempted: every member checkpointed and recorded
        message = f"preempted (exit {stop.code}): run the study again to resume"
        return {str(job.config.run_dir): message for job in jobs}


_STOP: Any = None  # in a worker: the study's stop event


def _start_worker(stop: Any, parent_pid: int) -> None:
    """In each worker: Ctrl-C reaches the whole process group, but only the parent
    decides; it sets `stop` (no further point starts) and sends SIGTERM, on which the
    trainer checkpoints and stops (its preemption path). A parent killed outright
    takes its workers with it (lifeline), so they never race the rerun."""
    global _STOP
    die_with_parent(parent_pid)
    _STOP = stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def _stop_workers_on_interrupt(
    pool: concurrent.futures.ProcessPoolExecutor, stop: Any, say: Log
) -> Iterator[None]:
    """Ctrl-C or SIGTERM on the study: running points checkpoint and stop, queued ones
    are dropped, and the same command resumes them all."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    except KeyboardInterrupt:
        say("stopping: the running points checkpoint and stop (run the same command to resume)")
        stop.set()
        for process in multiprocessing.active_children():
            process.terminate()  # SIGTERM: the trainer saves a checkpoint, then exits
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_point(job: StudyJob, log_path: str) -> str:
    """In a worker process: train one point with its output in its log; '' or the problem."""
    if _STOP is not None and _STOP.is_set():
        return "not started: the study was stopped"
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            job()
        except BaseException as error:  # recorded in job_state.json and reported by the parent
            print(f"error: {describe_error(error)}", file=sys.stderr, flush=True)
            return describe_error(error)
    return ""


def _run_in_this_process(job: StudyJob, log_path: Path) -> str:
    """One point in this process (no start-up cost), its messages in its log; '' or the
    problem. A failing point is recorded and reported; the study goes on."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with (
        log_path.open("a", buffering=1) as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        try:
            job()
        except Exception as error:
            print(f"error: {describe_error(error)}", file=log, flush=True)
            return describe_error(error)
    return ""


class _Progress:
    """Points done: a bar on a terminal, a line every GSSM_PROGRESS_EVERY s in a log."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = progress_display(
            TextColumn("points"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
            mode=progress_mode(quiet=not enabled),
        )
        self._task = self._bar.add_task("", total=total)

    def __enter__(self) -> _Progress:
        self._bar.__enter__()
        return self

    def advance(self, name: str, *, ok: bool) -> None:
        """One point finished (a failure is reported by the caller as it happens)."""
        self._bar.update(self._task, advance=1, description=name if ok else f"{name} (failed)")

    def __exit__(self, *exc: object) -> None:
        self._bar.__exit__(*exc)


@_one_writer
def submit_slurm(expanded: ExpandedStudy, log: Log | None = None, *, stack: bool = True) -> Any:
    """Send the points that are neither done nor queued to Slurm as one array job: one
    task per stack (`stack`, the default) or per point."""
    write_study_record(expanded)
    return submit_plan(
        expanded.plan,
        config_path=expanded.path,
        job=_job_factory(expanded),
        log=log,
        units=stack_units if stack else None,
    )


def slurm_ranks(config: Any) -> int:
    """Processes per point under Slurm (nodes x tasks per node)."""
    return config.slurm.nodes * tasks_per_node(config.slurm)
