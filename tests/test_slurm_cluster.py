"""Against a real one-node Slurm cluster: an array sweep, a preempted run that requeues
itself and finishes with the losses of an uninterrupted run, a store written by an array.

The cluster tests are marked `integration`: they run where a cluster answers `sinfo`
(SLURM_CONF names it), as the one-node cluster `tests/slurm/start-local-cluster.sh` starts
for `.ci/run` does, and skip, saying why, elsewhere; pytest itself never starts or installs
a cluster. Models are tiny and runs short: those tests take about a minute on a 2-core
machine, most of it Python and torch starting inside jobs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from gssm_data.store import open_store
from llama_train.analysis.status import sweep_status
from llama_train.recipe.train import train
from llama_train.recipe.train_config import resolve_config
from llama_train.rundir import read_metrics, read_state

# What starts a local cluster (as root); named in the skip message, never run from here.
START_SCRIPT = "tests/slurm/start-local-cluster.sh"
# What depends on the arithmetic only (not on time or the machine): compared exactly.
DETERMINISTIC_KEYS = ("step", "loss", "grad_norm", "lr", "tokens", "epoch", "eval/loss")
JOB_TIMEOUT_S = 180
SINFO_TIMEOUT_S = 30
# The partition every job here asks for (the local cluster's only one).
PARTITION = "debug"


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """A reachable cluster; else a skip saying why.

    Never starts or installs anything: a cluster is used when `sinfo` answers (SLURM_CONF
    names its configuration, or the system's default does), as it does once `.ci/run` has
    started the local one with `tests/slurm/start-local-cluster.sh`.
    """
    reason = cluster_unreachable_reason()
    if reason is not None:
        pytest.skip(f"no Slurm cluster: {reason} ({START_SCRIPT} starts a local one, as root)")


def cluster_unreachable_reason() -> str | None:
    """Why no Slurm cluster with the partition these tests submit to answers; None if one does."""
    if shutil.which("sinfo") is None:
        return "sinfo is not installed"
    try:
        answer = subprocess.run(
            ["sinfo", "--noheader", "--format=%R"],
            capture_output=True,
            text=True,
            timeout=SINFO_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return f"sinfo did not answer within {SINFO_TIMEOUT_S} s"
    if answer.returncode != 0:
        said = (answer.stderr.strip().splitlines() or ["no message"])[-1]
        return f"sinfo failed: {said}"
    if PARTITION not in answer.stdout.split():
        return f"the cluster has no partition {PARTITION!r}"
    return None


def _wait_for(condition: Callable[[], object], what: str, timeout: float = JOB_TIMEOUT_S):
    """Poll `condition` until it returns something true; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _queue_state(job_id: str) -> str:
    result = subprocess.run(
        ["squeue", "--noheader", "--format=%T", f"--jobs={job_id}"],
        capture_output=True,
        text=True,
    )
    return result.stdout.strip()


def read_metrics_or_none(run_dir: Path) -> list[dict] | None:
    """The metrics lines written so far; None before the file exists."""
    return read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else None


def _logs(directory: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(directory.glob("*.err")))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, write_preset_store) -> Path:
    out = tmp_path_factory.mktemp("stores") / "debug.zarr"
    write_preset_store(out, "debug", n_train=1024, n_test=128, seq_len=17, block_size=256)
    return out


def _write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


# ---------------------------------------------------------------------------
# When these tests run: only where a cluster answers (never one started from here)


def _fake_sinfo(folder: Path, script: str) -> str:
    """A PATH whose only `sinfo` is `script` (and no other Slurm command)."""
    folder.mkdir()
    sinfo = folder / "sinfo"
    sinfo.write_text(f"#!/bin/sh\n{script}\n")
    sinfo.chmod(0o755)
    return f"{folder}{os.pathsep}/usr/bin{os.pathsep}/bin"


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        ('printf "debug\\ngpu\\n"', None),
        ('echo "gpu"', "the cluster has no partition 'debug'"),
        (
            'echo "sinfo: error: Unable to contact slurm controller" >&2; exit 1',
            "sinfo failed: sinfo: error: Unable to contact slurm controller",
        ),
    ],
)
def test_the_cluster_is_used_only_when_sinfo_answers_with_the_partition(
    script, reason, tmp_path, monkeypatch
):
    monkeypatch.setenv("PATH", _fake_sinfo(tmp_path / "bin", script))
    assert cluster_unreachable_reason() == reason


