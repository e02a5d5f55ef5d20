"""Command-line interface (`gssm-data`).

`app` (cli/app.py) is a leaf; importing the command modules here registers their
commands on it, so `gssm_data.cli.app` and `gssm_data.cli:main` see every command.
"""

from __future__ import annotations

import sys

from gssm_data.cli import data, entropy, extend, posterior, slurm  # noqa: F401  (register)
from gssm_data.cli.app import app, err_console
from gssm_data.errors import GssmDataError

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point: user errors become one line and exit code 1."""
    try:
        app()
    except GssmDataError as error:
        err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(1)
