"""One store written by a Slurm array: `gssm-data submit` and `gssm-data submit-scaling`.

The submitting process settles everything the tasks must agree on (the graph,
calibrated once when --target-bits asks, the store path, the sizes, the seed)
as one :class:`~gssm_data.generate.GenerateOptions`, saved as JSON in
``<store>.slurm/options.json`` beside an sbatch script and the tasks' logs. Array
task k of N runs ``python -m gssm_data.slurm shard options.json --shard k/N``:
it writes blocks i with i % N == k, and whichever task writes the last block
verifies the store, measures its entropy and publishes it
(:mod:`gssm_data.generate`). The tasks read nothing but that file, so the bytes
are those `gssm-data generate` writes on one machine; a failed task is rerun by
submitting again (finished blocks are kept).

``submit-scaling`` does the same for every regime of a scaling recipe (one
array per regime, calibrating on the submitting machine) and queues one last
job, after all arrays succeed, that writes the recipe's index.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gssm_data.atomicfile import atomic_write
from gssm_data.errors import GssmDataError
from gssm_data.generate import GenerateOptions, Shard, available_cpus, generate
from gssm_data.preflight import check_script_value
from gssm_data.store import open_store

JOB_DIR_SUFFIX = ".slurm"
OPTIONS_FILENAME = "options.json"
SCRIPT_FILENAME = "generate.sbatch"

Log = Callable[[str], None]


@dataclass(frozen=True)
class SlurmSettings:
    """Resources of each array task (sbatch options); None leaves the cluster's default."""

    partition: str | None = None
    time: str | None = None  # Slurm's spelling: 90, 1:30:00, 2-00:00:00
    cpus_per_task: int = 1  # also the task's writer processes
    mem: str | None = None
    account: str | None = None
    extra: tuple[str, ...] = field(default_factory=tuple)  # more sbatch options, verbatim

    def sbatch_options(self) -> list[str]:
        """The options as `--key=value` lines of an sbatch script.

        Every value is refused if it holds a control character: a newline would
        end the `#SBATCH` line and start a shell command, quoted or not.
        """
        if self.cpus_per_task < 1:
            raise GssmDataError("--cpus-per-task must be at least 1")
        if self.time is not None and not re.fullmatch(r"[0-9:-]+", self.time.strip()):
            raise GssmDataError(f"--time {self.time!r}: write 90, 1:30:00 or 2-00:00:00")
        options = [f"--cpus-per-task={self.cpus_per_task}"]
        for key, value in (
            ("partition", self.partition),
            ("time", self.time),
            ("mem", self.mem),
            ("account", self.account),
        ):
            if value is not None:
                check_script_value(f"--{key}", value)
                options.append(f"--{key}={shlex.quote(value.strip())}")
        extra = [check_script_value("sbatch option", option) for option in self.extra]
        return [*options, *extra]


@dataclass(frozen=True)
class SubmittedStore:
    """A store handed to Slurm: the array's job id (None: already complete) and where things are."""

    path: Path
    job_id: str | None
    tasks: int
    job_dir: Path

    @property
    def log_pattern(self) -> Path:
        return self.job_dir / "%A_%a.out"


def job_dir(store: Path) -> Path:
    """Where a store's options, sbatch script and task logs go: `<store>.slurm/`."""
    return store.with_name(store.name + JOB_DIR_SUFFIX)


def array_script(
    options_file: Path,
    *,
    tasks: int,
    settings: SlurmSettings,
    job_name: str,
    python: str | None = None,
) -> str:
    """The sbatch script of an N-task array writing the store of `options_file`."""
    if tasks < 1:
        raise GssmDataError("--tasks must be at least 1")
    check_script_value("--out", str(options_file))
    check_script_value("job name", job_name)
    check_script_value("python executable", python or sys.executable)
    folder = options_file.parent
    directives = [
        f"--job-name={shlex.quote(job_name)}",
        f"--array=0-{tasks - 1}",
        f"--output={shlex.quote(str(folder / '%A_%a.out'))}",
        "--open-mode=append",
        *settings.sbatch_options(),
    ]
    command = [python or sys.executable, "-m", "gssm_data.slurm", "shard", str(options_file)]
    shard = f'--shard "$SLURM_ARRAY_TASK_ID/{tasks}"'  # expanded by bash in each task
    return "\n".join(
        [
            "#!/bin/bash",
            "# Written by `gssm-data submit`: array task k of N writes blocks i with",
            "# i % N == k of one store; the task that writes the last block verifies",
            "# the store, measures its entropy and publishes it.",
            *(f"#SBATCH {directive}" for directive in directives),
            "set -euo pipefail",
            f"exec {shlex.join(command)} {shard}",
            "",
        ]
    )


