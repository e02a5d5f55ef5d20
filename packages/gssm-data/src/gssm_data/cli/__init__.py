"""Command-line interface (`gssm-data`).

`app` (cli/app.py) is a leaf; importing the command modules here registers their
commands on it, so `gssm_data.cli.app` and `gssm_data.cli:main` see every command.
"""

from __future__ import annotations

import sys

from gssm_data.cli import data, entropy, extend, posterior, slurm  # noqa: F401  (register)
from gssm_data.cli.app import app, fail
from gssm_data.errors import GssmDataError

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point: user errors become one line and exit code 1."""
    try:
        app()
    except GssmDataError as error:
        sys.exit(fail(str(error)).exit_code)
