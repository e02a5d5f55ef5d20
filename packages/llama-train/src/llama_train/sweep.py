"""Sweeps: a grid over config keys, one run directory per point, their states, the winner.

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

States are read from the run directories (:func:`point_status`): the job
wrapper's ``job_state.json``, ``summary.json`` and ``metrics.jsonl``; Slurm
accounting is never needed. squeue is asked one thing only: whether a job the
files call pending or running is still in the queue (a job killed by the time
limit or the OOM killer cannot write its own end).

This module reads run directories without importing torch, so `sweep-status`
and `best` answer at once. `llama_train.config` imports it for the section type,
so it imports the config module inside the functions that need it.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BeforeValidator

from llama_train.errors import LlamaTrainError
from llama_train.slurm import JobState, read_state

if TYPE_CHECKING:
    from llama_train.config import TrainConfig

MANIFEST_FILENAME = "sweep.json"
MANIFEST_VERSION = 1
SINGLE_POINT = "."
SUMMARY_FILENAME = "summary.json"  # as llama_train.train writes it
METRICS_FILENAME = "metrics.jsonl"  # as llama_train.metrics writes it
# Keys a grid may not vary: each point's run directory and name are derived from the
# sweep's, and one array job shares one set of Slurm resources.
_FIXED_KEYS = ("run.dir", "run.name")
_FIXED_SECTIONS = ("sweep", "slurm")
_MAX_NAME = 200
_STATES = ("pending", "running", "done", "failed", "preempted")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+\-]")


# ---------------------------------------------------------------------------
# The grid


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
    grid: dict[str, Any] = {}
    _flatten_into(grid, value, "")
    for key, values in grid.items():
        _check_grid_key(key)
        _check_grid_values(key, values)
    return {key: list(values) for key, values in grid.items()}


SweepGrid = Annotated[dict[str, list[Any]], BeforeValidator(normalise_grid)]


def _flatten_into(grid: dict[str, Any], mapping: Mapping[str, Any], prefix: str) -> None:
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _flatten_into(grid, value, dotted + ".")
        else:
            grid[dotted] = value


def _check_grid_key(key: str) -> None:
    from llama_train import config

    parts = key.split(".")
    if key in _FIXED_KEYS:
        raise ValueError(f"{key} cannot be swept: each point's {key} is derived from the sweep's")
    if parts[0] in _FIXED_SECTIONS:
        raise ValueError(
            f"{key} cannot be swept: the points of a sweep share one array job and its resources"
        )
    try:
        config.check_key(parts)
    except LlamaTrainError as error:
        raise ValueError(str(error)) from None
    if any(other.startswith(key + ".") for other in config.known_keys()):
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


def expand_grid(grid: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination, the first key varying slowest; an empty grid is one empty point."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


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
    config: TrainConfig


@dataclass(frozen=True)
class Plan:
    """What `llama-train submit` sends: the sweep's own config and its points' configs."""

    base: TrainConfig
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
    from llama_train import config as configuration

    raw = configuration.load_yaml(config_path) if config_path is not None else {}
    configuration.check_keys(raw)
    raw = configuration.apply_overrides(raw, overrides)
    run_raw = raw.setdefault("run", {})
    if isinstance(run_raw, dict) and config_path is not None:
        run_raw.setdefault("name", Path(config_path).stem)
    if slurm_settings:
        slurm_raw = raw.setdefault("slurm", {})
        if isinstance(slurm_raw, dict):
            slurm_raw.update(slurm_settings)
    base = configuration.validate(configuration.link_to_data(raw))
    if not base.sweep:
        return Plan(base, [Point(0, SINGLE_POINT, {}, base)])
    points = []
    for index, values in enumerate(expand_grid(base.sweep)):
        name = point_name(values)
        points.append(Point(index, name, values, _point_config(raw, base, name, values)))
    _check_unique([point.name for point in points])
    return Plan(base, points)


def _point_config(
    raw: Mapping[str, Any], base: TrainConfig, name: str, values: Mapping[str, Any]
) -> TrainConfig:
    from llama_train import config as configuration

    point_raw = copy.deepcopy(dict(raw))
    for key, value in values.items():
        _set_dotted(point_raw, key.split("."), value)
    point_raw["sweep"] = {}
    point_raw["run"] = {
        **point_raw.get("run", {}),
        "dir": str(base.run_dir / name),
        "name": f"{base.run.name}/{name}",
    }
    try:
        return configuration.validate(configuration.link_to_data(point_raw))
    except LlamaTrainError as error:
        raise LlamaTrainError(f"sweep point {name}: {error}") from None


def _set_dotted(raw: dict[str, Any], parts: list[str], value: Any) -> None:
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _check_unique(names: list[str]) -> None:
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise LlamaTrainError(
            f"sweep points {', '.join(repeated)} share a run directory name (values that differ "
            "only in characters unsafe for file names); make the values distinct"
        )


# ---------------------------------------------------------------------------
# The manifest


def manifest_path(directory: str | Path) -> Path:
    return Path(directory) / MANIFEST_FILENAME


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The sweep.json of a directory; None when there is none."""
    path = manifest_path(directory)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise LlamaTrainError(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("points"), list):
        raise LlamaTrainError(f"{path} is not a sweep manifest (no list of points)")
    return data


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
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    os.replace(partial, path)
    return path


