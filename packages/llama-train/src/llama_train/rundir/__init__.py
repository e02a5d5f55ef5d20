"""The run directory: its files, who writes them, and the one way to read each.

A run directory (`run.dir`) holds everything a run leaves behind::

    config.yaml      the resolved config (written before the first step)
    metrics.jsonl    one JSON line per metrics record         (metrics)
    summary.json     the final figures, versioned              (summary: RunSummary)
    checkpoints/     step_NNNNNN folders                       (core.checkpoint)
    eval/            step_NNNNNN.json, one full evaluation each (evaluations: EvalRecord)
    profile.csv      the step profiler's rows                  (core.profiler)
    validation.json  a study run's held-out loss               (validation: ValidationRecord)
    job_state.json   the job wrapper's record, submitted runs   (state: JobRecord)
    wandb_sync.json  what wandb-sync has sent                  (wandb_records: SyncState)
    slurm/           submitit's scripts and logs (submitted runs only)

The package imports neither torch nor the trainer (only pydantic, the standard
library and gssm_data), so commands that only read run directories (`sweep-status`,
`best`, `plot`, `study collect`) answer at once. Nothing outside it reads a run
file by key: readers get the typed records below.
"""

from llama_train.rundir.evaluations import (
    EvalRecord,
    drop_evaluations_after,
    evaluation_path,
    evaluation_paths,
    latest_evaluation,
    read_evaluation,
    write_evaluation,
)
from llama_train.rundir.files import (
    CHECKPOINT_DIR,
    CONFIG_FILENAME,
    EVAL_DIR,
    LOG_DIR,
    METRICS_FILENAME,
    PROFILE_FILENAME,
    STATE_FILENAME,
    SUMMARY_FILENAME,
    VALIDATION_FILENAME,
    WANDB_ID_FILENAME,
    atomic_write,
    fsync_directory,
    read_json_object,
    write_json,
)
from llama_train.rundir.metrics import (
    MetricsRecord,
    Progress,
    read_metric_records,
    read_metrics,
    read_progress,
    tokens_per_step,
)
from llama_train.rundir.state import JobRecord, JobState, current_job_id, read_state, write_state
from llama_train.rundir.summary import SUMMARY_VERSION, RunSummary, read_summary, sound_summary
from llama_train.rundir.validation import ValidationRecord, read_validation
from llama_train.rundir.wandb_records import (
    SYNC_FILENAME,
    SentSteps,
    SyncState,
    WandbSettings,
    read_sync_state,
    read_wandb_settings,
    wandb_name_and_group,
)
from llama_train.rundir.yaml_file import load_yaml

__all__ = [
    "CHECKPOINT_DIR",
    "CONFIG_FILENAME",
    "EVAL_DIR",
    "LOG_DIR",
    "METRICS_FILENAME",
    "PROFILE_FILENAME",
    "STATE_FILENAME",
    "SUMMARY_FILENAME",
    "SUMMARY_VERSION",
    "SYNC_FILENAME",
    "VALIDATION_FILENAME",
    "WANDB_ID_FILENAME",
    "EvalRecord",
    "JobRecord",
    "JobState",
    "MetricsRecord",
    "Progress",
    "RunSummary",
    "SentSteps",
    "SyncState",
    "ValidationRecord",
    "WandbSettings",
    "atomic_write",
    "current_job_id",
    "drop_evaluations_after",
    "evaluation_path",
    "evaluation_paths",
    "fsync_directory",
    "latest_evaluation",
    "load_yaml",
    "read_evaluation",
    "read_json_object",
    "read_metric_records",
    "read_metrics",
    "read_progress",
    "read_state",
    "read_summary",
    "read_sync_state",
    "read_validation",
    "read_wandb_settings",
    "sound_summary",
    "tokens_per_step",
    "wandb_name_and_group",
    "write_evaluation",
    "write_json",
    "write_state",
]
