"""Command-line interface (`gssm-data`)."""

from gssm_data.cli import data, entropy, slurm  # noqa: F401  (register commands on app)
from gssm_data.cli.app import app, main

__all__ = ["app", "main"]
