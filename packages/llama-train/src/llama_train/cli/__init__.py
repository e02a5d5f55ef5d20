"""Command-line interface (`llama-train`, also `python -m llama_train`).

`app` (cli/app.py) is a leaf; importing the command modules here registers their
commands on it: `run` and `config-schema` (cli/run.py), `eval` and `plot`
(cli/results.py), `generate` (cli/generate.py), `submit`, `sweep-status` and `best`
(cli/submit.py), `export` (cli/export.py), `probe` (cli/probe.py), `study` and `fit`
(cli/study.py), `wandb-sync` and `report` (cli/observe.py); cli/tables.py holds the
tables they print.
"""

from __future__ import annotations

# isort: off
# Imported for their commands, registered on `app` in the order `--help` lists them.
from llama_train.cli import run  # noqa: F401
from llama_train.cli import results  # noqa: F401
from llama_train.cli import generate  # noqa: F401
from llama_train.cli import submit  # noqa: F401
from llama_train.cli import export  # noqa: F401
from llama_train.cli import probe  # noqa: F401
from llama_train.cli import study  # noqa: F401
from llama_train.cli import observe  # noqa: F401

# isort: on
from llama_train.cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    app()
