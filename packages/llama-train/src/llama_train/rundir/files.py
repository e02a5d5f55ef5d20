"""The run directory's file names, atomic writes, and the one reader of its JSON files.

Every file of a run directory is replaced whole (:func:`atomic_write`): a reader sees
the old file or the new, never a part. :func:`read_json_object` is how every JSON file
of the run directory is read, so a damaged one reads as the same one line everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

# The one atomic write (fsync, rename, fsync the folder), shared with gssm-data.
from gssm_data.common.atomicfile import atomic_write as atomic_write
from gssm_data.common.atomicfile import fsync_directory as fsync_directory
from llama_train.errors import LlamaTrainError

CONFIG_FILENAME = "config.yaml"
METRICS_FILENAME = "metrics.jsonl"
SUMMARY_FILENAME = "summary.json"
CHECKPOINT_DIR = "checkpoints"
EVAL_DIR = "eval"
STATE_FILENAME = "job_state.json"
VALIDATION_FILENAME = "validation.json"
PROFILE_FILENAME = "profile.csv"
LOG_DIR = "slurm"
WANDB_ID_FILENAME = "wandb_run_id"

# A JSON record of a run directory is a few kilobytes (an evaluation's curves: one number
# per position). Past this it is not such a record (/dev/zero, a log file): not read whole.
MAX_RECORD_BYTES = 64 * 1024 * 1024

Record = TypeVar("Record", bound=BaseModel)


def write_json(path: str | Path, record: dict[str, Any]) -> Path:
    """A record as indented JSON, atomically (the layout every run-directory record has)."""
    return atomic_write(path, json.dumps(record, indent=1) + "\n")


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON object from a run directory; anything wrong is one line naming the file.

    A file that cannot be read says why (`cannot read ...`); one that is not a JSON
    object says it is damaged: a run directory's records are written whole, so a torn
    or foreign file was damaged after the fact.
    """
    path = Path(path)
    try:
        with path.open("rb") as file:
            data = file.read(MAX_RECORD_BYTES + 1)
    except OSError as error:
        raise LlamaTrainError(f"cannot read {path}: {error.strerror or error}") from None
    if len(data) > MAX_RECORD_BYTES:
        raise LlamaTrainError(f"{path} is damaged (larger than {MAX_RECORD_BYTES} bytes)")
    try:
        record = json.loads(data)
    except UnicodeDecodeError as error:
        raise LlamaTrainError(f"{path} is damaged (not UTF-8: {error.reason})") from None
    except ValueError as error:
        raise LlamaTrainError(f"{path} is damaged (not valid JSON: {error})") from None
    if not isinstance(record, dict):
        raise LlamaTrainError(f"{path} is damaged (not a JSON object)")
    return record


def read_record(path: str | Path, model: type[Record], what: str) -> Record:
    """A JSON file of the run directory as `model`; a damaged one is one line naming it."""
    data = read_json_object(path)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"]) or "record"
        raise LlamaTrainError(
            f"{path} is damaged (not {what}: {where}: {problem['msg']})"
        ) from None
