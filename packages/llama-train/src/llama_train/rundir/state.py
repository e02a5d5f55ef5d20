"""The job state file (`job_state.json`): what the job wrapper last said about a run.

A submitted run's wrapper records pending, running, done, failed or preempted with
the job id, host and time; `sweep-status` reads it back without asking Slurm.
"""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from llama_train.errors import LlamaTrainError
from llama_train.rundir.files import STATE_FILENAME, read_record, write_json

JobState = Literal["pending", "running", "done", "failed", "preempted"]


class JobRecord(BaseModel):
    """One `job_state.json`: the state and where it was recorded."""

    model_config = ConfigDict(extra="forbid")

    state: JobState
    job_id: str | None = None
    restarts: int = 0
    host: str | None = None
    pid: int | None = None
    updated_at: str | None = None
    step: int | None = None  # done: the final step; preempted: the checkpoint it resumes from
    message: str | None = None  # failed or preempted: why, in one line


def read_state(run_dir: Path) -> JobRecord | None:
    """The last state the job wrapper recorded in a run directory; None if none (or torn).

    A torn or foreign file is no record: the wrapper writes it whole, and a run without
    one is judged by its other files (:func:`llama_train.analysis.status.point_status`).
    """
    path = Path(run_dir) / STATE_FILENAME
    if not path.is_file():
        return None
    try:
        return read_record(path, JobRecord, "a job state record")
    except LlamaTrainError:
        return None


def write_state(
    run_dir: Path, state: JobState, *, step: int | None = None, message: str | None = None
) -> JobRecord:
    """Record `state` (with job id, host, time, `step` and `message`) atomically."""
    record = JobRecord(
        state=state,
        job_id=current_job_id(),
        restarts=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        host=socket.gethostname(),
        pid=os.getpid(),
        updated_at=datetime.now(UTC).isoformat(timespec="seconds"),
        step=step,
        message=message,
    )
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / STATE_FILENAME, record.model_dump(mode="json"))
    return record


def current_job_id(environ: dict[str, str] | None = None) -> str | None:
    """This job's id as scontrol names it: `ARRAY_TASK` for array tasks; the pid locally."""
    env = os.environ if environ is None else environ
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if "SLURM_JOB_ID" in env:
        return env["SLURM_JOB_ID"]
    return env.get("SUBMITIT_LOCAL_JOB_ID")
