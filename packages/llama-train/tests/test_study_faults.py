"""Faults during a study: hostile study files, two runners, a killed runner, failing points.

Each test is a row of the Reliability table (docs/reliability.md): what a user sees when the fault
happens, and that the same command still works afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llama_train.cli import app
from llama_train.launch.study import plan_study, run_local

runner = CliRunner()
SEQ_LEN = 17


@pytest.fixture(scope="module")
def store(make_debug_store) -> Path:
    return make_debug_store(n_train=128, n_test=32, seq_len=SEQ_LEN, block_size=32)


def _study(tmp_path: Path, store: Path, **changes) -> Path:
    """A study of tiny points (dim 8, 3 steps) under tmp_path/study; `changes` replace keys."""
    base = tmp_path / "base.yaml"
    base.write_text(
        yaml.safe_dump(
            {
                "data": {"path": str(store), "batch_size": 8},
                "model": {"dim": 8, "n_layers": 1, "n_heads": 2},
                "optim": {"warmup_steps": 1},
                "train": {"threads": 1, "log_every": 1, "progress": False},
                "eval": {"batch_size": 16},
            }
        )
    )
    study = {
        "dir": str(tmp_path / "study"),
        "base": str(base),
        "regimes": [{"name": "debug", "store": str(store)}],
        "models": [{"name": "small", "model": {"dim": 8, "n_heads": 2}}],
        "data": [32],
        "steps": {"steps": 3},
        "lr": [1e-2],
        "validation_sequences": 32,
        **changes,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _error_line(result) -> str:
    """The one `error:` line of a failed command (and nothing else but informational lines)."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def _flat(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------
# Hostile study files: the bounded YAML loader


@pytest.mark.parametrize("kind", ["latin-1", "deep", "directory", "dev-zero", "fifo"])
def test_hostile_study_files_are_one_line_and_quick(tmp_path, kind):
    path = tmp_path / "study.yaml"
    expected = {
        "latin-1": "is not UTF-8 text",
        "deep": "nests deeper than 64 levels",
        "directory": "is a directory",
        "dev-zero": "is not a regular file",
        "fifo": "is not a regular file",
    }[kind]
    if kind == "latin-1":
        path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    elif kind == "deep":
        path.write_text("base: " + "[" * 5000 + "]" * 5000 + "\n")
    elif kind == "directory":
        path.mkdir()
    elif kind == "dev-zero":
        path = Path("/dev/zero")
    else:
        os.mkfifo(path)  # no writer: a plain open would block for ever
    started = time.perf_counter()
    result = runner.invoke(app, ["study", "run", str(path), "--dry-run"])
    line = _error_line(result)
    assert expected in line and "study file" in line, line
    assert time.perf_counter() - started < 5


# ---------------------------------------------------------------------------
# Two runners on one study directory

