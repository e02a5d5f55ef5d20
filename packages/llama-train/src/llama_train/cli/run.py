"""`llama-train run` (train or resume, one process or `--nproc N`) and `config-schema`.

Thin commands over :func:`llama_train.recipe.train_config.resolve_config` and
:func:`llama_train.recipe.train.train`; the recipe is imported inside the commands so
`llama-train --help` does not load torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from llama_train.cli.app import app, console, err_console, user_errors
from llama_train.cli.tables import summary_table
from llama_train.errors import LlamaTrainError
from llama_train.rundir import RunSummary

if TYPE_CHECKING:
    from llama_train.recipe.train_config import TrainConfig


@app.command("run")
def run_command(
    config: Annotated[Path, typer.Argument(help="Training config (YAML).")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="key.sub=value overrides, e.g. optim.lr=3e-4 model.n_layers=2."),
    ] = None,
    nproc: Annotated[
        int | None,
        typer.Option(
            "--nproc",
            min=1,
            help="Start N processes on this machine through torchrun (standalone rendezvous): "
            "one per GPU, or N one-thread CPU processes. Global batch = data.batch_size x "
            "train.grad_accum x N. Leave it out under torchrun or srun.",
        ),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="End with the summary as one JSON line on stdout (summary.json plus run_dir) "
            "instead of the table: for scripts and job logs.",
        ),
    ] = False,
) -> None:
    """Train (or resume: the same command again continues from the latest checkpoint).

    Precedence: defaults < CONFIG < overrides. The run directory (run.dir)
    receives config.yaml, metrics.jsonl, checkpoints/, eval/ and summary.json.
    On SIGUSR1 or SIGTERM the run checkpoints at the next step, says where,
    and exits with code 3; the same command resumes it. Works unchanged as
    every rank of `torchrun -m llama_train run ...`.
    """
    from llama_train.core.distributed import PREEMPTED_EXIT_CODE, rank_info
    from llama_train.recipe.train_config import resolve_config

    if nproc is not None and nproc > 1:
        _launch(nproc, config, overrides or [], ["--json"] if as_json else [])
    from llama_train.recipe.train import Preempted, train

    with user_errors():
        is_main = rank_info().is_main
        resolved = _named(resolve_config(config, overrides or []), overrides or [])
        try:
            summary = train(resolved)
        except Preempted as preempted:
            if is_main:
                err_console.print(str(preempted), highlight=False, soft_wrap=True)
            raise typer.Exit(PREEMPTED_EXIT_CODE) from None
    if is_main and as_json:
        sys.stdout.write(json.dumps({**summary, "run_dir": str(resolved.run_dir)}) + "\n")
    elif is_main:
        console.print(summary_table(RunSummary.model_validate(summary)))
        console.print(f"run directory: {resolved.run_dir}", highlight=False)


def _named(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Give the wandb run the command line's overrides as its name unless one is set."""
    from llama_train.core.run_identity import command_line_name

    wandb = config.logging.wandb
    name = command_line_name(config.run.name, overrides)
    if wandb.name is not None or name is None:
        return config
    logging = config.logging.model_copy(update={"wandb": wandb.model_copy(update={"name": name})})
    return config.model_copy(update={"logging": logging})


def _launch(nproc: int, config: Path, overrides: list[str], flags: list[str]) -> None:
    """`run --nproc N`: check the config once here, then start N ranks; exit with their code."""
    from llama_train.core.distributed import rank_info
    from llama_train.launch.torchrun import launch_torchrun
    from llama_train.recipe.train_config import resolve_config

    with user_errors():
        if rank_info().distributed:
            raise LlamaTrainError(
                "--nproc starts torchrun itself; this process is already one rank of a "
                "launched job, so leave --nproc out"
            )
        resolve_config(config, overrides)  # fails once, not in every rank
        code = launch_torchrun(nproc, ["run", *flags, str(config), *overrides])
    raise typer.Exit(code)


@app.command("config-schema")
def config_schema_command() -> None:
    """Print the JSON schema of the training config (every section, key and default)."""
    from llama_train.recipe.train_config import config_schema

    sys.stdout.write(json.dumps(config_schema(), indent=2) + "\n")