# ---------------------------------------------------------------------------
# States


@dataclass
class PointStatus:
    """Where one point stands, derived from its run directory (and the queue, if asked)."""

    index: int
    name: str
    run_dir: Path
    overrides: dict[str, Any]
    state: JobState
    step: int | None = None
    steps: int | None = None
    job_id: str | None = None
    test_loss: float | None = None
    excess: float | None = None  # nats per token: final when done, else the latest eval
    restarts: int = 0
    message: str = ""
    summary: dict[str, Any] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["run_dir"] = str(self.run_dir)
        del data["summary"]
        return data


def point_status(
    run_dir: Path,
    *,
    index: int = 0,
    name: str = SINGLE_POINT,
    overrides: Mapping[str, Any] | None = None,
    steps: int | None = None,
    job_id: str | None = None,
    queue: set[str] | None = None,
) -> PointStatus:
    """A point's state from its files; `queue` (ids squeue lists, None = unknown) catches
    jobs that died without a word.

    - done: the wrapper said so, or summary.json exists and no wrapper record says otherwise;
    - failed: the wrapper caught an error, or the job left the queue while "running";
    - preempted: checkpointed and requeued (or waiting for a resubmission);
    - running: the wrapper started it, or metrics are being written;
    - pending: nothing written yet.
    """
    record = read_state(run_dir)
    summary = _read_json(run_dir / SUMMARY_FILENAME)
    progress = _progress(run_dir)
    status = PointStatus(
        index=index,
        name=name,
        run_dir=run_dir,
        overrides=dict(overrides or {}),
        state="pending",
        steps=steps,
        job_id=(record or {}).get("job_id") or job_id,
        step=progress.get("step"),
        test_loss=progress.get("eval/loss"),
        excess=progress.get("eval/excess"),
        restarts=int((record or {}).get("restarts") or 0),
        message=str((record or {}).get("message") or ""),
    )
    status.state = _derive_state(record, summary is not None, progress, status.job_id, queue)
    saved = (record or {}).get("step")
    if status.state == "preempted" and isinstance(saved, int):
        status.step = saved  # the checkpoint it resumes from (metrics lag by up to log_every)
    if status.state == "done" and summary is not None:
        status.summary = summary
        status.step = summary.get("step", status.step)
        status.test_loss = summary.get("test_loss")
        status.excess = summary.get("excess_loss")
    if status.state == "failed" and not status.message and queue is not None:
        status.message = "the job left the queue without recording an end; see its log"
    return status


def _derive_state(
    record: Mapping[str, Any] | None,
    has_summary: bool,
    progress: Mapping[str, Any],
    job_id: str | None,
    queue: set[str] | None,
) -> JobState:
    gone = queue is not None and job_id is not None and job_id not in queue
    if record is not None:
        state = record["state"] if record["state"] in _STATES else "running"
        if state == "done" and not has_summary:
            return "failed"  # the summary was deleted or never written: not a result
        if state == "running" and gone:
            return "failed"
        return state
    if has_summary:
        return "done"
    if progress:
        return "failed" if gone else "running"
    return "failed" if gone else "pending"


