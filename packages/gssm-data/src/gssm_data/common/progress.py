"""Progress for people and for log files: a rich bar on a terminal, periodic lines elsewhere.

A rich bar redraws itself in place, which only makes sense on a terminal. A
Slurm log or a CI job captures stderr in a file, where a bar is either
silent or thousands of carriage returns; there, the same progress object
prints one plain, timestamped line every `every` seconds instead::

    12:04:31 writing blocks 4096/2441406 blocks 1.2M tok/s 0:00:30 ETA 1:52:10

Callers build their columns as for any rich Progress and call
:func:`progress_display` instead of ``Progress(...)``; both packages use it
(llama-train imports it, never the reverse). The interval is the
``GSSM_PROGRESS_EVERY`` environment variable (seconds, default 30) unless the
caller passes one.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any, Literal

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TaskID
from rich.text import Text

Mode = Literal["bar", "lines", "off"]
EVERY_VARIABLE = "GSSM_PROGRESS_EVERY"
DEFAULT_EVERY_S = 30.0


def progress_mode(quiet: bool = False, stream: IO[str] | None = None) -> Mode:
    """`bar` on a terminal, `lines` when the stream is a file or a pipe, `off` when quiet."""
    if quiet:
        return "off"
    stream = sys.stderr if stream is None else stream
    return "bar" if stream.isatty() else "lines"


def default_every() -> float:
    """Seconds between progress lines: $GSSM_PROGRESS_EVERY, else 30 (bad values: the default)."""
    try:
        every = float(os.environ.get(EVERY_VARIABLE, DEFAULT_EVERY_S))
    except ValueError:
        return DEFAULT_EVERY_S
    return every if every > 0 else DEFAULT_EVERY_S


class PeriodicProgress(Progress):
    """A rich Progress that draws nothing live and prints a line per task every `every` seconds.

    Tasks, fields, speed and ETA are tracked by rich exactly as for a bar; the
    line is the task's columns rendered as text, bar columns left out. Short
    work (under `every` seconds) prints nothing; work that printed at least one
    line prints a last one when it stops, so a log always shows where it ended.
    """

    def __init__(self, *columns: str | ProgressColumn, every: float, **kwargs: Any) -> None:
        kwargs["disable"] = True  # no live display; the lines are printed by hand
        kwargs.pop("transient", None)
        super().__init__(*columns, **kwargs)
        self.every = every
        self._started = self._last_line = time.monotonic()
        self._printed = False
        self._last_text: dict[TaskID, str] = {}

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_print()

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._maybe_print()

    def stop(self) -> None:
        if self._printed:
            self.print_lines()
        super().stop()

    def _maybe_print(self) -> None:
        if time.monotonic() - self._last_line >= self.every:
            self.print_lines()

    def print_lines(self) -> None:
        """Print every visible task's line now, unless it reads as the one printed last."""
        self._last_line = time.monotonic()
        self._printed = True
        stamp = time.strftime("%H:%M:%S")
        for task in self.tasks:
            line = self.line(task)
            if task.visible and self._last_text.get(task.id) != line:
                self._last_text[task.id] = line
                self.console.print(f"{stamp} {line}", highlight=False, soft_wrap=True)

    def line(self, task: Any) -> str:
        """The task's columns as plain text (no bar)."""
        parts = []
        for column in self.columns:
            if isinstance(column, BarColumn):
                continue
            if isinstance(column, str):
                parts.append(column.format(task=task))
                continue
            rendered = column(task)
            text = rendered.plain if isinstance(rendered, Text) else str(rendered)
            if text.strip():
                parts.append(text.strip())
        return " ".join(parts)


def progress_display(
    *columns: str | ProgressColumn,
    mode: Mode,
    every: float | None = None,
    console: Console | None = None,
    transient: bool = False,
) -> Progress:
    """A rich Progress with these columns: a live bar, periodic lines, or nothing (`mode`)."""
    console = console or Console(stderr=True)
    if mode == "lines":
        return PeriodicProgress(
            *columns, every=default_every() if every is None else every, console=console
        )
    return Progress(*columns, console=console, transient=transient, disable=mode == "off")


def as_mode(show: bool | Mode) -> Mode:
    """A mode from the `show_progress` flag of the library functions (True: decide by stderr)."""
    if show is True:
        return progress_mode()
    if show is False:
        return "off"
    return show
