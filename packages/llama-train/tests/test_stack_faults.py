"""Faults in a stack: kill -9 at any moment, and a member that goes non-finite.

A stack trains several study points in one process, so a fault there must spoil no
member: `study run` killed with SIGKILL mid-step, mid-checkpoint (one member's
checkpoint published, the next one's half written), while a stacked trunk forks its
cooldown branch or in the middle of a stack of branches is resumed by the same
command, and every point (and branch) ends with the metrics, evaluations and summary
of a study that was never interrupted, step for step. A member whose loss goes
non-finite stops with its reason in its own run directory and in `study status`, and
the members beside it end as they do without it.
Each test is a row of the Reliability table (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llama_train.cli import app
from llama_train.rundir import read_metrics, read_state

runner = CliRunner()
SEQ_LEN = 17
DETERMINISTIC_KEYS = ("step", "loss", "grad_norm", "lr", "tokens", "epoch", "eval/loss")

# `study run` with a SIGKILL hook chosen by KILL (the kill is real: no handler runs).
#   step:K     as the stack starts step K + 1
#   branch:K   as a stack of cooldown branches starts step K + 1
#   weights:N  right after the N-th model.safetensors is written into its checkpoint's
#              temporary folder, before that checkpoint is published
#   fork:N     once a branch fork has done its N-th copy (records or checkpoint)
KILLER = """
import os, signal, sys
from llama_train.recipe import branches, train
from llama_train.cli import app
from llama_train.recipe.train_stack import StackTrainer

kind, _, value = os.environ["KILL"].partition(":")

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if kind in ("step", "branch"):
    step = StackTrainer.train_step
    def train_step(self, batches):
        branches = self.lead.run_dir.parent.name == "branches"
        if self.step == int(value) and branches == (kind == "branch"):
            die()
        return step(self, batches)
    StackTrainer.train_step = train_step
elif kind == "weights":
    write = train.write_weights
    calls = [0]
    def write_weights(*args, **kwargs):
        write(*args, **kwargs)
        calls[0] += 1
        if calls[0] == int(value):
            die()
    train.write_weights = write_weights
elif kind == "fork":
    copies = [0]
    def dying(copy):
        def wrapped(*args, **kwargs):
            copy(*args, **kwargs)
            copies[0] += 1
            if copies[0] == int(value):
                die()
        return wrapped
    branches._copy_checkpoint = dying(branches._copy_checkpoint)
    branches._copy_records = dying(branches._copy_records)
app(["study", "run", sys.argv[1]], prog_name="llama-train")
"""


@pytest.fixture(scope="module")
def store(make_debug_store) -> Path:
    return make_debug_store(n_train=192, n_test=32, seq_len=SEQ_LEN, block_size=32)


def _study(tmp_path: Path, store: Path, name: str, **extra: object) -> Path:
    """Four points of one shape (lr x seed): one stack; checkpoints every 2 steps."""
    base = tmp_path / "base.yaml"
    base.write_text(
        yaml.safe_dump(
            {
                "data": {"path": str(store), "batch_size": 8},
                "model": {"dim": 8, "n_layers": 1, "n_heads": 2},
                "optim": {"warmup_steps": 1, "grad_clip": 0.5},
                "train": {"threads": 1, "log_every": 1, "progress": False},
                "eval": {"batch_size": 16},
                "checkpoint": {"every": 2},
            }
        )
    )
    study = {
        "dir": str(tmp_path / name),
        "base": str(base),
        "regimes": [{"name": "debug", "store": str(store)}],
        "models": [{"name": "small", "model": {"dim": 8, "n_heads": 2}}],
        "data": [64],
        "steps": {"steps": 8},
        "evaluations": 2,
        "lr": [1e-2, 3e-2],
        "seeds": [0, 1],
        "validation_sequences": 32,
        **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _python(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _runs(directory: Path) -> dict[str, dict]:
    """Every run (point or branch) under a study directory: what must not depend on a kill."""
    found = {}
    for metrics in sorted(directory.rglob("metrics.jsonl")):
        run_dir = metrics.parent
        summary = run_dir / "summary.json"
        found[str(run_dir.relative_to(directory))] = {
            "metrics": [
                {k: r[k] for k in DETERMINISTIC_KEYS if k in r}
                for r in read_metrics(run_dir)
                if any(k in r for k in ("loss", "eval/loss"))
            ],
            "evaluations": sorted(p.name for p in (run_dir / "eval").glob("*.json")),
            "test_loss": json.loads(summary.read_text())["test_loss"] if summary.exists() else None,
        }
    return found


def _latest_checkpoints(directory: Path) -> list[int]:
    """Each run's (point's or branch's) newest published checkpoint step, sorted (0: none)."""
    steps = []
    for point in sorted(config.parent for config in directory.rglob("config.yaml")):
        published = [int(c.name[5:]) for c in (point / "checkpoints").glob("step_*")]
        steps.append(max(published, default=0))
    return sorted(steps)


BRANCHED = {
    "branches": True,
    "data": [32, 64],
    "steps": {"epochs": 1},
    "seeds": [0],
    "overrides": {
        "optim.schedule": "wsd",
        "optim.decay_fraction": 0.5,
        "optim.warmup_tokens_per_parameter": 0.3,
    },
}


