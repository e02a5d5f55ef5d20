"""`metrics.jsonl`: one JSON line per metrics record, read back whole or typed.

A training line holds `step`, `tokens` (predicted tokens so far, all ranks), `loss`
and whatever else the trainer and profiler log (lr, grad norm, throughput...); an
evaluation line holds `step` and the `eval/` figures of
:meth:`llama_train.core.evaluate.EvalResult.metrics`. The set of keys is open, so a
line is read as its mapping (:func:`read_metrics`: the resume that truncates the file
and wandb-sync pass lines on whole) or as a :class:`MetricsRecord`, the figures the
readers use, typed, with the line kept. Typed records cost 1.3x to 1.5x the plain
read of a 100k-line file; a pydantic model per line cost 1.9x to 2.5x (docs/design.md,
section The run directory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_train.errors import LlamaTrainError
from llama_train.rundir.files import METRICS_FILENAME

EVAL_PREFIX = "eval/"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The lines of a metrics file (or of a run directory's), each a mapping with a step.

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


@dataclass(frozen=True, slots=True)
class MetricsRecord:
    """One metrics line: its step, its figures (None where the line has none), the line.

    A training line has `tokens` and `loss`; an evaluation line the `eval_*` figures
    (nats per predicted token), and more in :attr:`evaluation`.
    """

    step: int
    tokens: float | None
    loss: float | None
    eval_loss: float | None
    eval_entropy: float | None
    eval_excess: float | None
    line: dict[str, Any] = field(repr=False)

    @classmethod
    def from_line(cls, line: dict[str, Any]) -> MetricsRecord:
        get = line.get
        return cls(
            line["step"],
            _number(get("tokens")),
            _number(get("loss")),
            _number(get("eval/loss")),
            _number(get("eval/entropy")),
            _number(get("eval/excess")),
            line,
        )

    @property
    def evaluation(self) -> dict[str, float]:
        """The line's evaluation figures by name (`loss`, `entropy`, `excess`, `loss_bits`...)."""
        return {
            key.removeprefix(EVAL_PREFIX): number
            for key, value in self.line.items()
            if key.startswith(EVAL_PREFIX) and (number := _number(value)) is not None
        }


def read_metric_records(path: str | Path) -> list[MetricsRecord]:
    """The lines of a metrics file as typed records (damaged lines skipped, as above)."""
    return [MetricsRecord.from_line(line) for line in read_metrics(path)]


@dataclass
class Progress:
    """How far a run's metrics go: the last step, the latest value of each eval figure."""

    step: int | None = None
    evaluation: dict[str, float] = field(default_factory=dict)  # by name: loss, excess...

    @property
    def eval_loss(self) -> float | None:
        return self.evaluation.get("loss")

    @property
    def eval_excess(self) -> float | None:
        return self.evaluation.get("excess")


def read_progress(run_dir: str | Path) -> Progress:
    """A running or finished run's progress; empty when it has no readable metrics yet."""
    progress = Progress()
    try:
        records = read_metric_records(Path(run_dir) / METRICS_FILENAME)
    except LlamaTrainError:
        return progress
    for record in records:
        progress.step = max(progress.step or 0, record.step)
        progress.evaluation.update(record.evaluation)
    return progress


def tokens_per_step(records: list[MetricsRecord]) -> float | None:
    """Predicted tokens per optimizer step, from the first training line past step 0."""
    for record in records:
        if record.tokens is not None and record.step > 0:
            return record.tokens / record.step
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    return None


def _is_step(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
