"""What both packages' Slurm submissions share: time limits, the commands, sbatch's refusals.

`gssm-data submit` and `llama-train submit` both hand jobs to submitit. Users type
Slurm's own time spellings, submitit needs minutes; submitit reports a missing srun as
a bare RuntimeError and sbatch's refusal as an exception after printing it. These three
conversions into one-line user errors live here once. Each takes the exception type of
the package that calls it, so a command's errors stay its own.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import shutil
from collections.abc import Callable, Iterable, Iterator

from gssm_data.errors import GssmDataError

UserError = type[Exception]

_TIME_LIMIT = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", re.ASCII)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def time_limit_minutes(text: str, *, error: UserError = GssmDataError) -> int:
    """Minutes, rounded up, of a Slurm time limit: 90, 1:30, 1:30:00, 1-12, 2-00:00:00.

    submitit needs the limit as a number (to tell a task reaching it from a
    preempted one); Slurm's spellings are what users type.
    """
    match = _TIME_LIMIT.fullmatch(text.strip())
    seconds = 0
    if match is not None:
        days, first, second, third = (int(part) if part else 0 for part in match.groups())
        if match[1] is not None:  # days-hours[:minutes[:seconds]]
            seconds = days * 86400 + first * 3600 + second * 60 + third
        elif match[4] is not None:  # hours:minutes:seconds
            seconds = first * 3600 + second * 60 + third
        else:  # minutes[:seconds]
            seconds = first * 60 + second
    if seconds <= 0:
        raise error(
            f"--time {text!r} is not a Slurm time limit; write minutes (90), H:MM:SS (1:30:00) "
            "or D-HH:MM:SS (2-00:00:00)"
        )
    return math.ceil(seconds / 60)


def require_commands(
    commands: Iterable[str], *, not_found: Callable[[str], str], error: UserError = GssmDataError
) -> None:
    """Refuse, in one line, when a Slurm command is not on PATH (submitit's check is a bare
    RuntimeError for srun and comes only after pickling for sbatch)."""
    for command in commands:
        if shutil.which(command) is None:
            raise error(not_found(command))


@contextlib.contextmanager
def sbatch_errors(
    *, not_found: Callable[[str], str], error: UserError = GssmDataError
) -> Iterator[None]:
    """sbatch's refusal (or its absence) as one line in sbatch's own words.

    submitit raises FailedJobError with sbatch's stderr after printing that
    stderr itself; the print is captured so that the user reads it once. Control
    characters in the message are spelled as escapes, so it stays one line.
    """
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    except (FailedJobError, FailedSubmissionError) as failure:
        said = " / ".join(line.strip() for line in str(failure).splitlines() if line.strip())
        said = said or captured.getvalue().strip() or "no message"
        said = _CONTROL.sub(lambda match: repr(match.group())[1:-1], said)
        raise error(f"sbatch refused the job: {said}") from None
    except FileNotFoundError as failure:
        if "sbatch" not in str(failure):
            raise
        raise error(not_found("sbatch")) from None
