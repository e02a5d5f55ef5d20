"""Bad input to llama-train: one `error:` line, exit 1, nothing allocated, nothing submitted.

Every case here used to end in a traceback, a runaway allocation or a script
with injected lines; each test asserts the one line the user now sees.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llama_train.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def store(make_debug_store) -> Path:
    return make_debug_store(n_train=64, n_test=16, seq_len=9)


@pytest.fixture()
def base(store, tmp_path) -> dict:
    return {
        "data": {"path": str(store), "batch_size": 4},
        "model": {"dim": 16, "n_layers": 1, "n_heads": 2},
        "train": {"steps": 2, "progress": False, "threads": 1},
        "run": {"dir": str(tmp_path / "run")},
    }


def _write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def _one_error_line(result, *fragments: str) -> str:
    """The single `error:` line of a failed command, checked for each fragment."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# ---------------------------------------------------------------------------
# Config files


def test_a_non_utf8_config_is_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run: {name: caf\xe9}\n".encode("latin-1"))
    _one_error_line(runner.invoke(app, ["run", str(path)]), "is not UTF-8 text")


def test_a_directory_as_config_is_one_line(tmp_path):
    _one_error_line(runner.invoke(app, ["run", str(tmp_path)]), "is a directory")


def test_dev_zero_as_config_is_refused_without_reading_it():
    _one_error_line(runner.invoke(app, ["run", "/dev/zero"]), "not a regular file")


def test_a_huge_config_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as file:
        file.truncate(2 << 30)  # 2 GB, sparse: refused from its size alone
    _one_error_line(runner.invoke(app, ["run", str(path)]), "larger than the 1,048,576-byte limit")


def test_a_5000_deep_config_file_is_one_line(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("data: " + "[" * 5000 + "]" * 5000 + "\n")
    _one_error_line(runner.invoke(app, ["run", str(path)]), "nests deeper than 64 levels")


def test_a_5000_deep_override_is_one_line(base, tmp_path):
    config = _write(tmp_path / "c.yaml", base)
    result = runner.invoke(app, ["run", str(config), "optim.betas=" + "[" * 5000 + "]" * 5000])
    _one_error_line(result, "override optim.betas: the value nests deeper than 64 levels")


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("optim.lr=.nan", "optim.lr: nan is not a finite number"),
        ("optim.lr=1e999", "optim.lr: inf is not a finite number"),
        ("optim.betas=[0.9,-.inf]", "optim.betas[1]: -inf is not a finite number"),
    ],
)
def test_a_non_finite_override_is_one_line(base, tmp_path, override, fragment):
    config = _write(tmp_path / "c.yaml", base)
    _one_error_line(runner.invoke(app, ["run", str(config), override]), fragment)


def test_a_non_finite_sweep_value_is_one_line(base, tmp_path):
    config = _write(tmp_path / "c.yaml", base)
    result = runner.invoke(app, ["submit", str(config), "sweep.optim.lr=[1e-3,.nan]"])
    _one_error_line(result, "sweep.optim.lr[1]: nan is not a finite number")


def test_a_non_finite_number_in_a_config_file_is_one_line(base, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base) + "optim: {lr: .inf}\n")
    _one_error_line(runner.invoke(app, ["run", str(path)]), "non-finite number inf at optim.lr")


# ---------------------------------------------------------------------------
# Sizes beyond the machine: refused before anything is allocated


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("data.batch_size=1e9", "of activations for 1,000,000,000 sequences of 8 tokens"),
        ("model.dim=1e5", "parameters"),
        ("model.n_layers=100000", "parameters"),
    ],
)
def test_a_model_or_batch_beyond_the_machine_is_refused_with_the_estimate(
    base, tmp_path, override, fragment
):
    del base["model"]  # the default architecture (dim 256), as the overrides were meant for
    config = _write(tmp_path / "c.yaml", base)
    line = _one_error_line(
        runner.invoke(app, ["run", str(config), override]),
        "this run needs about",
        "of available RAM",
        fragment,
    )
    assert "lower model.dim, model.n_layers or data.batch_size" in line


def test_the_estimate_counts_parameters_exactly():
    from llama_train.core.budget import parameter_count
    from llama_train.core.model import Llama, ModelConfig

    for config in (
        ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=11, max_seq_len=8),
        ModelConfig(
            dim=24, n_layers=1, n_heads=2, vocab_size=7, max_seq_len=8, tie_embeddings=True
        ),
    ):
        assert parameter_count(config) == Llama(config).num_parameters()


# ---------------------------------------------------------------------------
# Sweeps and Slurm