def submit_generate(
    options: GenerateOptions,
    *,
    tasks: int,
    settings: SlurmSettings,
    wait: bool = False,
    log: Log | None = None,
) -> SubmittedStore:
    """Queue an array of `tasks` tasks writing `options.out`; nothing when it is complete."""
    say = log or (lambda message: None)
    if options.force:
        raise GssmDataError(
            "--force cannot be combined with Slurm tasks; delete the store (and its .partial) "
            "first, then submit"
        )
    folder = job_dir(options.out.absolute())
    # The script text is built (and every value in it checked) before anything is written.
    text = array_script(
        folder / OPTIONS_FILENAME, tasks=tasks, settings=settings, job_name=f"gssm-{options.name}"
    )
    if _already_complete(options):
        say(f"{options.out} is already complete")
        return SubmittedStore(options.out, None, tasks, folder)
    write_options(options, folder)
    script = folder / SCRIPT_FILENAME
    script.write_text(text)
    job_id = sbatch(script, wait=wait, log=say)
    return SubmittedStore(options.out, job_id, tasks, folder)


def write_options(options: GenerateOptions, folder: Path) -> Path:
    """Save the options every task reads (absolute store path: tasks may start elsewhere)."""
    folder.mkdir(parents=True, exist_ok=True)
    settled = options.model_copy(update={"out": options.out.absolute(), "shard": None})
    return atomic_write(folder / OPTIONS_FILENAME, settled.model_dump_json(indent=1))


def _already_complete(options: GenerateOptions) -> bool:
    """True when `out` is this very store, complete; an error when it holds another."""
    if not options.out.exists():
        return False
    store = open_store(options.out, allow_incomplete=True)
    manifest = store.manifest
    same = manifest.fingerprint == options.fingerprint and {
        split: info.n for split, info in manifest.splits.items()
    } == {"train": options.n_train, "test": options.n_test}
    if not same:
        raise GssmDataError(
            f"{options.out} holds another store (fingerprint {manifest.fingerprint}); "
            "choose another --out or delete it"
        )
    return manifest.complete


def sbatch(
    script: Path,
    *,
    wait: bool = False,
    dependency: str | None = None,
    log: Log | None = None,
) -> str:
    """Submit `script`; return the job id. With `wait`, return once every task has ended."""
    command = ["sbatch", "--parsable"]
    if dependency:
        command += [f"--dependency={dependency}", "--kill-on-invalid-dep=yes"]
    if wait:
        command.append("--wait")
    command.append(str(script))
    try:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    except FileNotFoundError:
        raise GssmDataError(
            "sbatch not found: submit from a Slurm login node, or run `gssm-data generate "
            "--shard k/N` in your own job array"
        ) from None
    assert process.stdout is not None and process.stderr is not None
    first = process.stdout.readline().strip()  # --parsable: "id" or "id;cluster"
    job_id = first.split(";")[0]
    if job_id and wait and log is not None:
        log(f"submitted job {job_id}; waiting for its tasks to end")
    rest, errors = process.communicate()
    if not job_id:
        raise GssmDataError(f"sbatch failed: {errors.strip() or rest.strip() or 'no job id'}")
    if process.returncode != 0 and wait:
        raise GssmDataError(
            f"job {job_id} ended with a failed task (exit {process.returncode}); see the logs in "
            f"{script.parent}, then submit again to finish the store"
        )
    return job_id


# ---------------------------------------------------------------------------
# Scaling recipes


@dataclass(frozen=True)
class SubmittedRecipe:
    """One array per regime whose store is not complete, and the job writing the index."""

    stores: list[SubmittedStore]
    index_job_id: str | None
    index_script: Path