def _progress(run_dir: Path) -> dict[str, Any]:
    """The last step and the latest eval figures in metrics.jsonl (a torn line is skipped)."""
    progress: dict[str, Any] = {}
    try:
        lines = (run_dir / METRICS_FILENAME).read_text().splitlines()
    except OSError:
        return progress
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        if isinstance(record.get("step"), int):
            progress["step"] = max(progress.get("step", 0), record["step"])
        for key, value in record.items():
            if key.startswith("eval/"):
                progress[key] = value
    return progress


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def sweep_status(directory: str | Path, *, check_queue: bool = True) -> list[PointStatus]:
    """Every point of a sweep (or a single run) directory, in grid order."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        if not (directory / "config.yaml").is_file() and read_state(directory) is None:
            raise LlamaTrainError(
                f"{directory} is neither a sweep nor a run directory (no {MANIFEST_FILENAME}, "
                "no config.yaml); give the run.dir of a submitted config"
            )
        return [point_status(directory)]
    points = manifest["points"]
    queue = None
    if check_queue and manifest.get("executor") == "slurm":
        queue = queued_jobs([point.get("job_id") for point in points])
    return [
        point_status(
            directory / point["run_dir"],
            index=point.get("index", position),
            name=point["name"],
            overrides=point.get("overrides"),
            steps=point.get("steps"),
            job_id=point.get("job_id"),
            queue=queue,
        )
        for position, point in enumerate(points)
    ]


def queued_jobs(job_ids: Iterable[str | None]) -> set[str] | None:
    """Ids squeue lists (array tasks one by one) among the jobs of `job_ids`; None if unknown.

    Finished jobs drop out of squeue (after MinJobAge), so "not listed" means
    "no longer queued or running". When squeue is missing or fails, the queue is
    unknown and the files alone decide.
    """
    ids = sorted({str(job_id).split("_")[0] for job_id in job_ids if job_id})
    if not ids:
        return None
    try:
        result = subprocess.run(
            ["squeue", "--noheader", "--array", "--format=%i %T", f"--jobs={','.join(ids)}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        # squeue refuses the whole list when one id is unknown (purged): ask one by one.
        if len(ids) > 1 and "Invalid job id" in result.stderr:
            found: set[str] = set()
            for job_id in ids:
                listed = queued_jobs([job_id])
                if listed is None:
                    return None
                found |= listed
            return found
        return set() if "Invalid job id" in result.stderr else None
    return _parse_queue(result.stdout)


_ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL"}


def _parse_queue(text: str) -> set[str]:
    listed = set()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] not in _ENDED:
            listed.add(parts[0])
    return listed


# ---------------------------------------------------------------------------
# The winner


def metric_value(status: PointStatus, key: str) -> float | None:
    """A point's figure by name: `eval.<metric>` = its final (latest) evaluation's
    `eval/<metric>`; any other key is a summary.json key (`test_loss`, `excess_loss`...)."""
    if key.startswith("eval."):
        value = _progress(status.run_dir).get("eval/" + key.removeprefix("eval."))
    else:
        value = (status.summary or {}).get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def rank_points(
    statuses: list[PointStatus], by: str, *, maximize: bool = False
) -> list[tuple[PointStatus, float]]:
    """Finished points with figure `by`, best first (lowest, or highest with `maximize`)."""
    done = [status for status in statuses if status.state == "done"]
    if not done:
        states = ", ".join(sorted({status.state for status in statuses})) or "none"
        raise LlamaTrainError(f"no finished point to compare yet (states: {states})")
    ranked = [(status, metric_value(status, by)) for status in done]
    valued = [(status, value) for status, value in ranked if value is not None]
    if not valued:
        raise LlamaTrainError(f"no finished point has {by!r}; {_available_keys(done[0])}")
    return sorted(valued, key=lambda item: -item[1] if maximize else item[1])


def _available_keys(status: PointStatus) -> str:
    summary_keys = [
        key
        for key, value in (status.summary or {}).items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    ]
    eval_keys = [
        "eval." + key.removeprefix("eval/")
        for key in _progress(status.run_dir)
        if key.startswith("eval/")
    ]
    return f"choose one of: {', '.join(eval_keys + summary_keys)}"


def state_counts(statuses: Iterable[PointStatus]) -> dict[str, int]:
    """How many points are in each state, in the order people read them."""
    order: tuple[JobState, ...] = ("done", "running", "preempted", "pending", "failed")
    counts = {state: 0 for state in order}
    for status in statuses:
        counts[status.state] += 1
    return {state: count for state, count in counts.items() if count}