def test_a_grid_of_10_to_the_8_points_is_refused_before_it_is_expanded(base, tmp_path):
    base["sweep"] = {
        "optim.lr": [1e-4 * (i + 1) for i in range(10)],
        "optim.weight_decay": [0.01 * i for i in range(10)],
        "optim.eps": [1e-8 * (i + 1) for i in range(10)],
        "optim.warmup_steps": list(range(10)),
        "optim.min_lr_ratio": [0.05 * i for i in range(10)],
        "optim.grad_clip": [0.5 * (i + 1) for i in range(10)],
        "train.steps": [10 * (i + 1) for i in range(10)],
        "model.dim": [16 * (i + 1) for i in range(10)],
    }
    config = _write(tmp_path / "c.yaml", base)
    result = runner.invoke(app, ["submit", str(config)])
    _one_error_line(result, "100,000,000 points is more than the 10,000")


def _fake_slurm_commands(bin_dir: Path, calls: Path, *, srun: bool) -> None:
    """`sbatch` that records its calls and fails like a cluster refusing a job; `srun`
    (only looked up, never run, at submission) when asked."""
    bin_dir.mkdir()
    scripts = {
        "sbatch": f'echo "$@" >> {calls}\n'
        'echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2\n'
        "exit 1\n"
    }
    if srun:
        scripts["srun"] = "exit 0\n"
    for name, body in scripts.items():
        script = bin_dir / name
        script.write_text("#!/bin/sh\n" + body)
        script.chmod(script.stat().st_mode | stat.S_IEXEC)


@pytest.fixture()
def fake_sbatch(tmp_path, monkeypatch) -> Path:
    """Fake `sbatch` and `srun` first on PATH (see _fake_slurm_commands); sbatch's call log."""
    calls = tmp_path / "sbatch-calls"
    _fake_slurm_commands(tmp_path / "bin", calls, srun=True)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return calls


def test_submit_when_sbatch_fails_is_one_line_with_its_message(base, tmp_path, fake_sbatch):
    config = _write(tmp_path / "c.yaml", base)
    result = runner.invoke(app, ["submit", str(config), "--partition", "nope"])
    _one_error_line(
        result,
        "sbatch refused the job: sbatch: error: Batch job submission failed: Invalid partition",
    )
    assert fake_sbatch.exists()  # it did run


@pytest.mark.parametrize("command", ["submit", "study"])
def test_without_srun_on_path_submission_is_one_line(base, store, tmp_path, monkeypatch, command):
    """A PATH with sbatch but no srun (submitit would raise `Could not detect "srun"`)."""
    calls = tmp_path / "sbatch-calls"
    _fake_slurm_commands(tmp_path / "bin", calls, srun=False)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    config = _write(tmp_path / "c.yaml", base)
    if command == "submit":
        args = ["submit", str(config)]
    else:
        study = {
            "dir": str(tmp_path / "study"),
            "base": str(config),
            "regimes": [{"name": "debug", "store": str(store)}],
            "models": [{"model": {"dim": 16}}],
            "data": [16],
            "steps": {"steps": 2},
            "lr": [1e-3],
            "validation_sequences": 16,
        }
        args = ["study", "run", "--slurm", str(_write(tmp_path / "study.yaml", study))]
    result = runner.invoke(app, args)
    _one_error_line(result, "srun not found: submit from a Slurm login node, or add --local")
    assert not calls.exists()  # sbatch never ran


@pytest.mark.parametrize(
    ("where", "value", "fragment"),
    [
        ("--partition", "gpu\nrm -rf ~", "--partition contains the control character \\n"),
        ("--mem", "64G\r", "--mem contains the control character \\r"),
        (
            "slurm.account",
            "lab\n#SBATCH --qos=high",
            "slurm.account: contains the control character \\n",
        ),
        (
            "slurm.setup",
            ["module load x\x00"],
            "slurm.setup.0: contains the control character \\x00",
        ),
        (
            "slurm.additional",
            {"exclude": "n1\nn2"},
            "slurm.additional.exclude: contains the control",
        ),
        ("run.name", "exp\rmore", "run.name: contains the control character \\r"),
        ("run.dir", "runs/a\nb", "run.dir: contains the control character \\n"),
    ],
)
def test_control_characters_bound_for_the_job_script_are_refused_before_any_script(
    base, tmp_path, fake_sbatch, where, value, fragment
):
    args = []
    if where.startswith("--"):
        args = [where, value]
    else:
        section, key = where.split(".")
        base.setdefault(section, {})[key] = value
    config = _write(tmp_path / "c.yaml", base)
    result = runner.invoke(app, ["submit", str(config), *args])
    _one_error_line(result, fragment)
    assert not fake_sbatch.exists()  # sbatch never ran
    assert not list(tmp_path.rglob("*.sh"))  # and no script was written
