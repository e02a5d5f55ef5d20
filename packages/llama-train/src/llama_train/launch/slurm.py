"""Slurm through submitit: the job wrapper, requeue on preemption, submission.

``llama-train submit CONFIG`` resolves the config where it is typed (so a typo fails
at once, not in the queue), wraps it in a :class:`TrainJob` and hands that to
submitit, which writes the sbatch script, the pickled job and the logs to
``<run.dir>/slurm/`` (``slurm.log_dir``). A sweep is one array job of TrainJobs
(:mod:`llama_train.launch.sweep`).

Multi-GPU nodes run one task per GPU (``ntasks_per_node = gpus_per_node``): srun
starts every task, each runs the trainer, and :func:`llama_train.core.distributed.rank_info`
reads its rank from srun's variables; the wrapper only adds MASTER_ADDR and
MASTER_PORT, which srun does not set, for the process group.

Preemption, as lingua's stool.py does it: Slurm is asked to send SIGUSR1
``signal_delay_s`` seconds before the time limit (``--signal=USR1@120``, and
``--requeue``); the trainer checkpoints on SIGUSR1 or SIGTERM and raises
``llama_train.recipe.train.Preempted``; the wrapper then requeues the job with
``scontrol requeue`` and exits with ``PREEMPTED_EXIT_CODE``. The requeued job
runs the same TrainJob, which resumes from that checkpoint (the same command is
a resume). Rank 0 records every transition in ``<run.dir>/job_state.json``: that
file, not Slurm's accounting, is what ``llama-train sweep-status`` reads.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from gssm_data import GssmDataError
from gssm_data.common.slurm_jobs import require_commands, sbatch_errors, time_limit_minutes
from llama_train.analysis.status import point_status, queued_jobs, read_manifest
from llama_train.core.distributed import PREEMPTED_EXIT_CODE, rank_info
from llama_train.errors import LlamaTrainError
from llama_train.launch.submit_config import SlurmConfig, SubmitConfig
from llama_train.launch.sweep import Plan, Point, plan, write_manifest
from llama_train.recipe import train as recipe
from llama_train.rundir import LOG_DIR, current_job_id, write_state

if TYPE_CHECKING:
    import submitit

# The signal the trainer checkpoints on (SIGTERM too); submitit's own default, SIGUSR2,
# would requeue without a checkpoint, and NCCL does not use SIGUSR1 on the ranks we run.
WARNING_SIGNAL = "USR1"

# ---------------------------------------------------------------------------
# Time limits


def parse_time_limit(text: str) -> int:
    """Minutes (rounded up) from a Slurm time limit: 90, 1:30:00, 2-00:00:00, 1-12."""
    return time_limit_minutes(text, error=LlamaTrainError)


# ---------------------------------------------------------------------------
# Executor parameters


def executor_parameters(slurm: SlurmConfig, *, job_name: str) -> dict[str, Any]:
    """Keyword arguments of submitit's SlurmExecutor.update_parameters for one run.

    One task per GPU, so that srun starts the whole process group; SIGUSR1
    `signal_delay_s` before the limit (replacing submitit's SIGUSR2, which it
    would handle itself by requeuing without a checkpoint); `--requeue` so that
    clusters with JobRequeue=0 still let the job requeue itself.
    """
    parameters: dict[str, Any] = {
        "job_name": job_name,
        "time": slurm.timeout_min,
        "nodes": slurm.nodes,
        "ntasks_per_node": tasks_per_node(slurm),
        "signal_delay_s": slurm.signal_delay_s,
        "additional_parameters": {
            "signal": f"{WARNING_SIGNAL}@{slurm.signal_delay_s}",
            "requeue": True,
            **slurm.additional,
        },
    }
    optional = {
        "partition": slurm.partition,
        "gpus_per_node": slurm.gpus_per_node or None,
        "cpus_per_task": slurm.cpus_per_task,
        "mem": slurm.mem,
        "account": slurm.account,
        "qos": slurm.qos,
        "constraint": slurm.constraint,
        "array_parallelism": slurm.array_parallelism,
        "setup": list(slurm.setup) or None,
    }
    parameters.update({key: value for key, value in optional.items() if value is not None})
    return parameters


def tasks_per_node(slurm: SlurmConfig) -> int:
    """Trainer processes per node: as set, else one per GPU (srun starts them all)."""
    return slurm.tasks_per_node or max(slurm.gpus_per_node, 1)


def build_executor(
    slurm: SlurmConfig, folder: Path, *, job_name: str, local: bool = False
) -> submitit.Executor:
    """A submitit executor writing to `folder`: Slurm, or the local executor (`--local`).

    The local executor runs one task (multi-process local training is
    `llama-train run --nproc`); it sees the GPUs `gpus_per_node` asks for.
    """
    try:
        import submitit
    except ImportError:
        raise LlamaTrainError(
            "submitting needs submitit: pip install 'llama-train[slurm]'"
        ) from None
    if local:
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(
            timeout_min=slurm.timeout_min,
            gpus_per_node=min(slurm.gpus_per_node, 1),
            signal_delay_s=slurm.signal_delay_s,
            setup=list(slurm.setup),
        )
        return executor
    require_commands(("sbatch", "srun"), not_found=_not_found, error=LlamaTrainError)
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=slurm.max_requeues)
    executor.update_parameters(**executor_parameters(slurm, job_name=job_name))
    return executor


def log_folder(config: SubmitConfig) -> Path:
    """Where submitit keeps a run's (or a sweep's) scripts, pickles and logs."""
    return config.slurm.log_dir or config.run_dir / LOG_DIR


# ---------------------------------------------------------------------------
# The job


@dataclass
class TrainJob:
    """What each Slurm task runs: train one resolved config, requeue when preempted.

    Picklable (submitit stores it beside the logs); a requeued job unpickles the
    same object and calls it again, and `train` resumes from the latest checkpoint.
    """

    config: SubmitConfig

    def __call__(self) -> dict[str, Any]:
        ranks = rank_info()
        if ranks.distributed:
            export_master_address()
        run_dir = self.config.run_dir
        if ranks.is_main:
            write_state(run_dir, "running")
        try:
            summary = recipe.train(self.config.train_config(), progress=False)
        except recipe.Preempted as stop:
            if not ranks.is_main:
                # Rank 0 decides the job's fate; exiting 0 here cannot make srun kill
                # the step (KillOnBadExit) while rank 0 is still requeuing it.
                raise SystemExit(0) from None
            self._requeue(stop.step, saved=stop.checkpoint is not None)
            raise SystemExit(PREEMPTED_EXIT_CODE) from None  # no result: not over
        except BaseException as error:
            if ranks.is_main:
                write_state(run_dir, "failed", message=describe_error(error))
            raise
        if ranks.is_main:
            write_state(run_dir, "done", step=summary["step"])
        return summary

    def _requeue(self, step: int, *, saved: bool) -> None:
        """Rank 0 after a checkpoint: requeue (Slurm) or record how to resume (elsewhere).

        `saved` is False when the signal came before the first step (nothing to
        save; the next start is a fresh one).
        """
        run_dir, slurm = self.config.run_dir, self.config.slurm
        where = f"checkpoint at step {step}" if saved else "stopped before step 1"
        job_id = current_job_id()
        if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or job_id is None:
            write_state(run_dir, "preempted", step=step, message=f"{where}; submit again to resume")
            return
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if restarts >= slurm.max_requeues:
            write_state(
                run_dir,
                "preempted",
                step=step,
                message=f"{where}; not requeued after {restarts} requeues "
                "(slurm.max_requeues); submit again to resume",
            )
            return
        # Recorded first: the requeue ends this job, possibly before the call returns.
        write_state(run_dir, "preempted", step=step, message=f"{where}; requeued")
        problem = requeue(job_id)
        if problem:
            # Slurm's own preemption (PreemptMode=REQUEUE) may have requeued it already.
            write_state(
                run_dir,
                "preempted",
                step=step,
                message=f"{where}; requeue failed ({problem}); unless Slurm requeued the job "
                "itself, submit again to resume",
            )


def requeue(job_id: str) -> str | None:
    """`scontrol requeue JOB_ID`; the problem in one line, or None when it worked."""
    try:
        subprocess.run(
            ["scontrol", "requeue", job_id], check=True, capture_output=True, text=True, timeout=60
        )
    except FileNotFoundError:
        return "scontrol not found"
    except subprocess.CalledProcessError as error:
        return (error.stderr or error.stdout or f"exit code {error.returncode}").strip()
    except subprocess.TimeoutExpired:
        return "scontrol requeue timed out"
    return None


def export_master_address() -> None:
    """MASTER_ADDR/MASTER_PORT for the process group of an srun job (torchrun sets its own).

    The first node of the allocation hosts rank 0; the port is drawn from the
    job id, so every task of the job agrees on it without talking.
    """
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        return
    import submitit.helpers

    environment = submitit.helpers.TorchDistributedEnvironment()
    os.environ.setdefault("MASTER_ADDR", environment.master_addr)
    os.environ.setdefault("MASTER_PORT", str(environment.master_port))


def describe_error(error: BaseException) -> str:
    """One line for the state file: the message of a user error, else type and message."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, LlamaTrainError | GssmDataError):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# ---------------------------------------------------------------------------