def test_without_sinfo_the_tests_skip_saying_so(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert cluster_unreachable_reason() == "sinfo is not installed"


# ---------------------------------------------------------------------------
# A sweep as one array job


@pytest.mark.integration
def test_a_sweep_runs_as_one_array_job_and_status_and_best_read_its_run_directories(
    slurm_cluster, store, cli, tmp_path
):
    _write(
        tmp_path / "lr.yaml",
        {
            "data": {"path": str(store), "batch_size": 8},
            "model": {"dim": 16, "n_layers": 1, "n_heads": 2},
            "optim": {"warmup_steps": 5},
            "train": {"steps": 20, "log_every": 10, "threads": 1},
            "eval": {"every": 20},
            "checkpoint": {"every": 20},
            "run": {"dir": "runs/lr"},
            "slurm": {"partition": PARTITION, "timeout_min": 10},
            "sweep": {"optim.lr": [1e-3, 3e-3, 1e-2]},
        },
    )
    # One process per point (--no-stack): the stacked submission has its own test below.
    submitted = cli("llama-train", "submit", "lr.yaml", "--no-stack")
    array = re.search(r"submitted Slurm array job (\d+): 3 points", submitted.stdout)
    assert array, submitted.stdout
    directory = tmp_path / "runs" / "lr"
    names = ["optim.lr=0.001", "optim.lr=0.003", "optim.lr=0.01"]
    manifest = json.loads((directory / "sweep.json").read_text())
    assert [(p["name"], p["job_id"]) for p in manifest["points"]] == [
        (name, f"{array[1]}_{index}") for index, name in enumerate(names)
    ]

    def finished() -> bool:
        states = [status.state for status in sweep_status(directory)]
        if "failed" in states:
            pytest.fail(f"a point failed: {states}\n{_logs(directory / 'slurm')}")
        return states == ["done"] * 3

    _wait_for(finished, "the three points to finish")
    summaries = {
        name: json.loads((directory / name / "summary.json").read_text()) for name in names
    }
    assert all(summary["step"] == 20 for summary in summaries.values())

    rows = json.loads(cli("llama-train", "sweep-status", "runs/lr", "--json").stdout)
    assert [(row["name"], row["state"], row["step"]) for row in rows] == [
        (name, "done", 20) for name in names
    ]
    assert [row["excess"] for row in rows] == [summaries[n]["excess_loss"] for n in names]
    table = " ".join(cli("llama-train", "sweep-status", "runs/lr").stdout.split())
    assert "3 point(s): 3 done" in table

    lowest = min(names, key=lambda name: summaries[name]["excess_loss"])
    best = json.loads(cli("llama-train", "best", "runs/lr", "--by", "eval.excess", "--json").stdout)
    assert best["best"]["name"] == lowest
    assert best["best"]["value"] == pytest.approx(summaries[lowest]["excess_loss"], rel=1e-12)
    by_loss = cli("llama-train", "best", "runs/lr", "--by", "test_loss").stdout
    winner = min(names, key=lambda name: summaries[name]["test_loss"])
    assert f"best by test_loss: {winner} " in by_loss


# ---------------------------------------------------------------------------
# Preemption: SIGUSR1, checkpoint, requeue, resume


@pytest.mark.integration
def test_a_preempted_run_checkpoints_requeues_itself_and_ends_with_uninterrupted_losses(
    slurm_cluster, store, cli, tmp_path
):
    config = {
        "data": {"path": str(store), "batch_size": 16},
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2},
        "optim": {"lr": 3e-3, "warmup_steps": 10},
        "train": {"steps": 600, "log_every": 10, "threads": 1, "progress": False},
        "eval": {"every": 600, "max_sequences": 64},
        "checkpoint": {"every": 1000},  # the preemption's checkpoint and the last one only
        "run": {"dir": "runs/preempted"},
        "slurm": {"timeout_min": 10},
    }
    _write(tmp_path / "long.yaml", config)
    submitted = cli("llama-train", "submit", "long.yaml")
    job_id = re.search(r"submitted Slurm job (\d+)", submitted.stdout)[1]
    run_dir = tmp_path / "runs" / "preempted"
    _wait_for(lambda: read_metrics_or_none(run_dir), "the first metrics line")
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)  # what --signal sends

    state = _wait_for(
        lambda: getattr(read_state(run_dir), "state", None) == "preempted" and read_state(run_dir),
        "the run to checkpoint and requeue",
    )
    preempted_at = state.step
    assert 0 < preempted_at < 600 and state.message.endswith("requeued")
    assert (run_dir / "checkpoints" / f"step_{preempted_at:06d}").is_dir()
    # Slurm holds a requeued job for 120 s; a test need not wait.
    _wait_for(lambda: _queue_state(job_id) == "PENDING", "the requeued job to be pending")
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)

    reference_dir = tmp_path / "runs" / "reference"
    training = {key: value for key, value in config.items() if key != "slurm"}  # submit's only
    reference_file = _write(
        tmp_path / "reference.yaml", {**training, "run": {"dir": str(reference_dir)}}
    )
    reference = resolve_config(reference_file)
    train(reference, progress=False)  # meanwhile, the uninterrupted run, in this process

    _wait_for(lambda: getattr(read_state(run_dir), "state", None) in ("done", "failed"), "the end")
    final = read_state(run_dir)
    assert final.state == "done", _logs(run_dir / "slurm")
    assert final.restarts == 1 and final.step == 600
    log = (run_dir / "slurm" / f"{job_id}_0_log.err").read_text()
    assert f"resuming runs/preempted from step {preempted_at}" in log

    assert _deterministic(run_dir) == _deterministic(reference.run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    expected = json.loads((reference.run_dir / "summary.json").read_text())
    assert summary["test_loss"] == expected["test_loss"]


@pytest.mark.integration
def test_a_two_task_job_trains_as_two_ranks_and_resumes_them_after_preemption(
    slurm_cluster, store, cli, tmp_path
):
    """One task per GPU on GPU nodes; here two CPU tasks stand in for them (gloo)."""
    config = {
        "data": {"path": str(store), "batch_size": 8},
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2},
        "optim": {"lr": 3e-3, "warmup_steps": 10},
        "train": {"steps": 200, "log_every": 10, "threads": 1, "progress": False},
        "eval": {"every": 200, "max_sequences": 64},
        "checkpoint": {"every": 1000},
        "slurm": {"timeout_min": 10, "tasks_per_node": 2},
    }
    _write(tmp_path / "ranks.yaml", config)
    jobs = {}
    for name in ("preempted", "reference"):  # the reference waits for the two CPUs
        submitted = cli("llama-train", "submit", "ranks.yaml", f"run.dir=runs/{name}")
        assert "1 node(s) x 2 task(s)" in submitted.stdout
        jobs[name] = re.search(r"submitted Slurm job (\d+)", submitted.stdout)[1]
    run_dir, reference_dir = tmp_path / "runs" / "preempted", tmp_path / "runs" / "reference"
    _wait_for(lambda: read_metrics_or_none(run_dir), "the first metrics line")
    subprocess.run(["scancel", "--signal=USR1", jobs["preempted"]], check=True)
    _wait_for(lambda: _queue_state(jobs["preempted"]) == "PENDING", "the requeue")
    preempted_at = read_state(run_dir).step
    subprocess.run(
        ["scontrol", "update", f"JobId={jobs['preempted']}", "StartTime=now"], check=True
    )

    for directory in (run_dir, reference_dir):
        _wait_for(
            lambda directory=directory: (
                getattr(read_state(directory), "state", None) in ("done", "failed")
            ),
            f"{directory.name} to end",
        )
        assert read_state(directory).state == "done", _logs(directory / "slurm")
    log = (run_dir / "slurm" / f"{jobs['preempted']}_0_log.err").read_text()
    assert "256 tokens per step on 2 x cpu (ddp)" in log  # 8 rows x 16 targets x 2 ranks
    assert f"resuming runs/preempted from step {preempted_at}" in log
    assert read_state(run_dir).restarts == 1
    assert _deterministic(run_dir) == _deterministic(reference_dir)


