"""The typer application and its one place for user errors.

Commands live in sibling modules (``data``: generate/info/verify/presets;
``entropy``: entropy/calibrate/scaling) and register themselves on ``app``.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from gssm_data.errors import GssmDataError

app = typer.Typer(
    name="gssm-data",
    help="Materialise, inspect and verify datasets of graph-structured sequential models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one clear line on stderr; return the Exit to raise (``raise fail(...)``)."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def main() -> None:
    """Console-script entry point: user errors become one line and exit code 1."""
    from gssm_data.cli import data, entropy  # noqa: F401  (register commands)

    try:
        app()
    except GssmDataError as error:
        err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(1)