# Submitting


@dataclass
class Submission:
    """What `submit` did: the plan, the jobs by point name, what it skipped and why."""

    plan: Plan
    executor: Literal["slurm", "local"]
    log_dir: Path
    manifest: Path
    jobs: dict[str, Any] = field(default_factory=dict)  # point name -> submitit Job
    skipped: dict[str, str] = field(default_factory=dict)  # point name -> reason

    @property
    def job_ids(self) -> dict[str, str]:
        return {name: str(job.job_id) for name, job in self.jobs.items()}

    @property
    def job_id(self) -> str | None:
        """The Slurm job id (of the array, for a sweep); None when nothing was submitted."""
        ids = list(self.job_ids.values())
        return ids[0].split("_")[0] if ids else None

    def log_files(self, name: str) -> tuple[Path, Path]:
        """stdout and stderr of a point's job (rank 0)."""
        paths = self.jobs[name].paths
        return Path(paths.stdout), Path(paths.stderr)


def submit(
    config_path: str | Path | None,
    overrides: Iterable[str] = (),
    *,
    slurm_settings: Mapping[str, Any] | None = None,
    local: bool = False,
    log: Callable[[str], None] | None = None,
    units: Units | None = None,
) -> Submission:
    """Submit a config: one job, or one array job for its sweep; `local` runs them here.

    Points already done (a summary at `train.steps`) or still queued are skipped,
    so the same command after a failure resubmits only what needs it. With
    `local`, points run one after another through submitit's LocalExecutor and
    this call returns when they have finished. `units` groups points into jobs
    (see :func:`submit_plan`).
    """
    sweep = plan(config_path, overrides, slurm_settings)
    return submit_plan(
        sweep, config_path=config_path, overrides=overrides, local=local, log=log, units=units
    )


