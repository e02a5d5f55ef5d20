"""One store written by a Slurm array: `gssm-data submit` and `gssm-data submit-scaling`.

Submission goes through submitit, as `llama-train submit` does (one Slurm stack):
the submitting process settles everything the tasks must agree on (the graph,
calibrated once when --target-bits asks, the store path, the sizes, the seed) as
one :class:`~gssm_data.generate.GenerateOptions`, saved as JSON in
``<store>.slurm/options.json``, and hands submitit one :class:`ShardTask` per
array task; submitit pickles them beside its sbatch script and the tasks' logs
in the same folder. Task k of N writes blocks i with i % N == k, and whichever
task writes the last block verifies the store, measures its entropy and
publishes it (:mod:`gssm_data.generate`). The tasks read nothing but that file,
so the bytes are those `gssm-data generate` writes on one machine; a failed
task is rerun by submitting again (finished blocks are kept), and a task
reaching its --time limit is requeued by submitit and resumes (as does one
that Slurm requeues itself, e.g. on preemption).

``submit-scaling`` does the same for every regime of a scaling recipe (one
array per regime, calibrating on the submitting machine) and queues one last
job, after all arrays succeed, that writes the recipe's index.

``--wait`` is not submitit's ``Job.wait``: that asks ``sacct``, which answers
nothing on clusters without accounting storage (the test cluster has none), so
a task killed before writing its result would be waited for forever. It polls
``squeue`` instead, which every cluster answers, and then reads each task's
result file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gssm_data.common.atomicfile import atomic_write
from gssm_data.common.slurm_jobs import require_commands, sbatch_errors, time_limit_minutes
from gssm_data.errors import GssmDataError
from gssm_data.generate import GenerateOptions, Shard, available_cpus, generate
from gssm_data.preflight import check_script_value
from gssm_data.store import open_store

if TYPE_CHECKING:
    import submitit

JOB_DIR_SUFFIX = ".slurm"
OPTIONS_FILENAME = "options.json"
# Requeues after reaching the time limit before a task gives up (then: submit again);
# preemptions do not count.
MAX_TIMEOUT_REQUEUES = 3
# Seconds between two `squeue` calls while --wait waits.
POLL_S = 5.0
# Job states (squeue %T) after which a task runs no more; PREEMPTED is not one of
# them: a preempted task is usually requeued (it is then listed again, pending).
ENDED_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "SPECIAL_EXIT",
        "REVOKED",
    }
)

Log = Callable[[str], None]


@dataclass(frozen=True)
class SlurmSettings:
    """Resources of each array task (sbatch options); None leaves the cluster's default."""

    partition: str | None = None
    time: str | None = None  # Slurm's spelling: 90, 1:30:00, 2-00:00:00
    cpus_per_task: int = 1  # also the task's writer processes
    mem: str | None = None
    account: str | None = None
    additional: dict[str, str] = field(default_factory=dict)  # more sbatch options

    def executor_parameters(self, *, job_name: str) -> dict[str, Any]:
        """Keyword arguments of submitit's SlurmExecutor.update_parameters.

        Every value is refused if it holds a control character: a newline would
        end the `#SBATCH` line and start a shell command, quoted or not. Without
        --time no limit is written (the cluster's default), which submitit only
        accepts as an explicit None.
        """
        if self.cpus_per_task < 1:
            raise GssmDataError("--cpus-per-task must be at least 1")
        check_script_value("job name", job_name)
        if self.time is not None:
            check_script_value("--time", self.time)
        parameters: dict[str, Any] = {
            "job_name": job_name,
            "cpus_per_task": self.cpus_per_task,
            "time": time_limit_minutes(self.time) if self.time is not None else None,
        }
        for key, value in (
            ("partition", self.partition),
            ("mem", self.mem),
            ("account", self.account),
        ):
            if value is not None:
                parameters[key] = check_script_value(f"--{key}", value).strip()
        additional: dict[str, Any] = {"requeue": True}  # submitit's requeue on time limit
        for key, value in self.additional.items():
            additional[check_script_value("sbatch option", key)] = check_script_value(
                "sbatch option", value
            )
        parameters["additional_parameters"] = additional
        return parameters


@dataclass(frozen=True)
class SubmittedStore:
    """A store handed to Slurm: the array's job id (None: already complete) and where things are."""

    path: Path
    job_id: str | None
    tasks: int
    job_dir: Path
    # submitit's Job of each task, in task order; out of the repr, as a Job's repr asks sacct.
    jobs: tuple[Any, ...] = field(default=(), repr=False)

    @property
    def log_pattern(self) -> Path:
        """The tasks' stdout logs (`.err` beside each): `<job>_<task>_0_log.out`."""
        return self.job_dir / f"{self.job_id}_*_log.out"


