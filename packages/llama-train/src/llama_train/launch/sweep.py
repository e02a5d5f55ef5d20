"""Sweeps: a grid over config keys expanded into points, one run directory each, and their record.

A config's `sweep` section maps config keys to lists of values (dotted or nested keys)::

    sweep:
      optim.lr: [1.0e-4, 3.0e-4, 1.0e-3]
      model.dim: [32, 64]

:func:`plan` expands it into the product (6 points, the first key varying
slowest), names each point by its overrides (``optim.lr=0.0001,model.dim=32``:
stable, filesystem-safe, also its run directory under the sweep's ``run.dir``)
and validates every point's full config before anything is queued;
``llama-train submit`` sends the points as one Slurm array job and records them
in ``<sweep dir>/sweep.json`` (:func:`write_manifest`). A single run is a sweep
of one point, ``.``, whose run directory is the sweep directory itself.

Where the points stand and which one won is read by :mod:`llama_train.analysis.status`;
the grid's validation and the `sweep` section live in :mod:`llama_train.launch.submit_config`.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llama_train.analysis.status import SINGLE_POINT, manifest_path, read_manifest
from llama_train.core.config_files import set_dotted, validate
from llama_train.errors import LlamaTrainError
from llama_train.launch.submit_config import SubmitConfig, format_value
from llama_train.recipe.train_config import link_to_data, raw_config
from llama_train.rundir import atomic_write

MANIFEST_VERSION = 1
_MAX_NAME = 200


# ---------------------------------------------------------------------------
# The grid


def expand_grid(grid: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination, the first key varying slowest; an empty grid is one empty point."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


def point_name(overrides: Mapping[str, Any]) -> str:
    """`key=value,key=value` in grid order; `.` for no overrides; hashed when too long."""
    if not overrides:
        return SINGLE_POINT
    name = ",".join(f"{key}={format_value(value)}" for key, value in overrides.items())
    if len(name) > _MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[: _MAX_NAME - 11]}~{digest}"
    return name


# ---------------------------------------------------------------------------
# Planning a submission


@dataclass(frozen=True)
class Point:
    """One grid point: its name (= run directory under the sweep's), overrides and config."""

    index: int
    name: str
    overrides: dict[str, Any]
    config: SubmitConfig  # its sweep is empty; its slurm section is the sweep's


@dataclass(frozen=True)
class Plan:
    """What `llama-train submit` sends: the sweep's own config and its points' configs."""

    base: SubmitConfig
    points: list[Point]

    @property
    def directory(self) -> Path:
        """The sweep directory (the run directory itself for a single run)."""
        return self.base.run_dir

    @property
    def is_sweep(self) -> bool:
        return bool(self.base.sweep)


def plan(
    config_path: str | Path | None,
    overrides: Iterable[str] = (),
    slurm_settings: Mapping[str, Any] | None = None,
) -> Plan:
    """Resolve a config (defaults < YAML < overrides < `slurm_settings`) and its grid points.

    Every point's config is linked to its data and validated here, so a bad
    value fails before anything is queued, naming the point.
    """
    raw = raw_config(config_path, overrides, SubmitConfig)
    if slurm_settings:
        slurm_raw = raw.setdefault("slurm", {})
        if isinstance(slurm_raw, dict):
            slurm_raw.update(slurm_settings)
    base = _validate(link_to_data(raw))
    if not base.sweep:
        return Plan(base, [Point(0, SINGLE_POINT, {}, base)])
    points = []
    for index, values in enumerate(expand_grid(base.sweep)):
        name = point_name(values)
        points.append(Point(index, name, values, _point_config(raw, base, name, values)))
    _check_unique([point.name for point in points])
    return Plan(base, points)


def _point_config(
    raw: Mapping[str, Any], base: SubmitConfig, name: str, values: Mapping[str, Any]
) -> SubmitConfig:
    point_raw = copy.deepcopy(dict(raw))
    try:
        for key, value in values.items():
            set_dotted(point_raw, key.split("."), value)
        point_raw["sweep"] = {}
        point_raw["run"] = {
            **point_raw.get("run", {}),
            "dir": str(base.run_dir / name),
            "name": f"{base.run.name}/{name}",
        }
        return _validate(link_to_data(point_raw))
    except LlamaTrainError as error:
        raise LlamaTrainError(f"sweep point {name}: {error}") from None


def _validate(raw: Mapping[str, Any]) -> SubmitConfig:
    return validate(raw, SubmitConfig)


def _check_unique(names: list[str]) -> None:
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise LlamaTrainError(
            f"sweep points {', '.join(repeated)} share a run directory name (values that differ "
            "only in characters unsafe for file names); make the values distinct"
        )


# ---------------------------------------------------------------------------
# The manifest


def write_manifest(
    sweep: Plan,
    submitted: Mapping[str, str],
    *,
    executor: str,
    log_dir: Path,
    config_path: str | Path | None,
    overrides: Iterable[str],
) -> Path:
    """Record the points and the job ids just given to them (`submitted`: name -> job id).

    An earlier manifest of the same directory is merged: points submitted
    before keep their ids unless submitted again, and every submission is
    listed, so the file tells the whole history of a resubmitted sweep.
    """
    directory = sweep.directory
    old = read_manifest(directory) or {}
    old_points = {point["name"]: point for point in old.get("points", [])}
    now = datetime.now(UTC).isoformat(timespec="seconds")
    points = []
    for point in sweep.points:
        entry = dict(old_points.pop(point.name, {}))
        entry.update(
            index=point.index,
            name=point.name,
            run_dir=point.name,
            overrides=point.overrides,
            steps=point.config.train.steps,
        )
        if point.name in submitted:
            entry["job_id"] = submitted[point.name]
            entry["job_ids"] = [*entry.get("job_ids", []), submitted[point.name]]
        points.append(entry)
    points.extend(old_points.values())  # points of an earlier, larger grid stay listed
    manifest = {
        "version": MANIFEST_VERSION,
        "kind": "sweep" if sweep.is_sweep else "single",
        "name": sweep.base.run.name,
        "grid": sweep.base.sweep,
        "executor": executor,
        "log_dir": str(log_dir),
        "submissions": [
            *old.get("submissions", []),
            {
                "submitted_at": now,
                "config": str(config_path) if config_path is not None else None,
                "overrides": list(overrides),
                "executor": executor,
                "jobs": dict(submitted),
            },
        ],
        "points": points,
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = manifest_path(directory)
    atomic_write(path, json.dumps(manifest, indent=1, default=str) + "\n")
    return path
