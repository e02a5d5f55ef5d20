"""`summary.json`: a finished run's figures, one typed record with a layout version.

Training writes it at the last step (:meth:`RunSummary.write`); everything that
reads a finished run (status, tables, reports, a study's points, wandb-sync) reads it
through :func:`read_summary`. Losses are nats per predicted token, `*_bits` the same
in bits.

Layouts. Version 2 (written now) holds every field below. A summary without a
`version` is of layout 1: what the trainer wrote before the version existed, and
what hand-made summaries are. Layout 1 had fewer fields, added over time
(world_size; the scale figures; warmup_steps and profile_seconds;
unique_tokens_seen; startup_cpu_seconds), and its oldest files name the parameter
count and the tokens only `parameters` and `tokens`. The migration
(:meth:`RunSummary._migrate`) reads each of them: it derives what the current writer
would have written from what the file holds (`parameters_total` = `parameters`,
`tokens_seen` = `tokens`, `unique_tokens_seen` = min(tokens seen, unique tokens)) and
marks the rest unknown (None). A summary of a later version than this code knows is
refused, and so is a key no layout has: a summary is written by the trainer, so either
means a newer llama-train or a damaged file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llama_train.errors import LlamaTrainError
from llama_train.rundir.files import SUMMARY_FILENAME, read_record, write_json

SUMMARY_VERSION = 2


class RunSummary(BaseModel):
    """The figures of a finished run (None: not known in the layout it was written in)."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(SUMMARY_VERSION, description="layout of the file (see the module)")
    step: int = Field(ge=0, description="the last step, where the final evaluation ran")
    test_loss: float = Field(description="final evaluation loss, nats per predicted token")
    test_entropy: float | None = Field(description="exact entropy of the same sequences")
    excess_loss: float | None = Field(description="test_loss - test_entropy")
    test_loss_bits: float | None
    test_entropy_bits: float | None
    excess_loss_bits: float | None
    entropy_method: str | None = Field(description="how test_entropy was obtained")
    eval_split: str | None
    eval_sequences: int | None
    parameters: int | None = Field(description="all parameters (= parameters_total)")
    warmup_steps: int | None
    world_size: int | None
    tokens: int | None = Field(description="predicted tokens trained on, all ranks")
    train_seconds: float | None
    tokens_per_s: float | None
    data: str | None = Field(description="the store trained on; None for online data")
    profile_seconds: dict[str, float] | None = Field(description="seconds per profiler phase")
    startup_cpu_seconds: float | None
    baselines: dict[str, float] | None = Field(description="the eval split's, in bits/token")
    parameters_total: int | None = Field(description="embeddings and head included")
    parameters_non_embedding: int | None = Field(description="the input embedding left out")
    n_train: int | None = Field(description="train rows of the store; None for online data")
    tokens_seen: int | None
    unique_tokens: int | None = Field(description="predicted tokens of the train prefix")
    unique_tokens_seen: int | None = Field(description="those of them read at least once")
    epochs: float | None
    flops_6nd: float | None
    flops_attention: float | None
    flops: float | None
    store_fingerprint: str | None

    @model_validator(mode="before")
    @classmethod
    def _migrate(cls, data: Any) -> Any:
        """Read a layout-1 summary (no `version`) as the current layout."""
        if not isinstance(data, dict) or "version" in data:
            return data
        old = dict(data)
        old.setdefault("parameters_total", old.get("parameters"))
        old.setdefault("tokens_seen", old.get("tokens"))
        seen, unique = old.get("tokens_seen"), old.get("unique_tokens")
        if isinstance(seen, int) and isinstance(unique, int):
            old.setdefault("unique_tokens_seen", min(seen, unique))
        known = cls.model_fields.keys() - {"version", "step", "test_loss"}
        return {"version": SUMMARY_VERSION, **{key: None for key in known}, **old}

    @model_validator(mode="after")
    def _known_version(self) -> RunSummary:
        if self.version > SUMMARY_VERSION:
            raise ValueError(
                f"summary version {self.version} is newer than this llama-train reads "
                f"({SUMMARY_VERSION}); upgrade llama-train"
            )
        return self

    def figures(self) -> dict[str, float | int]:
        """The finite numbers, by name (what `best --by` ranks and wandb's summary shows)."""
        return {
            key: value
            for key, value in self.model_dump(exclude={"version"}).items()
            if isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
        }

    def to_dict(self) -> dict[str, Any]:
        """The JSON mapping of summary.json (what `llama-train run --json` prints)."""
        return self.model_dump(mode="json")

    def write(self, run_dir: str | Path) -> Path:
        """Write `<run_dir>/summary.json` atomically."""
        return write_json(Path(run_dir) / SUMMARY_FILENAME, self.to_dict())


def read_summary(run_dir: str | Path) -> RunSummary | None:
    """A run's summary; None when it has none (not finished); a damaged one is one line."""
    path = Path(run_dir) / SUMMARY_FILENAME
    if not path.is_file():
        return None
    return read_record(path, RunSummary, "a run summary")


def sound_summary(run_dir: str | Path) -> RunSummary | None:
    """A run's summary, None when it has none or a damaged one.

    For readers that treat a damaged summary as no result (a run's state, a study's
    table, resuming a run): training writes it again from the last checkpoint.
    """
    try:
        return read_summary(run_dir)
    except LlamaTrainError:
        return None
