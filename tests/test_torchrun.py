"""llama-train under torchrun, for real: CPU processes talking through gloo.

Every run here is a subprocess (`llama-train run --nproc N`, or torchrun
around a small wrapper), so the process groups, the signals and the kills are
real. The claims:

- 2 processes x 1 accumulation step give the loss curve of 1 process x 2
  (same global batch), with DDP and with FSDP2;
- a checkpoint written by N processes resumes on M (2 -> 1 across strategies,
  1 -> 2), continuing that curve;
- SIGKILL of every rank of a 2-process job, then the same command: the losses
  of an uninterrupted 2-process run;
- SIGTERM to `llama-train run --nproc 2` (forwarded to the ranks) and SIGUSR1
  to a single process: a checkpoint at an agreed step, exit code 3, one line
  naming the checkpoint, and the same command resumes to the uninterrupted
  losses;
- a user error on one rank stops every rank at once with one message.

Runs are tiny (a 2-layer model of width 16, 12 steps) and share two reference
runs; a test-only `sitecustomize` (on PYTHONPATH) slows steps down so a signal
lands mid-run, or breaks one rank.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from llama_train import load_model
from llama_train.core.checkpoint import CheckpointManager
from llama_train.core.distributed import PREEMPTED_EXIT_CODE
from llama_train.rundir import read_metrics

# Real launchers, ranks and signals: excluded from `make test-fast`.
pytestmark = pytest.mark.integration

STEPS = 12
# What depends on the arithmetic only (not on time or the machine).
CURVE_KEYS = ("step", "loss", "grad_norm", "lr", "tokens", "epoch", "eval/loss")

# Loaded by every Python process started with PYTHONPATH=<its folder>: the launcher, the
# ranks. Only acts when the test sets its variables.
TEST_HOOKS = """
import os

if os.environ.get("TEST_STEP_DELAY_S") or os.environ.get("TEST_FAIL_RANK"):
    import time

    from llama_train.recipe import train as recipe
    from llama_train.errors import LlamaTrainError

    if os.environ.get("TEST_STEP_DELAY_S"):
        _train_step = recipe.Trainer.train_step

        def _slow_train_step(self, batches):
            time.sleep(float(os.environ["TEST_STEP_DELAY_S"]))
            return _train_step(self, batches)

        recipe.Trainer.train_step = _slow_train_step

    if os.environ.get("TEST_FAIL_RANK"):
        _resolve_data = recipe.resolve_data

        def _failing_resolve_data(cfg):
            if os.environ.get("RANK") == os.environ["TEST_FAIL_RANK"]:
                raise LlamaTrainError("cannot read the store from this node (test)")
            return _resolve_data(cfg)

        recipe.resolve_data = _failing_resolve_data
"""

KILLER = """
import os, signal, sys
from llama_train.cli import main
from llama_train.recipe.train import Trainer

original = Trainer.train_step

def train_step(self, batches):
    if self.state.step == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)  # every rank, as its step 11 starts
    return original(self, batches)

Trainer.train_step = train_step
sys.argv = ["llama-train", *sys.argv[1:]]
main()
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, write_preset_store) -> Path:
    """A debug store, the shared config and the test hooks."""
    root = tmp_path_factory.mktemp("torchrun")
    store = root / "debug.zarr"
    write_preset_store(store, "debug", n_train=512, n_test=64, seq_len=17, block_size=64)
    config = {
        "data": {"path": str(store), "batch_size": 8},
        "model": {"dim": 16, "n_layers": 2, "n_heads": 2},
        # constant: the learning rate does not depend on train.steps, so a run cut
        # short with train.steps=6 and resumed with 12 follows the 12-step curve.
        "optim": {"lr": 3e-3, "warmup_steps": 2, "schedule": "constant"},
        "train": {"steps": STEPS, "log_every": 1, "progress": False, "device": "cpu"},
        # 33 sequences in batches of 16: rank 0 has 1 batch, rank 1 two, so a sharded
        # model only evaluates if the ranks keep their forward passes in step.
        "eval": {"every": 6, "max_sequences": 33, "batch_size": 16},
        "checkpoint": {"every": 4, "keep": 2},
        "distributed": {"timeout_s": 60},  # a hang fails the test within a minute
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    (root / "hooks").mkdir()
    (root / "hooks" / "sitecustomize.py").write_text(TEST_HOOKS)
    (root / "killer.py").write_text(KILLER)
    return root


def _env(workspace: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(workspace / "hooks"), env.get("PYTHONPATH")])
    )
    return {**env, "WANDB_MODE": "disabled", **extra}