def job_dir(store: Path) -> Path:
    """Where a store's options, submitit's script and pickles and the task logs go."""
    return store.with_name(store.name + JOB_DIR_SUFFIX)


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
    if tasks < 1:
        raise GssmDataError("--tasks must be at least 1")
    folder = job_dir(options.out.absolute())
    # Every value that reaches the sbatch script is checked before anything is written.
    check_script_value("--out", str(folder))
    parameters = settings.executor_parameters(job_name=f"gssm-{options.name}")
    if _already_complete(options):
        say(f"{options.out} is already complete")
        return SubmittedStore(options.out, None, tasks, folder)
    # Every task may run at once, as in a plain array (submitit's default caps it at 256).
    executor = slurm_executor(folder, {**parameters, "array_parallelism": tasks})
    options_file = write_options(options, folder)
    limit_known = settings.time is not None
    shards = [
        ShardTask(options_file, Shard(index=k, count=tasks), limit_known=limit_known)
        for k in range(tasks)
    ]
    with sbatch_errors(not_found=_not_found):
        jobs = executor.submit_array(shards)
    job_id = array_id(jobs[0].job_id)
    if wait:
        say(f"submitted job {job_id}; waiting for its tasks to end")
        wait_for(jobs, job_id=job_id, folder=folder)
    return SubmittedStore(options.out, job_id, tasks, folder, tuple(jobs))


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


def array_id(job_id: str) -> str:
    """The array's job id from one task's (`41_3` -> `41`); a single job's id unchanged."""
    return job_id.split("_")[0]


# ---------------------------------------------------------------------------
# submitit


def slurm_executor(folder: Path, parameters: dict[str, Any]) -> submitit.SlurmExecutor:
    """A submitit executor writing to `folder`, or one line saying what is missing.

    sbatch and srun are looked for here: submitit would fail on a missing srun
    with a bare RuntimeError and on a missing sbatch only once the pickles exist.
    """
    try:
        import submitit
    except ImportError:
        raise GssmDataError("submitting needs submitit: pip install 'gssm-data[slurm]'") from None
    require_commands(("sbatch", "srun"), not_found=_not_found)
    check_script_value("python executable", sys.executable)
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=MAX_TIMEOUT_REQUEUES)
    executor.update_parameters(**parameters)
    return executor


def _not_found(command: str) -> str:
    return (
        f"{command} not found: submit from a Slurm login node, or run `gssm-data generate "
        "--shard k/N` in your own job array"
    )


def wait_for(jobs: Sequence[Any], *, job_id: str, folder: Path) -> None:
    """Return once every task of `job_id` has ended; a failed task is a one-line error.

    A task has ended when its result file exists or Slurm no longer lists it
    (a task killed by Slurm writes no result); a requeued task is listed again.
    """
    while not all(job.paths.result_pickle.exists() for job in jobs) and still_queued(job_id):
        time.sleep(POLL_S)
    failures = [
        f"task {index}: {problem}"
        for index, job in enumerate(jobs)
        if (problem := task_problem(job)) is not None
    ]
    if failures:
        more = f" and {len(failures) - 1} more" if len(failures) > 1 else ""
        raise GssmDataError(
            f"job {job_id} ended with a failed task ({failures[0]}{more}); see the logs in "
            f"{folder}, then submit again to finish the store"
        )