HOLD_LOCK = """
import sys, time
from llama_train.core.runlock import directory_lock
from llama_train.launch.study import STUDY_LOCK_FILENAME
with directory_lock(sys.argv[1], STUDY_LOCK_FILENAME, busy="busy", advice="wait"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_study_run_on_the_same_directory_refuses_in_one_line(tmp_path, store):
    path = _study(tmp_path, store)
    directory = tmp_path / "study"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(directory)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        result = runner.invoke(app, ["study", "run", str(path)])
        line = _error_line(result)
        assert "is in use by another llama-train study run (" in line
        assert f"pid {holder.pid}" in line
        # Refused before anything was written: no record, no manifest, no run directory.
        assert sorted(child.name for child in directory.iterdir()) == [".study.lock"]
    finally:
        holder.kill()
        holder.wait()
    again = runner.invoke(app, ["study", "run", str(path)])  # the lock died with its holder
    assert again.exit_code == 0, again.output
    assert "1 trained" in _flat(again.output)


# ---------------------------------------------------------------------------
# kill -9 of `study run --parallel 2`: the workers go with it


def _children(pid: int) -> set[int]:
    """Direct children of `pid` (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process tree from /proc")
def test_workers_die_with_a_killed_study_run(tmp_path, store):
    path = _study(
        tmp_path,
        store,
        steps={"steps": 100_000},
        models=[{"name": "a", "model": {"dim": 8}}, {"name": "b", "model": {"dim": 16}}],
    )
    command = [sys.executable, "-m", "llama_train", "study", "run", str(path), "--parallel", "2"]
    parent = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    workers: set[int] = set()
    try:
        logs = [tmp_path / "study" / name / "metrics.jsonl" for name in ("debug_a_n32_lr0.01_s0",)]
        logs.append(tmp_path / "study" / "debug_b_n32_lr0.01_s0" / "metrics.jsonl")
        deadline = time.monotonic() + 120
        while not all(log.exists() for log in logs):  # both workers are training
            assert parent.poll() is None, "the study ended early"
            assert time.monotonic() < deadline, "the workers never started training"
            time.sleep(0.5)
        workers = _children(parent.pid)
        assert len(workers) >= 2
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in workers if _alive(pid)], "workers outlived their parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------
# Some points fail: the others finish, and every command says what is missing


@pytest.mark.integration
def test_failing_points_leave_the_others_and_are_named_everywhere(tmp_path, store):
    """A learning rate that diverges and a regime whose store vanished mid-study."""
    vanishing = tmp_path / "vanishing.zarr"
    shutil.copytree(store, vanishing)
    path = _study(
        tmp_path,
        store,
        regimes=[
            {"name": "debug", "store": str(store)},
            {"name": "gone", "store": str(vanishing)},
        ],
        models=[
            {"name": "s", "model": {"dim": 8}},
            {"name": "m", "model": {"dim": 16}},
            {"name": "l", "model": {"dim": 24}},
        ],
        data=[32, 64],
        lr=[1e-2, 1e30],
    )
    directory = tmp_path / "study"
    expanded = plan_study(path)
    shutil.rmtree(vanishing)
    report = run_local(expanded, progress=False)
    good = {p.name for p in expanded.points if p.regime == "debug" and p.lr == 1e-2}
    assert set(report.trained) == good
    assert set(report.failed) == {p.name for p in expanded.points} - good
    for name, problem in report.failed.items():
        if name.startswith("gone_"):
            assert problem == f"no store at {vanishing}"
        else:
            assert "_lr1e+30_" in name and problem.startswith("gradient norm nan at step")

    status = runner.invoke(app, ["study", "status", str(directory), "--json"])
    assert status.exit_code == 0, status.output
    by_name = {point["name"]: point for point in json.loads(status.output)}
    for name in report.failed:
        assert by_name[name]["state"] == "failed"
        assert by_name[name]["message"] and "\n" not in by_name[name]["message"]
    assert {name for name, point in by_name.items() if point["state"] == "done"} == good
    table = runner.invoke(app, ["study", "status", str(directory)])
    assert "18 failed" in _flat(table.output) and "6 done" in _flat(table.output)

    collected = runner.invoke(app, ["study", "collect", str(directory)])
    assert collected.exit_code == 0, collected.output
    assert "6 rows" in _flat(collected.output)
    assert "18 point(s) not in the table" in _flat(collected.output)
    said = _flat(collected.output)
    assert "debug_s_n32_lr1e+30_s0 (failed: gradient norm nan at step" in said
    assert "and 13 more (llama-train study status" in said

    plotted = runner.invoke(app, ["study", "plot", str(directory), "--bootstrap", "0"])
    assert plotted.exit_code == 0, plotted.output
    assert "18 point(s) not in the table" in _flat(plotted.output)
    assert (directory / "plots" / "fits.json").is_file()
    fits = json.loads((directory / "plots" / "fits.json").read_text())
    assert [fit["regime"] for fit in fits] == ["debug"]