def _run_once(tmp_path: Path, store: Path, **extra: object) -> dict[str, dict]:
    """The runs of a study trained here without interruption."""
    result = runner.invoke(app, ["study", "run", str(_study(tmp_path, store, "once", **extra))])
    assert result.exit_code == 0, result.output
    found = _runs(tmp_path / "once")
    assert found and all(run["test_loss"] is not None for run in found.values())
    return found


@pytest.fixture(scope="module")
def plain(store, tmp_path_factory) -> dict[str, dict]:
    return _run_once(tmp_path_factory.mktemp("plain"), store)


@pytest.fixture(scope="module")
def branched(store, tmp_path_factory) -> dict[str, dict]:
    return _run_once(tmp_path_factory.mktemp("branched"), store, **BRANCHED)


def _killed_and_resumed(
    tmp_path: Path,
    store: Path,
    kill: str,
    expected: dict[str, dict],
    *,
    left: list[int] | None = None,
    **extra: object,
) -> None:
    """Kill `study run` where `kill` says (leaving the points' newest checkpoints at `left`),
    run the same command, compare with the study run once (`expected`)."""
    path = _study(tmp_path, store, "killed", **extra)
    killed = _python(["-c", KILLER, str(path)], tmp_path, KILL=kill)
    assert killed.returncode == -9, killed.stderr
    assert "in 1 stacks" in " ".join((killed.stdout + killed.stderr).split())
    assert _runs(tmp_path / "killed") != expected  # the kill really cut the study short
    if left is not None:
        assert _latest_checkpoints(tmp_path / "killed") == left

    resumed = _python(["-m", "llama_train", "study", "run", str(path)], tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert _runs(tmp_path / "killed") == expected


@pytest.mark.integration
@pytest.mark.parametrize(
    ("kill", "left"),
    [
        ("step:5", [4, 4, 4, 4]),  # after the checkpoints of step 4: step 5 is retrained
        # Step 4: the first member's checkpoint published, the second's half written (its
        # weights in the temporary folder), the others not begun: two stacks resume.
        ("weights:6", [2, 2, 2, 4]),
    ],
    ids=["mid-step", "mid-checkpoint"],
)
def test_a_stack_killed_with_sigkill_resumes_every_member_step_for_step(
    tmp_path, store, plain, kill, left
):
    _killed_and_resumed(tmp_path, store, kill, plain, left=left)


@pytest.mark.integration
@pytest.mark.parametrize("kill", ["fork:1", "fork:2"], ids=["first-copy", "second-copy"])
def test_a_stacked_trunk_killed_while_forking_a_branch_resumes_step_for_step(
    tmp_path, store, branched, kill
):
    """Killed between the fork's two copies (the trunk's records, then its checkpoint,
    whose publication makes the fork done) and after both."""
    _killed_and_resumed(tmp_path, store, kill, branched, **BRANCHED)


@pytest.mark.integration
def test_a_stack_of_branches_killed_with_sigkill_resumes_step_for_step(tmp_path, store):
    """The trunks' branches (8 steps, forked at step 4) train as one stack after the
    trunks: killed after the branches' own checkpoints of step 6, the same command
    resumes each branch from them."""
    extra = {
        **BRANCHED,
        "data": [64, 128],
        "overrides": {"optim.schedule": "wsd", "optim.decay_fraction": 0.5},
    }
    expected = _run_once(tmp_path, store, **extra)
    _killed_and_resumed(tmp_path, store, "branch:7", expected, left=[6, 6, 16, 16], **extra)


# ---------------------------------------------------------------------------
# A member goes non-finite


def test_a_diverging_member_is_recorded_and_the_others_equal_a_stack_without_it(
    tmp_path, store, plain
):
    path = _study(tmp_path, store, "bad", lr=[1e-2, 3e-2, 1e30])
    result = runner.invoke(app, ["study", "run", str(path)])
    said = " ".join(result.output.split())
    assert "6 points to train, in 1 stacks" in said, result.output
    directory = tmp_path / "bad"
    diverged = ["debug_small_n64_lr1e+30_s0", "debug_small_n64_lr1e+30_s1"]
    for name in diverged:
        state = read_state(directory / name)
        assert state.state == "failed", state
        assert state.message.startswith("gradient norm nan at step "), state
        assert "\n" not in state.message
        assert not (directory / name / "summary.json").exists()
        assert f"failed {name}: gradient norm nan at step " in said

    status = runner.invoke(app, ["study", "status", str(directory), "--json"])
    assert status.exit_code == 0, status.output
    by_name = {point["name"]: point for point in json.loads(status.output)}
    for name in diverged:
        assert by_name[name]["state"] == "failed"
        assert by_name[name]["message"] == read_state(directory / name).message
    table = " ".join(runner.invoke(app, ["study", "status", str(directory)]).output.split())
    assert "2 failed" in table and "4 done" in table

    assert len(plain) == 4
    bad = _runs(directory)
    for name, run in plain.items():
        assert bad[name] == run, name
        assert read_state(directory / name).state == "done"
