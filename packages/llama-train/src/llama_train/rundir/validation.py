"""`validation.json`: a study run's final checkpoint scored on the held-out train slice.

A study writes it after training (:func:`llama_train.launch.study.write_validation`);
`study collect` keeps, per point, the learning rate whose record has the lowest loss.
A record of an earlier step than the run's summary is stale: the run trained on.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from llama_train.errors import LlamaTrainError
from llama_train.rundir.files import VALIDATION_FILENAME, read_record, write_json


class ValidationRecord(BaseModel):
    """The loss of the checkpoint at `step` on train rows [first, first + sequences)."""

    model_config = ConfigDict(extra="forbid")

    step: int | None = Field(None, ge=0)
    split: str = "train"
    first: int | None = Field(None, ge=0)
    sequences: int | None = Field(None, ge=0)
    loss: float
    entropy: float | None = None
    excess: float | None = None

    def write(self, run_dir: str | Path) -> Path:
        return write_json(Path(run_dir) / VALIDATION_FILENAME, self.model_dump(mode="json"))


def read_validation(run_dir: str | Path) -> ValidationRecord | None:
    """A run's validation record; None when it has none or a damaged one (validate again)."""
    path = Path(run_dir) / VALIDATION_FILENAME
    if not path.is_file():
        return None
    try:
        return read_record(path, ValidationRecord, "a validation record")
    except LlamaTrainError:
        return None
