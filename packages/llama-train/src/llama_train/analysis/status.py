"""Where the points of a sweep (or a single submitted run) stand, and which one won.

States are read from the run directories (:func:`point_status`): the job
wrapper's ``job_state.json``, ``summary.json`` and ``metrics.jsonl``; Slurm
accounting is never needed. squeue is asked one thing only: whether a job the
files call pending or running is still in the queue (a job killed by the time
limit or the OOM killer cannot write its own end).

This module imports neither torch nor the trainer, so `sweep-status` and `best`
answer at once.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llama_train.errors import LlamaTrainError
from llama_train.rundir import (
    CONFIG_FILENAME,
    JobRecord,
    JobState,
    Progress,
    RunSummary,
    read_progress,
    read_state,
    sound_summary,
)

MANIFEST_FILENAME = "sweep.json"
SINGLE_POINT = "."


# ---------------------------------------------------------------------------
# The manifest (written by :func:`llama_train.launch.sweep.write_manifest`)


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
    summary: RunSummary | None = field(default=None, repr=False)

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
    summary = sound_summary(run_dir)
    progress = read_progress(run_dir)
    status = PointStatus(
        index=index,
        name=name,
        run_dir=run_dir,
        overrides=dict(overrides or {}),
        state="pending",
        steps=steps,
        job_id=(record.job_id if record else None) or job_id,
        step=progress.step,
        test_loss=progress.eval_loss,
        excess=progress.eval_excess,
        restarts=record.restarts if record else 0,
        message=(record.message if record else None) or "",
    )
    status.state = _derive_state(record, summary is not None, progress, status.job_id, queue)
    if status.state == "preempted" and record is not None and record.step is not None:
        status.step = record.step  # the checkpoint it resumes from (metrics lag by log_every)
    if status.state == "done" and summary is not None:
        status.summary = summary
        status.step = summary.step
        status.test_loss = summary.test_loss
        status.excess = summary.excess_loss
    if status.state == "failed" and not status.message and queue is not None:
        status.message = "the job left the queue without recording an end; see its log"
    return status


def _derive_state(
    record: JobRecord | None,
    has_summary: bool,
    progress: Progress,
    job_id: str | None,
    queue: set[str] | None,
) -> JobState:
    gone = queue is not None and job_id is not None and job_id not in queue
    if record is not None:
        state = record.state
        if state == "done" and not has_summary:
            return "failed"  # the summary was deleted or never written: not a result
        if state == "running" and gone:
            return "failed"
        return state
    if has_summary:
        return "done"
    if progress.step is not None:
        return "failed" if gone else "running"
    return "failed" if gone else "pending"


def sweep_status(directory: str | Path, *, check_queue: bool = True) -> list[PointStatus]:
    """Every point of a sweep directory in grid order, a single run, or a folder of runs.

    A folder holding separate run directories (no sweep.json of its own) lists
    each of them, by name, so runs made one by one compare like a sweep's points.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        if _is_run_dir(directory):
            return [point_status(directory)]
        runs = sorted(child for child in _children(directory) if _is_run_dir(child))
        if not runs:
            raise LlamaTrainError(
                f"{directory} is neither a sweep nor a run directory nor a folder of runs (no "
                f"{MANIFEST_FILENAME}, no config.yaml here or one level down); give the "
                "run.dir of a submitted config"
            )
        return [point_status(run, index=index, name=run.name) for index, run in enumerate(runs)]
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


def _is_run_dir(directory: Path) -> bool:
    return (directory / CONFIG_FILENAME).is_file() or read_state(directory) is not None


def _children(directory: Path) -> list[Path]:
    try:
        return [child for child in directory.iterdir() if child.is_dir()]
    except OSError:
        return []


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
        value = read_progress(status.run_dir).evaluation.get(key.removeprefix("eval."))
    else:
        value = status.summary.figures().get(key) if status.summary else None
    return None if value is None else float(value)


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
    summary_keys = list(status.summary.figures()) if status.summary else []
    eval_keys = ["eval." + key for key in read_progress(status.run_dir).evaluation]
    return f"choose one of: {', '.join(eval_keys + summary_keys)}"


def state_counts(statuses: Iterable[PointStatus]) -> dict[str, int]:
    """How many points are in each state, in the order people read them."""
    order: tuple[JobState, ...] = ("done", "running", "preempted", "pending", "failed")
    counts = {state: 0 for state in order}
    for status in statuses:
        counts[status.state] += 1
    return {state: count for state, count in counts.items() if count}
