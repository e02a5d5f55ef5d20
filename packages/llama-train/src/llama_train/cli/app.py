"""The `llama-train` typer app, its consoles, and the one place user errors are reported.

A leaf: the command modules (`cli/run.py`, `cli/results.py`, `cli/submit.py`)
import it and register their commands; `llama_train.cli` imports them. User
errors of either package (a bad config, a missing store, a NaN loss) print one
`error:` block (one line per problem) on stderr and exit 1; never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from gssm_data import GssmDataError
from llama_train.errors import LlamaTrainError

app = typer.Typer(
    name="llama-train",
    help="Train Llama-style models on gssm-data stores and measure them against the exact entropy.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        from gssm_data.common.version import package_version

        typer.echo(
            f"llama-train {package_version('llama-train')} "
            f"(gssm-data {package_version('gssm-data')})"
        )
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
    """Train Llama-style models on gssm-data stores and measure them against the exact entropy."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the packages' user errors into a short message and exit code 1."""
    try:
        yield
    except (LlamaTrainError, GssmDataError) as error:
        # Another rank failed first and printed its own error (distributed.OtherRankFailed).
        if not getattr(error, "reported_elsewhere", False):
            err_console.print(
                f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True
            )
        raise typer.Exit(1) from None
    except OSError as error:
        if error.errno not in ENVIRONMENT_ERRORS:
            raise  # not a fault of the disk or of a path the user gave: a bug to report
        err_console.print(
            f"[bold red]error:[/] {escape(cannot_write(error))}", highlight=False, soft_wrap=True
        )
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print("interrupted; run the same command again to resume", highlight=False)
        raise typer.Exit(130) from None


# A full disk or a path that cannot be written (an output option, a run directory): every
# writer is atomic (a temporary file renamed into place), so nothing half-written is left
# under the final name, and the same command resumes once the cause is gone.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
ENVIRONMENT_ERRORS = frozenset(
    {
        *DISK_FULL,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.EISDIR,
        errno.ENOTDIR,
        errno.ENOENT,
        errno.ENAMETOOLONG,
        errno.EEXIST,
    }
)


def cannot_write(error: OSError) -> str:
    """One line for an OSError of the environment: the file, the reason, what to do."""
    where = f"{error.filename}: " if error.filename else ""
    reason = error.strerror or str(error)
    if error.errno in DISK_FULL:
        return f"{where}{reason}; free some space and run the same command again"
    return f"{where}{reason}"
