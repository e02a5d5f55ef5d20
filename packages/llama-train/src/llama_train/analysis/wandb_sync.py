"""Replay run directories into wandb (`llama-train wandb-sync RUN_DIR...`), online or offline.

The run directory is the record of a run (metrics.jsonl, eval/, summary.json,
config.yaml, profile.csv); wandb is a mirror that may be off during training
(a cluster without network, a run started without a project). This module
makes the mirror afterwards, or brings it up to date:

- one wandb run per run directory, with a deterministic id: the one the run
  logged live with (`wandb_run_id`), else derived from the directory's
  absolute path, so syncing again resumes the same wandb run (resume="allow");
- history: every metrics line, merged per step (a training line and an
  evaluation line of the same step become one wandb step; if a resumed run's
  file repeats a step, the later line wins), with the profiler's row of that
  step as `profile/<column>`, in increasing step order;
- only steps not sent before: `wandb_sync.json` in the run directory records
  the last step sent, per mode (offline and online are different targets),
  so running it twice sends nothing twice, and a run that went on sends only
  its new steps;
- config (the training config plus parameter counts and the data's
  fingerprint), summary figures, and the files themselves (config.yaml,
  summary.json, profile.csv, eval/*.json).

Name and group follow live logging (llama_train.core.run_identity): a sweep
point is named by its overrides and grouped by its sweep.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llama_train.errors import LlamaTrainError
from llama_train.rundir import (
    CONFIG_FILENAME,
    METRICS_FILENAME,
    PROFILE_FILENAME,
    SUMMARY_FILENAME,
    WANDB_ID_FILENAME,
    SentSteps,
    evaluation_paths,
    read_metric_records,
    read_summary,
    read_sync_state,
    read_wandb_settings,
    wandb_name_and_group,
)

DEFAULT_PROJECT = "llama-train"
FILES = (CONFIG_FILENAME, SUMMARY_FILENAME, PROFILE_FILENAME)
# Run figures of summary.json that also go into the wandb config (filtering by size, data).
SUMMARY_FACTS = ("parameters", "parameters_total", "parameters_non_embedding", "store_fingerprint")

Mode = Literal["online", "offline"]


@dataclass(frozen=True)
class SyncResult:
    """What one run directory sent."""

    run_dir: Path
    run_id: str
    name: str | None
    steps_sent: int
    last_step: int | None
    files: int


def run_id_for(run_dir: Path) -> str:
    """The run's wandb id: the live run's (`wandb_run_id`), else a hash of the absolute path."""
    id_path = run_dir / WANDB_ID_FILENAME
    if id_path.is_file() and id_path.read_text().strip():
        return id_path.read_text().strip()
    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]


def history(run_dir: Path) -> list[dict[str, Any]]:
    """Metrics lines (and profiler rows) merged per step, later lines winning, sorted by step."""
    by_step: dict[int, dict[str, Any]] = {}
    for record in read_metric_records(run_dir / METRICS_FILENAME):
        by_step.setdefault(record.step, {}).update(_numbers(record.line))
    for row in _profile_rows(run_dir):
        step = int(row.pop("step"))
        if step in by_step:  # a row whose metrics line a resume dropped is not a step
            by_step[step].update({f"profile/{key}": value for key, value in row.items()})
    return [{"step": step, **by_step[step]} for step in sorted(by_step)]


def _numbers(record: dict[str, Any]) -> dict[str, float | int]:
    """The finite numbers of a metrics line (wandb plots numbers; hostnames live in config)."""
    return {
        key: value
        for key, value in record.items()
        if key != "step"
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


def _profile_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / PROFILE_FILENAME
    if not path.is_file():
        return []
    rows = []
    for row in csv.DictReader(io.StringIO(path.read_text())):
        numbers: dict[str, Any] = {}
        for key, value in row.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(number):
                numbers[key] = number
        if "step" in numbers:
            rows.append(numbers)
    return rows


def sync_run(
    run_dir: str | Path,
    *,
    mode: Mode = "offline",
    project: str | None = None,
    entity: str | None = None,
) -> SyncResult:
    """Send one run directory to wandb (only what it has not sent in this mode before)."""
    run_dir = Path(run_dir)
    if not (run_dir / METRICS_FILENAME).is_file():
        raise LlamaTrainError(f"{run_dir} is not a run directory (no {METRICS_FILENAME})")
    try:
        import wandb
    except ImportError:
        raise LlamaTrainError("wandb-sync needs wandb: pip install 'llama-train[wandb]'") from None
    settings = read_wandb_settings(run_dir)
    summary = read_summary(run_dir)
    facts = {} if summary is None else summary.model_dump(include=set(SUMMARY_FACTS))
    name, group = wandb_name_and_group(settings.run_name or run_dir.name, settings.name)
    run_id = run_id_for(run_dir)
    state = read_sync_state(run_dir)
    sent_before = state.sent_before(run_id, mode)
    run = wandb.init(
        project=project or settings.project or DEFAULT_PROJECT,
        entity=entity or settings.entity,
        id=run_id,
        name=name,
        group=group,
        resume="allow",
        mode=mode,
        dir=os.environ.get("WANDB_DIR") or str(run_dir),
        config={
            **settings.config,
            **{key: value for key, value in facts.items() if value is not None},
        },
    )
    try:
        # A resumed online run knows its last step; never send a step at or below it.
        floor = max(sent_before if sent_before is not None else -1, (run.step or 0) - 1)
        steps = [line for line in history(run_dir) if line["step"] > floor]
        for line in steps:
            run.log({k: v for k, v in line.items() if k != "step"}, step=line["step"])
        if summary is not None:
            run.summary.update(summary.figures())
        files = [run_dir / name for name in FILES if (run_dir / name).is_file()]
        files += evaluation_paths(run_dir)
        for path in files:
            run.save(str(path), base_path=str(run_dir), policy="now")
    finally:
        run.finish()
    last_step = steps[-1]["step"] if steps else sent_before
    state.run_id = run_id
    setattr(state, mode, SentSteps(last_step=last_step))
    state.write(run_dir)
    return SyncResult(run_dir, run_id, name, len(steps), last_step, len(files))