def submit_scaling(
    recipe_path: Path,
    *,
    scale: str,
    out_dir: Path,
    tasks: int,
    settings: SlurmSettings,
    log: Log | None = None,
    regimes: Sequence[str] | None = None,
) -> SubmittedRecipe:
    """Queue every store of a recipe's scale (or of its named `regimes`), then the index job
    (after all of them succeed).

    Calibration runs here, once per regime, and is recorded in the recipe's
    calibrations.json; the index job reruns the recipe, which finds the stores
    complete and the alphas recorded, and writes index-<scale>.json.
    """
    from gssm_data.scaling import plan_stores

    say = log or (lambda message: None)
    settings.sbatch_options()  # every value checked before any job is queued
    text = index_script(
        recipe_path, scale=scale, out_dir=out_dir, settings=settings, regimes=regimes
    )
    planned_stores = plan_stores(
        recipe_path, scale=scale, out_dir=out_dir, log=say, regimes=regimes
    )
    stores = [
        submit_generate(planned.options, tasks=tasks, settings=settings, log=say)
        for planned in planned_stores
    ]
    script = out_dir / recipe_path.stem / f"index-{scale}.sbatch"
    script.write_text(text)
    queued = [store.job_id for store in stores if store.job_id]
    dependency = "afterok:" + ":".join(queued) if queued else None
    index_job = sbatch(script, dependency=dependency)
    return SubmittedRecipe(stores, index_job, script)


def index_script(
    recipe_path: Path,
    *,
    scale: str,
    out_dir: Path,
    settings: SlurmSettings,
    regimes: Sequence[str] | None = None,
) -> str:
    """The sbatch script of the job that writes a recipe's index once its stores exist."""
    check_script_value("recipe path", str(recipe_path.absolute()))
    for name in regimes or ():
        check_script_value("--regimes", name)
    check_script_value("--scale", scale)
    check_script_value("--out-dir", str(out_dir.absolute()))
    check_script_value("python executable", sys.executable)
    one_cpu = SlurmSettings(
        partition=settings.partition, time=settings.time, account=settings.account
    )
    command = [
        sys.executable,
        "-m",
        "gssm_data.slurm",
        "index",
        str(recipe_path.absolute()),
        "--scale",
        scale,
        "--out-dir",
        str(out_dir.absolute()),
        *(["--regimes", ",".join(regimes)] if regimes is not None else []),
    ]
    folder = (out_dir / recipe_path.stem).absolute()
    return "\n".join(
        [
            "#!/bin/bash",
            "# Written by `gssm-data submit-scaling`: the index of the recipe's stores.",
            f"#SBATCH --job-name=gssm-index-{scale}",
            f"#SBATCH --output={shlex.quote(str(folder / f'index-{scale}-%j.out'))}",
            *(f"#SBATCH {option}" for option in one_cpu.sbatch_options()),
            "set -euo pipefail",
            f"exec {shlex.join(command)}",
            "",
        ]
    )


# ---------------------------------------------------------------------------
# What the tasks run (python -m gssm_data.slurm ...)


def run_shard(options_file: Path, shard: Shard, *, workers: int | None = None) -> str:
    """Write one task's blocks of the store in `options_file`; return generate's status."""
    try:
        options = GenerateOptions.model_validate_json(Path(options_file).read_text())
    except OSError as error:
        raise GssmDataError(f"cannot read {options_file}: {error.strerror or error}") from None
    workers = workers or int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or available_cpus()
    task = options.model_copy(update={"shard": shard, "workers": workers})
    result = generate(task, log=print)
    return result.status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the array tasks and of the index job; user errors are one line."""
    parser = argparse.ArgumentParser(prog="python -m gssm_data.slurm")
    commands = parser.add_subparsers(dest="command", required=True)
    shard = commands.add_parser("shard", help="write task k/N's blocks of a store")
    shard.add_argument("options", type=Path)
    shard.add_argument("--shard", required=True)
    shard.add_argument("--workers", type=int, default=None)
    index = commands.add_parser("index", help="write a scaling recipe's index")
    index.add_argument("recipe", type=Path)
    index.add_argument("--scale", required=True)
    index.add_argument("--out-dir", type=Path, required=True)
    index.add_argument("--regimes", default=None, help="comma-separated regime names")
    arguments = parser.parse_args(argv)
    try:
        if arguments.command == "shard":
            status = run_shard(
                arguments.options, Shard.parse(arguments.shard), workers=arguments.workers
            )
            print(f"shard {arguments.shard}: {status}")
        else:
            from gssm_data.scaling import materialise

            names = arguments.regimes.split(",") if arguments.regimes is not None else None
            results = materialise(
                arguments.recipe,
                scale=arguments.scale,
                out_dir=arguments.out_dir,
                log=print,
                regimes=names,
            )
            print(f"index of {len(results)} regime(s) written to {arguments.out_dir}")
    except GssmDataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
