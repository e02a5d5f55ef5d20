"""Config strings that may reach a generated shell script: no control characters.

`llama-train submit` writes run.dir, run.name and every `slurm.*` value into an
sbatch script (through submitit). A newline there starts a new shell line,
whatever quoting is applied afterwards (`#SBATCH` directives are not quoted at
all), and a NUL or carriage return garbles the script; so a value holding any
control character (C0, DEL, C1, or Unicode's line and paragraph separators) is
refused where the config is validated, with the key in the message.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def control_character(text: str) -> str | None:
    """The first control character of `text`, spelled visibly (e.g. '\\n'), or None."""
    match = _CONTROL.search(text)
    return None if match is None else repr(match.group())[1:-1]


def visible(text: str) -> str:
    """`text` with each control character spelled as an escape, for one-line messages."""
    return _CONTROL.sub(lambda match: repr(match.group())[1:-1], text)


def _plain(value: str) -> str:
    found = control_character(value)
    if found is not None:
        raise ValueError(
            f"contains the control character {found}, which would break the generated job script"
        )
    return value


def _plain_path(value: Path) -> Path:
    _plain(str(value))
    return value


PlainStr = Annotated[str, AfterValidator(_plain)]
"""A string without control characters (validated by pydantic)."""

PlainPath = Annotated[Path, AfterValidator(_plain_path)]
"""A path without control characters (validated by pydantic)."""


def _plain_scalar(value: str | int | bool) -> str | int | bool:
    return _plain(value) if isinstance(value, str) else value


PlainScalar = Annotated[str | int | bool, AfterValidator(_plain_scalar)]
"""A string without control characters, an integer or a boolean (one error, not three)."""