def _llama_train(workspace: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llama_train", "run", str(workspace / "config.yaml"), *args],
        env=_env(workspace, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _curve(run_dir: Path) -> list[dict]:
    return [
        {key: record[key] for key in CURVE_KEYS if key in record}
        for record in read_metrics(run_dir)
    ]


def _assert_close_curves(got: list[dict], expected: list[dict]) -> None:
    """The same lines, numbers equal up to float rounding of cross-rank reductions."""
    assert [line.keys() for line in got] == [line.keys() for line in expected]
    assert len(expected) == STEPS + 2  # a line per step, evaluations at 6 and 12
    for line, reference in zip(got, expected, strict=True):
        for key, value in reference.items():
            assert math.isclose(line[key], value, rel_tol=1e-5, abs_tol=1e-7), (
                key,
                line,
                reference,
            )


@pytest.fixture(scope="module")
def one_process(workspace: Path) -> Path:
    """The reference: 1 process, 2 accumulation steps of 8 sequences."""
    run_dir = workspace / "one_process"
    _ok(_llama_train(workspace, f"run.dir={run_dir}", "train.grad_accum=2"))
    return run_dir


@pytest.fixture(scope="module")
def two_processes(workspace: Path) -> Path:
    """2 processes (DDP) of 8 sequences each: the same 16 rows per step."""
    run_dir = workspace / "two_processes"
    _ok(_llama_train(workspace, "--nproc", "2", f"run.dir={run_dir}"))
    return run_dir


def test_two_ddp_processes_give_the_loss_curve_of_one_process_with_accumulation(
    one_process, two_processes
):
    _assert_close_curves(_curve(two_processes), _curve(one_process))
    summary = (two_processes / "summary.json").read_text()
    assert '"tokens": 3072' in summary  # 12 steps x 16 sequences x 16 predicted tokens
    # Rank 0 alone writes the run's files: one metrics line per step, one eval file each.
    assert sorted(p.name for p in (two_processes / "eval").iterdir()) == [
        "step_000006.json",
        "step_000012.json",
    ]


def test_fsdp_on_two_processes_matches_and_its_checkpoint_resumes_on_one(workspace, one_process):
    run_dir = workspace / "fsdp_then_one"
    fsdp = ("distributed.strategy=fsdp", "train.steps=6")
    first = _ok(_llama_train(workspace, "--nproc", "2", f"run.dir={run_dir}", *fsdp))
    assert "2 x cpu (fsdp)" in first.stderr
    shards = sorted(p.name for p in (run_dir / "checkpoints" / "step_000006" / "dcp").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    # Rank 0 gathered the shards into full weights beside them (what eval and export read).
    model, _ = load_model(run_dir, checkpoint=6)
    sharded = CheckpointManager(run_dir / "checkpoints", keep=None).load(6)["model"]
    assert sharded.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, sharded[name]), name
    resumed = _ok(_llama_train(workspace, f"run.dir={run_dir}", "train.grad_accum=2"))
    assert "resuming" in resumed.stderr and "from step 6" in resumed.stderr
    assert "distributed.strategy: fsdp -> ddp" in resumed.stderr
    _assert_close_curves(_curve(run_dir), _curve(one_process))


def test_a_one_process_checkpoint_resumes_on_two_processes(workspace, one_process):
    run_dir = workspace / "one_then_two"
    _ok(_llama_train(workspace, f"run.dir={run_dir}", "train.grad_accum=2", "train.steps=6"))
    resumed = _ok(_llama_train(workspace, "--nproc", "2", f"run.dir={run_dir}"))
    assert "from step 6" in resumed.stderr and "2 x cpu (ddp)" in resumed.stderr
    _assert_close_curves(_curve(run_dir), _curve(one_process))


def test_sigkill_of_every_rank_then_the_same_command_gives_the_uninterrupted_losses(
    workspace, two_processes
):
    run_dir = workspace / "killed"
    killed = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(workspace / "killer.py"),
            "run",
            str(workspace / "config.yaml"),
            f"run.dir={run_dir}",
        ],
        env=_env(workspace, KILL_AT_STEP="10"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert not (run_dir / "summary.json").exists()
    assert max(r["step"] for r in read_metrics(run_dir)) == 10
    assert CheckpointManager(run_dir / "checkpoints").steps() == [4, 8]
    resumed = _ok(_llama_train(workspace, "--nproc", "2", f"run.dir={run_dir}"))
    assert "from step 8" in resumed.stderr
    assert _curve(run_dir) == _curve(two_processes)  # exact: same ranks, same arithmetic


def _preempt(workspace: Path, run_dir: Path, sig: signal.Signals, *args: str) -> tuple[int, str]:
    """Start a slowed-down run, send `sig` after its second step; (exit code, stderr)."""
    config = str(workspace / "config.yaml")
    process = subprocess.Popen(
        [sys.executable, "-m", "llama_train", "run", config, f"run.dir={run_dir}", *args],
        env=_env(workspace, TEST_STEP_DELAY_S="0.25"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert process.poll() is None and time.monotonic() < deadline, "the run never started"
        time.sleep(0.05)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


def _preempted_step(stderr: str, run_dir: Path) -> int:
    lines = [line for line in stderr.splitlines() if line.startswith("preempted at step")]
    assert len(lines) == 1, stderr[-3000:]  # one line, from rank 0 only
    match = re.fullmatch(
        r"preempted at step (\d+): checkpoint (\S+); run the same command again to resume",
        lines[0],
    )
    assert match, lines[0]
    step = int(match.group(1))
    assert Path(match.group(2)) == run_dir / "checkpoints" / f"step_{step:06d}"
    assert 2 <= step < STEPS and step in CheckpointManager(run_dir / "checkpoints").steps()
    return step


def test_sigterm_to_a_two_process_launch_checkpoints_exits_3_and_the_same_command_resumes(
    workspace, two_processes
):
    run_dir = workspace / "sigterm"
    code, stderr = _preempt(workspace, run_dir, signal.SIGTERM, "--nproc", "2")
    assert code == PREEMPTED_EXIT_CODE, stderr[-3000:]
    step = _preempted_step(stderr, run_dir)
    assert max(r["step"] for r in read_metrics(run_dir)) == step
    resumed = _ok(_llama_train(workspace, "--nproc", "2", f"run.dir={run_dir}"))
    assert f"from step {step}" in resumed.stderr
    assert _curve(run_dir) == _curve(two_processes)


def test_sigusr1_to_a_single_process_checkpoints_exits_3_and_the_same_command_resumes(
    workspace, one_process
):
    run_dir = workspace / "sigusr1"
    code, stderr = _preempt(workspace, run_dir, signal.SIGUSR1, "train.grad_accum=2")
    assert code == PREEMPTED_EXIT_CODE, stderr[-3000:]
    step = _preempted_step(stderr, run_dir)
    resumed = _ok(_llama_train(workspace, f"run.dir={run_dir}", "train.grad_accum=2"))
    assert f"from step {step}" in resumed.stderr
    assert _curve(run_dir) == _curve(one_process)


def test_a_user_error_on_one_rank_stops_every_rank_at_once_with_one_message(workspace):
    started = time.monotonic()
    result = _llama_train(
        workspace, "--nproc", "2", f"run.dir={workspace / 'broken'}", TEST_FAIL_RANK="1"
    )
    assert result.returncode == 1
    assert time.monotonic() - started < 60  # not the 60 s collective timeout, nor a hang
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: cannot read the store from this node (test)"], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