# Groups the points to submit into jobs: (the points of one job, what that job runs).
Units = Callable[
    [list[Point], Callable[[SubmitConfig], Callable[[], Any]]],
    list[tuple[list[Point], Callable[[], Any]]],
]


def one_job_per_point(
    points: list[Point], make_job: Callable[[SubmitConfig], Callable[[], Any]]
) -> list[tuple[list[Point], Callable[[], Any]]]:
    """The default units: every point is its own job (array task)."""
    return [([point], make_job(point.config)) for point in points]


def submit_plan(
    sweep: Plan,
    *,
    config_path: str | Path | None = None,
    overrides: Iterable[str] = (),
    local: bool = False,
    log: Callable[[str], None] | None = None,
    job: Callable[[SubmitConfig], Callable[[], Any]] | None = None,
    units: Units | None = None,
) -> Submission:
    """Submit the points of a plan (see :func:`submit`); `job` wraps each point's config
    (default :class:`TrainJob`), so a study can add work after training. `units`
    groups the points into jobs (default one per point; stacks: several points in
    one array task, every point recorded under that task's job id)."""
    make_job = job or TrainJob
    group = units or one_job_per_point
    say = log or (lambda message: None)
    executor_name: Literal["slurm", "local"] = "local" if local else "slurm"
    todo, skipped = _points_to_submit(sweep, check_queue=not local)
    folder = log_folder(sweep.base)
    submission = Submission(sweep, executor_name, folder, manifest=Path(), skipped=skipped)

    def record(job_ids: Mapping[str, str]) -> Path:
        return write_manifest(
            sweep,
            job_ids,
            executor=executor_name,
            log_dir=folder,
            config_path=config_path,
            overrides=overrides,
        )

    if not todo:
        submission.manifest = record({})
        return submission
    executor = build_executor(sweep.base.slurm, folder, job_name=sweep.base.run.name, local=local)
    jobs = group(todo, make_job)
    if local:
        # Local job ids are process ids, known one at a time: the manifest says "local".
        submission.manifest = record({point.name: "local" for point in todo})
        for points, unit in jobs:
            running = executor.submit(unit)
            submission.jobs.update({point.name: running for point in points})
            names = ", ".join(point.name for point in points)
            say(f"running {names} locally (job {running.job_id}; log {running.paths.stdout})")
            running.wait()
        return submission
    with sbatch_errors(not_found=_not_found, error=LlamaTrainError):
        if len(jobs) == 1:
            submitted = [executor.submit(jobs[0][1])]
        else:
            with executor.batch():
                submitted = [executor.submit(unit) for _, unit in jobs]
    for (points, _), running in zip(jobs, submitted, strict=True):
        submission.jobs.update({point.name: running for point in points})
    submission.manifest = record(submission.job_ids)
    return submission


def _not_found(command: str) -> str:
    return f"{command} not found: submit from a Slurm login node, or add --local to run here"


def _points_to_submit(sweep: Plan, *, check_queue: bool) -> tuple[list[Point], dict[str, str]]:
    """The points that need a job; the others with the reason they are skipped."""
    manifest = read_manifest(sweep.directory) or {"points": []}
    job_ids = {point["name"]: point.get("job_id") for point in manifest["points"]}
    queue = queued_jobs(job_ids.values()) if check_queue else None
    todo, skipped = [], {}
    for point in sweep.points:
        status = point_status(point.config.run_dir, job_id=job_ids.get(point.name), queue=queue)
        steps = point.config.train.steps
        if status.state == "done" and (status.step or 0) >= steps:
            skipped[point.name] = f"done (step {status.step})"
        elif queue is not None and status.job_id in queue:
            skipped[point.name] = f"job {status.job_id} is still queued or running"
        else:
            todo.append(point)
    return todo, skipped
