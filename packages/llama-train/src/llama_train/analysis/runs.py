"""Run directories as data for plots, reports and notebooks (torch-free, quick to import).

:func:`load_runs` takes run directories or folders holding them (a sweep
directory, a folder of runs) and returns one :class:`RunData` per run: its
training and evaluation curves against tokens and steps, the last
evaluation's per-position excess loss, the summary and the profiler rows.
Everything is read from the files the trainer writes; nothing is recomputed.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from llama_train.errors import LlamaTrainError
from llama_train.rundir import (
    METRICS_FILENAME,
    PROFILE_FILENAME,
    RunSummary,
    latest_evaluation,
    read_metric_records,
    read_summary,
)

LN2 = math.log(2)


@dataclass
class RunData:
    """One run's curves; tokens are predicted tokens, all ranks; losses in nats."""

    name: str
    path: Path
    train_steps: list[int] = field(default_factory=list)
    train_tokens: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_tokens: list[float] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    eval_excess: list[float] = field(default_factory=list)
    entropy: float | None = None  # the floor of the evaluation set (latest evaluation)
    position_excess: list[float] = field(default_factory=list)  # latest evaluation, t = 1..
    position_step: int | None = None
    summary: RunSummary | None = None  # None while the run is not finished
    profile: list[dict[str, str]] = field(default_factory=list)

    @property
    def tokens_per_step(self) -> float | None:
        """Predicted tokens per optimizer step, from the last training line."""
        if self.train_steps and self.train_steps[-1] > 0:
            return self.train_tokens[-1] / self.train_steps[-1]
        return None

    def baseline_nats(self, key: str) -> float | None:
        """A baseline of the evaluation data (`unigram_bits`, `zstd_bits`) in nats."""
        baselines = (self.summary.baselines if self.summary else None) or {}
        return baselines[key] * LN2 if key in baselines else None


def find_runs(paths: list[str | Path]) -> list[Path]:
    """The run directories named, or found below the folders named, in a stable order.

    A run directory named is taken with its cooldown branches (`<run>/branches/*`,
    :mod:`llama_train.recipe.branches`): a trunk and its branches are one run's data points.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise LlamaTrainError(f"{path} is not a directory")
        if (path / METRICS_FILENAME).is_file():
            found.append(path)
            found.extend(sorted(p.parent for p in path.glob(f"branches/*/{METRICS_FILENAME}")))
            continue
        below = sorted(p.parent for p in path.rglob(METRICS_FILENAME))
        if not below:
            raise LlamaTrainError(f"no run directory (with {METRICS_FILENAME}) in {path}")
        found.extend(below)
    return found


def load_runs(paths: list[str | Path]) -> list[RunData]:
    """Every run under `paths`, named by its path relative to their common folder."""
    directories = find_runs(paths)
    if len(directories) == 1:
        names = [directories[0].name]
    else:
        common = Path(os.path.commonpath([d.resolve() for d in directories]))
        names = [str(d.resolve().relative_to(common)) or d.name for d in directories]
    return [load_run(directory, name) for directory, name in zip(directories, names, strict=True)]


def load_run(run_dir: str | Path, name: str | None = None) -> RunData:
    """One run directory's curves (see :class:`RunData`)."""
    run_dir = Path(run_dir)
    run = RunData(name=name or run_dir.name, path=run_dir)
    records = read_metric_records(run_dir)
    for record in records:
        if record.tokens is not None and record.loss is not None:
            run.train_steps.append(record.step)
            run.train_tokens.append(float(record.tokens))
            run.train_loss.append(float(record.loss))
    per_step = run.tokens_per_step
    for record in records:
        loss, excess, entropy = record.eval_loss, record.eval_excess, record.eval_entropy
        if loss is not None and excess is not None and entropy is not None:
            run.eval_steps.append(record.step)
            run.eval_tokens.append(record.step * per_step if per_step else math.nan)
            run.eval_loss.append(float(loss))
            run.eval_excess.append(float(excess))
            run.entropy = float(entropy)
    latest = latest_evaluation(run_dir)
    if latest is not None:
        run.position_step = latest.step
        run.position_excess = latest.excess_per_position
    run.summary = read_summary(run_dir)
    profile_path = run_dir / PROFILE_FILENAME
    if profile_path.is_file():
        try:
            run.profile = list(csv.DictReader(io.StringIO(profile_path.read_text())))
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise LlamaTrainError(f"cannot read {profile_path}: {error}") from None
    if not run.train_loss and not run.eval_loss:
        raise LlamaTrainError(f"{run_dir / METRICS_FILENAME} has no loss to plot yet")
    return run
