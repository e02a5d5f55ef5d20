"""What a run is called on wandb, and what wandb-sync has sent: shared by live logging
and `llama-train wandb-sync`.

A sweep point's `run.name` is `<sweep>/<overrides>`, so on wandb its name is the
overrides that make it different (`optim.lr=0.001`) and its group the sweep; a plain
run keeps its name. `wandb_sync.json` records, per mode, the last step sent, so a
second sync sends only what is new.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from llama_train.rundir.files import CONFIG_FILENAME, read_record, write_json
from llama_train.rundir.yaml_file import load_yaml

SYNC_FILENAME = "wandb_sync.json"


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


class WandbSettings(BaseModel):
    """The part of a run's config.yaml that says how it is shown on wandb.

    The config as a whole belongs to the recipe's `TrainConfig`; readers of finished
    runs (no torch) need only these keys, so they read them here, typed.
    """

    model_config = ConfigDict(extra="forbid")

    config: dict[str, Any] = {}  # the whole config.yaml, as the wandb run config
    run_name: str | None = None
    name: str | None = None
    project: str | None = None
    entity: str | None = None


def read_wandb_settings(run_dir: str | Path) -> WandbSettings:
    """The run's name and logging.wandb settings from its config.yaml (none: all unset)."""
    path = Path(run_dir) / CONFIG_FILENAME
    config = load_yaml(path) if path.is_file() else {}
    run = config.get("run") if isinstance(config.get("run"), dict) else {}
    logging = config.get("logging") if isinstance(config.get("logging"), dict) else {}
    wandb = logging.get("wandb") if isinstance(logging.get("wandb"), dict) else {}

    def text(value: object) -> str | None:
        return value if isinstance(value, str) and value else None

    return WandbSettings(
        config=config,
        run_name=text(run.get("name")),
        name=text(wandb.get("name")),
        project=text(wandb.get("project")),
        entity=text(wandb.get("entity")),
    )


class SentSteps(BaseModel):
    model_config = ConfigDict(extra="forbid")

    last_step: int | None = None


class SyncState(BaseModel):
    """`wandb_sync.json`: the wandb run id synced to and, per mode, the last step sent."""

    model_config = ConfigDict(extra="forbid")

    run_id: str | None = None
    online: SentSteps | None = None
    offline: SentSteps | None = None

    def sent_before(self, run_id: str, mode: str) -> int | None:
        """The last step sent to `run_id` in `mode`; None if nothing (or another run)."""
        sent = getattr(self, mode) if self.run_id == run_id else None
        return sent.last_step if sent is not None else None

    def write(self, run_dir: str | Path) -> Path:
        return write_json(Path(run_dir) / SYNC_FILENAME, self.model_dump(mode="json"))


def read_sync_state(run_dir: str | Path) -> SyncState:
    """What was synced from a run directory; nothing yet when the file is absent."""
    path = Path(run_dir) / SYNC_FILENAME
    if not path.is_file():
        return SyncState()
    return read_record(path, SyncState, "a wandb-sync record")
