"""Metrics: one JSON object per line in `<run dir>/metrics.jsonl`, and wandb when asked.

The JSONL file is the record of a run (plots, summaries and sweeps read it);
wandb is a mirror. Only rank 0 writes either: every other rank gets a logger
that does nothing, so the loop never branches on the rank to log.

On resume, lines past the checkpoint's step are dropped before appending
(they belong to steps that are about to be replayed), so the file of a
resumed run reads like the file of a run that was never interrupted. The
wandb run id is kept in the run directory, and a resumed run logs into the
same wandb run.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import psutil
import torch
from pydantic import BaseModel, ConfigDict, Field

from llama_train.errors import LlamaTrainError
from llama_train.rundir import (
    METRICS_FILENAME,
    WANDB_ID_FILENAME,
    atomic_write,
    read_metric_records,
)


class WandbConfig(BaseModel):
    """Weights & Biases logging (`logging.wandb`); metrics.jsonl is written regardless."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["offline", "online", "disabled"] | None = Field(
        None, description="None = offline when a project is set, else disabled"
    )
    project: str | None = None
    entity: str | None = None
    name: str | None = Field(
        None,
        description="wandb run name; None = a sweep point's overrides, or run.name followed "
        "by the command line's overrides (`llama-train run CONFIG key=value ...`)",
    )

    @property
    def effective_mode(self) -> Literal["offline", "online", "disabled"]:
        """The mode actually used: an unset mode logs offline only when a project is named."""
        if self.mode is not None:
            return self.mode
        return "offline" if self.project else "disabled"


class LoggingConfig(BaseModel):
    """Where metrics go besides metrics.jsonl (the `logging` section)."""

    model_config = ConfigDict(extra="forbid")

    wandb: WandbConfig = WandbConfig()


def system_metrics(device: torch.device) -> dict[str, Any]:
    """Host and memory figures added to training lines: where and how big the process runs."""
    figures: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
    }
    if device.type == "cuda":
        figures["gpu_mem_mb"] = round(torch.cuda.memory_allocated(device) / 2**20, 1)
        figures["gpu_max_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return figures


def truncate_after(path: Path, step: int) -> None:
    """Keep only the lines with `step` <= the given step (atomically rewritten)."""
    if not path.is_file():
        return
    kept = [json.dumps(record.line) for record in read_metric_records(path) if record.step <= step]
    atomic_write(path, "".join(line + "\n" for line in kept))


def _clean(value: Any) -> Any:
    """JSON-safe value: tensors to numbers, non-finite floats to null (strict JSON)."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricLogger:
    """Writes metrics lines (rank 0 only) to metrics.jsonl and, when enabled, to wandb."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool = True,
        resume_step: int | None = None,
        wandb_mode: str = "disabled",
        wandb_project: str | None = None,
        wandb_entity: str | None = None,
        run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        group: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / METRICS_FILENAME
        self._file = None
        self._wandb_run = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        else:
            truncate_after(self.path, resume_step)
        self._file = self.path.open("a", buffering=1)  # line-buffered: a kill loses <= 1 line
        if wandb_mode != "disabled":
            self._wandb_run = _start_wandb(
                self.run_dir, wandb_mode, wandb_project, wandb_entity, run_name, config or {}, group
            )

    def log(self, metrics: Mapping[str, Any]) -> None:
        """Append one line; `metrics` must hold an integer `step`."""
        if not self.enabled:
            return
        assert "step" in metrics, "every metrics line carries its step"
        record = {key: _clean(value) for key, value in metrics.items()}
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        if self._wandb_run is not None:
            numeric = {
                key: value
                for key, value in record.items()
                if key != "step" and isinstance(value, int | float) and value is not None
            }
            self._wandb_run.log(numeric, step=int(record["step"]))

    def summarize(self, figures: Mapping[str, Any]) -> None:
        """Set run-level figures (parameters, FLOPs...) in wandb's summary; the file has
        them in summary.json."""
        if self._wandb_run is not None:
            self._wandb_run.summary.update({k: v for k, v in figures.items() if v is not None})

    def upload(self, path: Path) -> None:
        """Attach a file of the run (a profiler trace) to the wandb run as an artifact."""
        if self._wandb_run is None:
            return
        import wandb

        name = f"{self._wandb_run.id}-{path.stem}".replace("/", "-")
        artifact = wandb.Artifact(name, type="profile")
        artifact.add_file(str(path))
        self._wandb_run.log_artifact(artifact)

    @property
    def wandb_run_id(self) -> str | None:
        """The wandb run id in use, None when wandb is off."""
        return None if self._wandb_run is None else self._wandb_run.id

    def close(self) -> None:
        """Flush and close the file and the wandb run (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def wandb_run_id(run_dir: Path) -> str:
    """The run's wandb id: read from the run directory, or made and stored on first use."""
    id_path = run_dir / WANDB_ID_FILENAME
    if id_path.is_file():
        return id_path.read_text().strip()
    run_id = secrets.token_hex(4)
    id_path.write_text(run_id + "\n")
    return run_id


def _start_wandb(
    run_dir: Path,
    mode: str,
    project: str | None,
    entity: str | None,
    name: str | None,
    config: Mapping[str, Any],
    group: str | None = None,
) -> Any:
    try:
        import wandb
    except ImportError:
        raise LlamaTrainError(
            "logging.wandb.mode is set but wandb is not installed; "
            "pip install 'llama-train[wandb]' or set logging.wandb.mode=disabled"
        ) from None
    # Passed explicitly (WANDB_DIR if set, else the run directory): wandb reads its
    # environment once per process, and a later run must not write into an earlier one's.
    directory = os.environ.get("WANDB_DIR") or str(run_dir)
    return wandb.init(
        project=project,
        entity=entity,
        name=name,
        group=group,
        id=wandb_run_id(run_dir),
        resume="allow",
        mode=mode,
        config=dict(config),
        dir=directory,
    )