GRANDCHILD = """
import sys, time
from llama_train.launch import lifeline
lifeline._set_parent_death_signal = lambda signum: None  # as where prctl is missing
lifeline.POLL_SECONDS = 0.1
lifeline.die_with_parent(int(sys.argv[1]))
print("armed", flush=True)
time.sleep(60)
"""
MIDDLE = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid())])
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process tree from /proc")
def test_without_prctl_the_parent_watch_still_ends_an_orphan():
    middle = subprocess.Popen(
        [sys.executable, "-c", MIDDLE, GRANDCHILD], stdout=subprocess.PIPE, text=True
    )
    grandchild = 0
    try:
        assert middle.stdout is not None
        grandchild = int(middle.stdout.readline())
        assert middle.stdout.readline().strip() == "armed"
        assert _alive(grandchild)
        middle.kill()
        middle.wait()
        deadline = time.monotonic() + 10
        while _alive(grandchild) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(grandchild), "the orphan outlived its parent"
    finally:
        if middle.poll() is None:
            middle.kill()
            middle.wait()
        if grandchild and _alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)


# ---------------------------------------------------------------------------
# A full disk during a study


def test_disk_full_during_a_study_is_one_line_and_the_same_command_resumes(
    tmp_path, store, monkeypatch
):
    from safetensors import SafetensorError

    from llama_train.core import weights

    path = _study(tmp_path, store)
    directory = tmp_path / "study"
    name = "debug_small_n32_lr0.01_s0"

    def no_space(tensors, target, metadata=None):
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28) "
            f'at path "{target}"'
        )

    with monkeypatch.context() as patch:
        patch.setattr(weights, "save_file", no_space)
        result = runner.invoke(app, ["study", "run", str(path)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    said = _flat(result.output)
    assert f"failed {name}: no space left on the device while writing checkpoint step 3" in said
    assert not (directory / name / "summary.json").exists()
    status = json.loads(runner.invoke(app, ["study", "status", str(directory), "--json"]).output)
    assert status[0]["state"] == "failed" and "no space left" in status[0]["message"]

    again = runner.invoke(app, ["study", "run", str(path)])  # space is free again
    assert again.exit_code == 0 and "1 trained" in _flat(again.output), again.output

    table = directory / "points.csv"
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if ".points.csv." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(28, os.strerror(28))
        real_fsync(fd)

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", fsync)
        full = runner.invoke(app, ["study", "collect", str(directory)])
    assert _error_line(full) == (
        f"error: {table}: No space left on device; free some space and run the same command again"
    )
    assert not table.exists() and not list(directory.glob(".points.csv.*"))
    collected = runner.invoke(app, ["study", "collect", str(directory)])
    assert collected.exit_code == 0 and table.is_file(), collected.output


def test_collect_names_a_point_whose_summary_is_damaged_and_run_repairs_it(tmp_path, store):
    path = _study(tmp_path, store, data=[32, 64])
    directory = tmp_path / "study"
    assert runner.invoke(app, ["study", "run", str(path)]).exit_code == 0
    damaged = directory / "debug_small_n64_lr0.01_s0" / "summary.json"
    original = json.loads(damaged.read_text())
    damaged.write_text(damaged.read_text()[:30])
    collected = runner.invoke(app, ["study", "collect", str(directory)])
    assert collected.exit_code == 0, collected.output
    said = _flat(collected.output)
    assert (
        "1 point(s) not in the table: debug_small_n64_lr0.01_s0 (its summary.json is damaged"
        in said
    )
    assert "(1 rows)" in said
    again = runner.invoke(app, ["study", "run", str(path)])
    assert again.exit_code == 0 and "1 trained, 1 already done" in _flat(again.output)
    assert json.loads(damaged.read_text())["test_loss"] == original["test_loss"]
    collected = runner.invoke(app, ["study", "collect", str(directory)])
    assert "(2 rows)" in _flat(collected.output) and "not in the table" not in collected.output
