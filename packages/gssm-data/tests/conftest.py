"""A stand-in Slurm on PATH for the submit tests: sbatch, srun and squeue as small scripts.

`sbatch` records each call (its arguments and the script submitit wrote) and
answers as Slurm does ("Submitted batch job 101", 102, ...). With `run=True` it
also runs the script's array tasks, one after another, in a detached process
(submitit moves its pickles into place only after sbatch has answered), setting
the variables Slurm sets; `srun` then runs its command with the --output and
--error files, and `squeue` lists a job as RUNNING until its tasks have all ended.
Without `run`, `srun` does nothing and `squeue` lists every job as COMPLETED.
Its scripts are run by this interpreter, so no PATH lookup decides which python runs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

_SBATCH = """\
import json, os, re, subprocess, sys
calls, state, run, refuse = {calls!r}, {state!r}, {run!r}, {refuse!r}
if sys.argv[1:2] == ["--run"]:
    script, job, tasks = sys.argv[2], sys.argv[3], int(sys.argv[4])
    for task in range(max(tasks, 1)):
        env = dict(os.environ, SLURM_JOB_ID=str(int(job) + task), SLURM_NTASKS="1",
                   SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
                   SLURM_JOB_NUM_NODES="1", SLURM_CPUS_PER_TASK="1")
        if tasks:
            env.update(SLURM_ARRAY_JOB_ID=job, SLURM_ARRAY_TASK_ID=str(task))
        subprocess.run(["bash", script], env=env)
    open(os.path.join(state, "done-" + job), "w").close()
    sys.exit(0)
text = open(sys.argv[-1]).read()
count = sum(1 for _ in open(calls)) if os.path.exists(calls) else 0
with open(calls, "a") as log:
    log.write(json.dumps({{"argv": sys.argv[1:], "script": text}}) + "\\n")
if refuse:
    sys.exit(print(refuse, file=sys.stderr) or 1)
job = str(101 + count)
print("Submitted batch job " + job)
if run:
    array = re.search(r"^#SBATCH --array=0-(\\d+)", text, re.M)
    tasks = str(int(array[1]) + 1) if array else "0"
    subprocess.Popen([sys.executable, __file__, "--run", sys.argv[-1], job, tasks],
                     start_new_session=True, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
"""

_SRUN = """\
import os, subprocess, sys
run = {run!r}
args, files = sys.argv[1:], {{}}
while args and args[0].startswith("--"):
    flag = args.pop(0)
    if flag in ("--output", "--error"):
        files[flag] = args.pop(0)
def expand(path):
    for key, name in (("%A", "SLURM_ARRAY_JOB_ID"), ("%a", "SLURM_ARRAY_TASK_ID"),
                      ("%j", "SLURM_JOB_ID")):
        path = path.replace(key, os.environ.get(name, ""))
    return path.replace("%t", "0")
if run:
    with open(expand(files["--output"]), "a") as out, open(expand(files["--error"]), "a") as err:
        sys.exit(subprocess.call(args, stdout=out, stderr=err))
"""

_SQUEUE = """\
import os, sys
state, run = {state!r}, {run!r}
job = [arg.split("=", 1)[1] for arg in sys.argv[1:] if arg.startswith("--jobs=")][0]
running = run and not os.path.exists(os.path.join(state, "done-" + job))
print(job + "_0 " + ("RUNNING" if running else "COMPLETED"))
"""


@dataclass
class FakeSlurm:
    """The stand-in's call log and state folder."""

    calls_file: Path
    state: Path

    def calls(self) -> list[dict]:
        """Every sbatch call: {"argv": [...], "script": text}."""
        if not self.calls_file.exists():
            return []
        return [json.loads(line) for line in self.calls_file.read_text().splitlines()]

    def wait_until_done(self, job_id: str, timeout: float = 300) -> None:
        """Block until the detached runner of `job_id` has ended (tests stop what they start)."""
        deadline = time.monotonic() + timeout
        while not (self.state / f"done-{job_id}").exists():
            if time.monotonic() > deadline:
                pytest.fail(f"the stand-in cluster did not finish job {job_id}")
            time.sleep(0.2)


@pytest.fixture()
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeSlurm]:
    """Install the stand-in on PATH: `fake_slurm(run=True)` runs the jobs, `srun=False`
    leaves srun out, `refuse="sbatch: error: ..."` makes sbatch fail with that message."""

    def install(*, run: bool = False, srun: bool = True, refuse: str = "") -> FakeSlurm:
        bin_dir = tmp_path / "slurm-bin"
        state = tmp_path / "slurm-state"
        bin_dir.mkdir()
        state.mkdir()
        calls = tmp_path / "sbatch-calls.jsonl"
        values = {"calls": str(calls), "state": str(state), "run": run, "refuse": refuse}
        scripts = {"sbatch": _SBATCH, "squeue": _SQUEUE}
        if srun:
            scripts["srun"] = _SRUN
        for name, text in scripts.items():
            path = bin_dir / name
            path.write_text(f"#!{sys.executable}\n" + text.format(**values))
            path.chmod(0o755)
        # Without srun, PATH is the stand-in alone (the machine may have Slurm's own).
        path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}" if srun else str(bin_dir)
        monkeypatch.setenv("PATH", path)
        monkeypatch.setattr("gssm_data.slurm.POLL_S", 0.2)
        return FakeSlurm(calls, state)

    return install