@pytest.mark.integration
@pytest.mark.parametrize(
    "stop",
    [
        ["scancel", "--signal=USR1"],  # the warning `--signal` sends before a time limit
        ["scontrol", "requeue"],  # Slurm's own requeue (preemption, a failed node): SIGTERM
    ],
    ids=["signalled", "requeued-by-slurm"],
)
def test_a_preempted_array_task_holding_a_stack_requeues_and_resumes_every_member_exactly(
    slurm_cluster, store, cli, tmp_path, stop
):
    """A sweep of two shapes x two learning rates: two array tasks, each a stack of two.
    Task 0 is stopped; it checkpoints both members, is requeued once, and each member
    ends with the losses of the same sweep trained here uninterrupted."""
    config = {
        "data": {"path": str(store), "batch_size": 16},
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2},
        "optim": {"warmup_steps": 10},
        "train": {"steps": 400, "log_every": 10, "threads": 1, "progress": False},
        "eval": {"every": 400, "max_sequences": 64},
        "checkpoint": {"every": 1000},  # the preemption's checkpoint and the last one only
        "slurm": {"partition": PARTITION, "timeout_min": 10},
        "sweep": {"model.dim": [32, 16], "optim.lr": [1e-3, 3e-3]},
    }
    _write(tmp_path / "stacks.yaml", config)
    submitted = cli("llama-train", "submit", "stacks.yaml", "run.dir=runs/stacks")
    said = " ".join(submitted.stdout.split())
    array = re.search(r"submitted Slurm array job (\d+): 4 points in 2 tasks \(stacks\)", said)
    assert array, submitted.stdout
    directory = tmp_path / "runs" / "stacks"
    manifest = json.loads((directory / "sweep.json").read_text())
    task = f"{array[1]}_0"
    members = [p["name"] for p in manifest["points"] if p["job_id"] == task]
    assert len(members) == 2, manifest["points"]
    lead = directory / members[0]
    _wait_for(lambda: read_metrics_or_none(lead), "the first metrics line")
    subprocess.run([*stop, task], check=True)

    states = _wait_for(
        lambda: (
            all(getattr(read_state(directory / n), "state", None) == "preempted" for n in members)
            and [read_state(directory / n) for n in members]
        ),
        "the stack to checkpoint and requeue",
    )
    preempted_at = {state.step for state in states}
    assert len(preempted_at) == 1, states  # the members stop at one step
    step = preempted_at.pop()
    assert 0 < step < 400
    for name in members:
        assert (directory / name / "checkpoints" / f"step_{step:06d}").is_dir()
    _wait_for(lambda: _queue_state(task) == "PENDING", "the requeued task to be pending")
    subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now"], check=True)

    # Meanwhile, the uninterrupted sweep, stacked the same way, here.
    cli("llama-train", "submit", "stacks.yaml", "run.dir=runs/reference", "--local")
    reference = tmp_path / "runs" / "reference"
    runs = (directory, reference)

    for name in [p["name"] for p in manifest["points"]]:
        _wait_for(
            lambda name=name: (
                getattr(read_state(directory / name), "state", None) in ("done", "failed")
            ),
            f"{name} to end",
        )
        final = read_state(directory / name)
        assert final.state == "done", _logs(directory / "slurm")
        assert final.restarts == (1 if name in members else 0), final
        assert _deterministic(directory / name) == _deterministic(reference / name), name
        summaries = [json.loads((d / name / "summary.json").read_text()) for d in runs]
        assert summaries[0]["test_loss"] == summaries[1]["test_loss"], name
    assert f"from step {step}" in _logs(directory / "slurm")