def still_queued(job_id: str) -> bool:
    """Whether Slurm still lists a task of `job_id` that has not ended.

    squeue lists a job given by id in every state until the controller forgets
    it; then the id is unknown, which also means it has ended. Any other squeue
    failure (a busy controller) is read as "still queued", to ask again.
    """
    try:
        answer = subprocess.run(
            ["squeue", "--noheader", "--format=%i %T", f"--jobs={job_id}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except FileNotFoundError:
        raise GssmDataError(_not_found("squeue")) from None
    except subprocess.TimeoutExpired:
        return True
    if answer.returncode != 0:
        return "invalid job id" not in answer.stderr.lower()
    states = [line.split()[-1] for line in answer.stdout.splitlines() if line.strip()]
    return any(state.upper() not in ENDED_STATES for state in states)


def task_problem(job: Any) -> str | None:
    """Why an ended task failed, in one line; None when it succeeded."""
    from submitit.core.utils import pickle_load

    path = Path(job.paths.result_pickle)
    if not path.exists():
        return "ended without a result (killed by Slurm?)"
    outcome, value = pickle_load(path)
    if outcome == "success":
        return None
    lines = [line.strip() for line in str(value).splitlines() if line.strip()]
    return lines[-1] if lines else "failed"


# ---------------------------------------------------------------------------
# What the tasks run (pickled by submitit, called on the node)


def _ignore_warning_signal(limit_known: bool) -> None:
    """Without a --time, submitit cannot tell a time limit from a preemption (it needs the
    limit as a number) and would fail on its warning signal; the task then ignores it and
    runs until Slurm stops it, as a plain sbatch task does. Only under Slurm."""
    if not limit_known and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)


@dataclass(frozen=True)
class ShardTask:
    """Array task k of N: write blocks i with i % N == k of the store in `options_file`.

    Checkpointable in submitit's sense: on its warning signal (the time limit is
    near) submitit requeues this same task, which skips the blocks already
    written.
    """

    options_file: Path
    shard: Shard
    limit_known: bool = True  # False: no --time, see _ignore_warning_signal

    def __call__(self) -> str:
        _ignore_warning_signal(self.limit_known)
        status = run_shard(self.options_file, self.shard)
        print(f"shard {self.shard}: {status}", flush=True)
        return status

    def checkpoint(self) -> Any:
        """What submitit requeues: this task again (written blocks are kept)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


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


@dataclass(frozen=True)
class IndexTask:
    """The job after a recipe's arrays: rerun the recipe, which finds its stores complete
    and its alphas recorded, and writes index-<scale>.json."""

    recipe: Path
    scale: str
    out_dir: Path
    regimes: tuple[str, ...] | None = None
    limit_known: bool = True

    def __call__(self) -> Path:
        from gssm_data.scaling import materialise

        _ignore_warning_signal(self.limit_known)
        results = materialise(
            self.recipe,
            scale=self.scale,
            out_dir=self.out_dir,
            log=print,
            regimes=list(self.regimes) if self.regimes is not None else None,
        )
        print(f"index of {len(results)} regime(s) written to {self.out_dir}", flush=True)
        return index_path(self.recipe, scale=self.scale, out_dir=self.out_dir)


# ---------------------------------------------------------------------------
# Scaling recipes


@dataclass(frozen=True)
class SubmittedRecipe:
    """One array per regime whose store is not complete, and the job writing the index."""

    stores: list[SubmittedStore]
    index_job_id: str
    index_dir: Path  # submitit's files and the index job's logs
    index_job: Any = field(default=None, repr=False)


def index_path(recipe_path: Path, *, scale: str, out_dir: Path) -> Path:
    return out_dir / recipe_path.stem / f"index-{scale}.json"


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
    calibrations.json; submitit and Slurm are checked before it starts.
    """
    from gssm_data.scaling import plan_stores

    say = log or (lambda message: None)
    settings.executor_parameters(job_name="gssm")  # every value checked before any work
    check_script_value("--scale", scale)
    check_script_value("recipe name", recipe_path.stem)
    folder = (out_dir / recipe_path.stem / f"index-{scale}{JOB_DIR_SUFFIX}").absolute()
    check_script_value("--out-dir", str(folder))
    one_cpu = SlurmSettings(
        partition=settings.partition, time=settings.time, account=settings.account
    )
    index_executor = slurm_executor(
        folder, one_cpu.executor_parameters(job_name=f"gssm-index-{scale}")
    )
    planned_stores = plan_stores(
        recipe_path, scale=scale, out_dir=out_dir, log=say, regimes=regimes
    )
    stores = [
        submit_generate(planned.options, tasks=tasks, settings=settings, log=say)
        for planned in planned_stores
    ]
    queued = [store.job_id for store in stores if store.job_id]
    if queued:
        after = SlurmSettings(
            partition=settings.partition,
            time=settings.time,
            account=settings.account,
            additional={"dependency": "afterok:" + ":".join(queued), "kill_on_invalid_dep": "yes"},
        )
        index_executor.update_parameters(
            **after.executor_parameters(job_name=f"gssm-index-{scale}")
        )
    task = IndexTask(
        recipe_path.absolute(),
        scale,
        out_dir.absolute(),
        tuple(regimes) if regimes is not None else None,
        limit_known=settings.time is not None,
    )
    with sbatch_errors(not_found=_not_found):
        job = index_executor.submit(task)
    return SubmittedRecipe(stores, str(job.job_id), folder, job)
