"""`eval/step_NNNNNN.json`: one full evaluation each, curves included.

The trainer writes one at every evaluation (:func:`write_evaluation`, from
:class:`llama_train.core.evaluate.EvalResult`); the report's per-position excess
and wandb-sync read them back. The layout has not changed since the first
trainer: losses in nats per predicted token (positions 1..L-1), with bits beside.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from llama_train.errors import LlamaTrainError
from llama_train.rundir.files import EVAL_DIR, read_record, write_json


class EvalRecord(BaseModel):
    """One evaluation: the mean losses and their per-position curves."""

    model_config = ConfigDict(extra="forbid")

    step: int = Field(ge=0)
    split: str
    n_sequences: int = Field(ge=0)
    loss: float
    entropy: float
    entropy_method: str
    loss_per_position: list[float]
    entropy_per_position: list[float]
    excess: float
    loss_bits: float
    entropy_bits: float
    excess_bits: float

    @property
    def excess_per_position(self) -> list[float]:
        """Model loss above the exact entropy at each position t = 1.. (nats)."""
        return [
            loss - floor
            for loss, floor in zip(self.loss_per_position, self.entropy_per_position, strict=True)
        ]


def evaluation_path(run_dir: str | Path, step: int) -> Path:
    """Where the evaluation at `step` is kept."""
    return Path(run_dir) / EVAL_DIR / f"step_{step:06d}.json"


def evaluation_paths(run_dir: str | Path) -> list[Path]:
    """The run's evaluation files, oldest first."""
    return sorted((Path(run_dir) / EVAL_DIR).glob("step_*.json"))


def write_evaluation(run_dir: str | Path, record: EvalRecord) -> Path:
    """Write the evaluation of `record.step` atomically."""
    path = evaluation_path(run_dir, record.step)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json(path, record.model_dump(mode="json"))


def read_evaluation(path: str | Path) -> EvalRecord:
    """One evaluation file; a damaged one is one line naming it."""
    record = read_record(path, EvalRecord, "an evaluation record")
    if len(record.loss_per_position) != len(record.entropy_per_position):
        raise LlamaTrainError(f"{path} is damaged (its two curves differ in length)")
    return record


def latest_evaluation(run_dir: str | Path) -> EvalRecord | None:
    """The run's most recent evaluation, None when it has none."""
    paths = evaluation_paths(run_dir)
    return read_evaluation(paths[-1]) if paths else None


def drop_evaluations_after(run_dir: str | Path, step: int) -> None:
    """Forget evaluations past `step` (a resumed run replays those steps)."""
    for path in evaluation_paths(run_dir):
        if int(path.stem.removeprefix("step_")) > step:
            path.unlink()