def _deterministic(directory: Path) -> list[dict]:
    return [
        {key: record[key] for key in DETERMINISTIC_KEYS if key in record}
        for record in read_metrics(directory)
    ]


# ---------------------------------------------------------------------------
# gssm-data on Slurm


@pytest.mark.integration
def test_gssm_data_submit_writes_with_two_array_tasks_the_bytes_of_a_local_generate(
    slurm_cluster, cli, tmp_path
):
    options = ["--preset", "debug", "--n", "9000", "--n-test", "1000", "--seq-len", "17"]
    submitted = cli(
        "gssm-data", "submit", "--tasks", "2", *options, "--out", "sharded.zarr", "--wait"
    )
    assert re.fullmatch(rf"job \d+ \(2 tasks\): {tmp_path / 'sharded.zarr'}\n", submitted.stdout), (
        submitted.stdout
    )
    cli("gssm-data", "generate", *options, "--out", "local.zarr", "--workers", "1", "--quiet")
    sharded, local = tmp_path / "sharded.zarr", tmp_path / "local.zarr"

    files = sorted(path.relative_to(local) for path in local.rglob("*") if path.is_file())
    assert sorted(p.relative_to(sharded) for p in sharded.rglob("*") if p.is_file()) == files
    different = [
        str(name) for name in files if (sharded / name).read_bytes() != (local / name).read_bytes()
    ]
    assert different == ["zarr.json"]  # the manifest, whose created_at differs:
    manifests = [open_store(path).manifest.model_dump() for path in (sharded, local)]
    for manifest in manifests:
        manifest.pop("created_at")
    assert manifests[0] == manifests[1]

    # submitit's logs, one per task; the task that wrote the last block published.
    logs = [path.read_text() for path in sorted((tmp_path / "sharded.zarr.slurm").glob("*.out"))]
    assert len(logs) == 2
    statuses = sorted(re.findall(r"^shard \d/2: (\S+)$", "".join(logs), re.M))
    assert statuses == ["complete", "shard-done"], logs
    assert "ok:" in cli("gssm-data", "verify", "sharded.zarr").stdout
