"""The typer application and its one place for user errors.

Commands live in sibling modules (``data``: generate/info/verify/presets;
``entropy``: entropy/calibrate/scaling; ``slurm``: submit) and register themselves
on ``app`` when ``gssm_data.cli`` imports them; this module imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from gssm_data.common.version import package_version

app = typer.Typer(
    name="gssm-data",
    help="Materialise, inspect and verify datasets of graph-structured sequential models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"gssm-data {package_version('gssm-data')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Materialise, inspect and verify datasets of graph-structured sequential models."""


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one clear line on stderr; return the Exit to raise (``raise fail(...)``).

    The message is escaped: a path or `pip install 'pkg[extra]'` is text, not markup."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def progress_wanted(quiet: bool) -> bool:
    """Progress unless --quiet: a bar on a terminal, else a line every $GSSM_PROGRESS_EVERY s."""
    return not quiet


def say(quiet: bool) -> Callable[[str], None]:
    """A printer of messages on stderr (stdout carries results), silenced by --quiet."""

    def print_message(message: str) -> None:
        if not quiet:
            err_console.print(message, highlight=False, soft_wrap=True)

    return print_message
