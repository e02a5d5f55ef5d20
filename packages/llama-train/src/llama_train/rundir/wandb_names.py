"""A run's name and group on wandb, from its name: shared by live logging and wandb-sync."""

from __future__ import annotations


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
