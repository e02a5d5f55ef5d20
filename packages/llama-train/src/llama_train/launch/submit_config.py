"""The config of `llama-train submit`: the training config plus the launcher's sections.

:class:`SubmitConfig` extends the recipe's `TrainConfig` with `slurm` (how Slurm
is asked for resources) and `sweep` (a grid over config keys, one run per
point). A training process never sees these: each point is trained with a plain
`TrainConfig`, and its `config.yaml` holds only what training reads.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from llama_train.core import config_files
from llama_train.core.plain_text import PlainPath, PlainScalar, PlainStr
from llama_train.errors import LlamaTrainError
from llama_train.recipe.train_config import TrainConfig

# Keys a grid may not vary: each point's run directory and name are derived from the
# sweep's, and one array job shares one set of Slurm resources.
_FIXED_KEYS = ("run.dir", "run.name")
_FIXED_SECTIONS = ("sweep", "slurm")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+\-]")
# Most points one sweep may hold, checked before the grid is expanded: every point is
# validated (and its store opened) at submission, and clusters cap array jobs lower still
# (Slurm's default MaxArraySize is 1001).
MAX_POINTS = 10_000


def normalise_grid(value: object) -> dict[str, list[Any]]:
    """The `sweep` section as {dotted key: non-empty list}, every key a real config key.

    Nested keys (`optim: {lr: [...]}`, what the override `sweep.optim.lr=[...]`
    builds) and dotted ones (`optim.lr: [...]`) mean the same; when both name a
    key, the later one wins (an override after the YAML file) and the first
    one's position is kept, so point names stay stable.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(
            "expected a mapping of config keys to lists, e.g. {optim.lr: [1e-4, 3e-4]}"
        )
    grid = config_files.flatten_keys(value)
    for key, values in grid.items():
        _check_grid_key(key)
        _check_grid_values(key, values)
    points = math.prod(len(values) for values in grid.values())
    if points > MAX_POINTS:
        sizes = " x ".join(str(len(values)) for values in grid.values())
        raise ValueError(
            f"a grid of {sizes} = {points:,} points is more than the {MAX_POINTS:,} one "
            "submission may hold; split it into several sweeps"
        )
    return {key: list(values) for key, values in grid.items()}


SweepGrid = Annotated[dict[str, list[Any]], BeforeValidator(normalise_grid)]


def _check_grid_key(key: str) -> None:
    parts = key.split(".")
    if key in _FIXED_KEYS:
        raise ValueError(f"{key} cannot be swept: each point's {key} is derived from the sweep's")
    if parts[0] in _FIXED_SECTIONS:
        raise ValueError(
            f"{key} cannot be swept: the points of a sweep share one array job and its resources"
        )
    try:
        config_files.check_key(parts, TrainConfig)
    except LlamaTrainError as error:
        raise ValueError(str(error)) from None
    if any(other.startswith(key + ".") for other in config_files.known_keys(TrainConfig)):
        raise ValueError(f"{key} is a section; sweep its keys, e.g. {key}.<key>: [...]")


def _check_grid_values(key: str, values: object) -> None:
    if not isinstance(values, list):
        raise ValueError(f"{key}: give a list of values, e.g. {key}: [{values!r}, ...]")
    if not values:
        raise ValueError(f"{key}: the list of values is empty")
    names = [format_value(value) for value in values]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{key}: {', '.join(repeated)} listed twice (two identical points)")


def format_value(value: Any) -> str:
    """A value as it appears in a point name: short, exact, no path separators."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        # repr is the shortest spelling that reads back exactly; 1e5 written as a count is 100000.
        text = str(int(value)) if value.is_integer() and abs(value) < 1e16 else repr(value)
    elif isinstance(value, list | tuple):
        text = "_".join(format_value(item) for item in value)
    elif isinstance(value, Mapping):
        text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    else:
        text = str(value)
    return _UNSAFE.sub("_", text)


class SlurmConfig(BaseModel):
    """The `slurm` section: how `llama-train submit` asks Slurm for resources.

    Every field can be overridden like any key (`slurm.partition=gpu`) or by the
    submit command's flags (`--partition`, `--time`, ...), which win.
    """

    model_config = ConfigDict(extra="forbid")

    partition: PlainStr | None = Field(None, description="partition; None = the cluster's default")
    timeout_min: int = Field(
        60,
        gt=0,
        description="time limit in minutes (the --time flag also takes Slurm's 1:30:00, "
        "2-00:00:00); a preempted or timed-out run is requeued and resumes",
    )
    nodes: int = Field(1, ge=1, description="nodes per run")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node (one trainer task each)")
    tasks_per_node: int | None = Field(
        None,
        ge=1,
        description="trainer processes per node; None = one per GPU, or one without GPUs "
        "(more gives multi-process CPU training)",
    )
    cpus_per_task: int | None = Field(None, ge=1, description="CPUs per task; None = Slurm's 1")
    mem: PlainStr | None = Field(
        None,
        pattern=r"^[0-9]+[KMGT]?$",
        description="memory per node, as sbatch --mem (64G); None = the partition's default",
    )
    account: PlainStr | None = Field(None, description="sbatch --account")
    qos: PlainStr | None = Field(None, description="sbatch --qos")
    constraint: PlainStr | None = Field(None, description="sbatch --constraint (node features)")
    signal_delay_s: int = Field(
        120,
        ge=10,
        description="Slurm sends SIGUSR1 this long before the time limit: enough to save "
        "a checkpoint, then the job is requeued",
    )
    max_requeues: int = Field(
        20, ge=0, description="requeues after preemption before a run gives up (resubmit then)"
    )
    array_parallelism: int | None = Field(
        None, ge=1, description="sweeps: most grid points running at once; None = all"
    )
    setup: list[PlainStr] = Field(
        default_factory=list,
        description="shell lines run before the job starts (module load ..., source .venv/...)",
    )
    additional: dict[PlainStr, PlainScalar] = Field(
        default_factory=dict,
        description="any other sbatch option by its long name, e.g. {exclude: node3}",
    )
    log_dir: PlainPath | None = Field(
        None, description="submitit folder (scripts, pickles, logs); None = <run.dir>/slurm"
    )


class SubmitConfig(TrainConfig):
    """What `llama-train submit` reads: a training config, its Slurm resources and its grid."""

    slurm: SlurmConfig = SlurmConfig()
    sweep: SweepGrid = Field(
        default_factory=dict,
        description="grid of `llama-train submit`: config key -> list of values, one run per "
        "combination under run.dir (e.g. optim.lr: [1e-4, 3e-4])",
    )

    def train_config(self, **updates: Any) -> TrainConfig:
        """The training config alone (what each job trains), with `updates` applied."""
        fields = {name: getattr(self, name) for name in TrainConfig.model_fields}
        return TrainConfig.model_validate({**fields, **updates})
