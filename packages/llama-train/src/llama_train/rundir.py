"""The run directory: its file names, the job state file, and atomic writes (gssm_data.atomicfile).

A run directory (`run.dir`) holds everything a run leaves behind::

    config.yaml      the resolved config (written before the first step)
    metrics.jsonl    one JSON line per metrics record
    summary.json     the final figures (written at the last step)
    checkpoints/     step_NNNNNN folders
    eval/            step_NNNNNN.json, one full evaluation each
    job_state.json   the job wrapper's record (submitted runs only)
    slurm/           submitit's scripts and logs (submitted runs only)

This module imports neither torch nor the trainer, so commands that only read
run directories (`sweep-status`, `best`) answer at once.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from gssm_data.atomicfile import atomic_write as atomic_write  # the one atomic write
from gssm_data.atomicfile import fsync_directory as fsync_directory
from gssm_data.errors import GssmDataError
from gssm_data.yamlfile import load_yaml_file
from llama_train.errors import LlamaTrainError

CONFIG_FILENAME = "config.yaml"
METRICS_FILENAME = "metrics.jsonl"
SUMMARY_FILENAME = "summary.json"
CHECKPOINT_DIR = "checkpoints"
EVAL_DIR = "eval"
STATE_FILENAME = "job_state.json"
LOG_DIR = "slurm"
WANDB_ID_FILENAME = "wandb_run_id"

JobState = Literal["pending", "running", "done", "failed", "preempted"]


# ---------------------------------------------------------------------------
# The job state file


def read_state(run_dir: Path) -> dict[str, Any] | None:
    """The last state the job wrapper recorded in a run directory; None if none (or torn)."""
    try:
        data = json.loads((Path(run_dir) / STATE_FILENAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "state" in data else None


def write_state(run_dir: Path, state: JobState, **fields: Any) -> dict[str, Any]:
    """Record `state` (with job id, host, time and `fields`) atomically; return the record."""
    record = {
        "state": state,
        "job_id": current_job_id(),
        "restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **fields,
    }
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / STATE_FILENAME, json.dumps(record, indent=1))
    return record


def current_job_id(environ: dict[str, str] | None = None) -> str | None:
    """This job's id as scontrol names it: `ARRAY_TASK` for array tasks; the pid locally."""
    env = os.environ if environ is None else environ
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if "SLURM_JOB_ID" in env:
        return env["SLURM_JOB_ID"]
    return env.get("SUBMITIT_LOCAL_JOB_ID")


# ---------------------------------------------------------------------------
# Reading the run's files


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from a user's file; anything wrong is a one-line user error.

    gssm_data.yamlfile does the reading: a regular file of at most 1 MB (never a
    directory or /dev/zero), UTF-8, nesting at most 64 deep, finite numbers,
    plain data only, and `1e4` / `3e-4` read as floats, as overrides read them.
    The run's own `config.yaml` and every config a user passes are read this way.
    """
    try:
        data = load_yaml_file(path, what="config file")
    except GssmDataError as error:
        raise LlamaTrainError(str(error)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LlamaTrainError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The lines of a metrics file, each a mapping with an integer step.

    A torn last line (a killed writer) is skipped, and so is any other line that is
    not such a record (a damaged file): every reader (plots, reports, wandb-sync, the
    resume that truncates the file) may then index records without checking them.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILENAME
    if not path.is_file():
        raise LlamaTrainError(f"no metrics file at {path}")
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        raise LlamaTrainError(f"cannot read {path}: {error.strerror or error}") from None
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and _is_step(record.get("step")):
            records.append(record)
    return records


def _is_step(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def wandb_name_and_group(
    run_name: str | None, name: str | None = None
) -> tuple[str | None, str | None]:
    """(name, group) on wandb: `sweep/point` gives (`point`, `sweep`); else (run name, None).

    `name` (logging.wandb.name) replaces the derived name, keeping the group.
    """
    group = None
    if run_name and "/" in run_name:
        group, _, run_name = run_name.rpartition("/")
    return name or run_name, group
