"""Stores written by Slurm array tasks: the sbatch script, submission (a stand-in sbatch),
the tasks' own entry point run in-process, and scaling recipes on Slurm."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gssm_data.cli import app
from gssm_data.errors import GssmDataError
from gssm_data.generate import GenerateOptions, generate
from gssm_data.presets import load_preset
from gssm_data.slurm import (
    SlurmSettings,
    array_script,
    job_dir,
    main,
    submit_generate,
    submit_scaling,
    write_options,
)
from gssm_data.store import open_store

runner = CliRunner()


def _options(out: Path, **changes: object) -> GenerateOptions:
    values = {
        "graph": load_preset("debug"),
        "name": "debug",
        "out": out,
        "n_train": 300,
        "n_test": 100,
        "seq_len": 9,
        "block_size": 64,  # 5 + 2 blocks: both tasks have several
        **changes,
    }
    return GenerateOptions(**values)


@pytest.fixture()
def sbatch_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in `sbatch` on PATH: records its arguments, answers job ids 101, 102, ..."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "sbatch-calls.jsonl"
    script = bin_dir / "sbatch"
    script.write_text(
        "#!/usr/bin/env python3\n"
        "import json, sys\n"
        f"log = {str(calls)!r}\n"
        "count = sum(1 for _ in open(log)) if __import__('os').path.exists(log) else 0\n"
        "open(log, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "print(101 + count)\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls


def _calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_the_array_script_gives_each_task_its_shard_and_the_resources(tmp_path):
    settings = SlurmSettings(partition="cpu", time="1:00:00", cpus_per_task=4, mem="8G")
    script = array_script(
        tmp_path / "s.zarr.slurm" / "options.json",
        tasks=8,
        settings=settings,
        job_name="gssm-hmm",
        python="/venv/bin/python",
    )
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in (
        "--array=0-7",
        "--job-name=gssm-hmm",
        "--cpus-per-task=4",
        "--partition=cpu",
        "--time=1:00:00",
        "--mem=8G",
        f"--output={tmp_path}/s.zarr.slurm/%A_%a.out",
    ):
        assert f"#SBATCH {directive}" in lines
    assert lines[-1] == (
        f"exec /venv/bin/python -m gssm_data.slurm shard {tmp_path}/s.zarr.slurm/options.json "
        '--shard "$SLURM_ARRAY_TASK_ID/8"'
    )


@pytest.mark.parametrize(
    ("settings", "tasks", "message"),
    [
        (SlurmSettings(), 0, "--tasks must be at least 1"),
        (SlurmSettings(cpus_per_task=0), 2, "--cpus-per-task must be at least 1"),
        (SlurmSettings(time="an hour"), 2, "--time 'an hour'"),
    ],
)
def test_bad_array_settings_are_user_errors(tmp_path, settings, tasks, message):
    with pytest.raises(GssmDataError, match=message):
        array_script(tmp_path / "o.json", tasks=tasks, settings=settings, job_name="x")


def test_submitting_saves_the_options_and_script_beside_the_store_and_returns_the_job_id(
    tmp_path, sbatch_calls
):
    options = _options(tmp_path / "a.zarr")
    submitted = submit_generate(options, tasks=3, settings=SlurmSettings())
    folder = job_dir(tmp_path / "a.zarr")
    assert (submitted.job_id, submitted.tasks, submitted.job_dir) == ("101", 3, folder)
    assert _calls(sbatch_calls) == [["--parsable", str(folder / "generate.sbatch")]]
    saved = GenerateOptions.model_validate_json((folder / "options.json").read_text())
    assert saved == options.model_copy(update={"out": (tmp_path / "a.zarr").absolute()})
    assert "--array=0-2" in (folder / "generate.sbatch").read_text()


def test_the_tasks_write_the_bytes_of_one_local_generate(tmp_path):
    options = _options(tmp_path / "sharded.zarr")
    options_file = write_options(options, job_dir(options.out))
    # Task 1 first: the task that writes the last block publishes, whichever it is.
    assert main(["shard", str(options_file), "--shard", "1/2", "--workers", "1"]) == 0
    assert not options.out.exists()
    assert main(["shard", str(options_file), "--shard", "0/2", "--workers", "1"]) == 0
    generate(_options(tmp_path / "local.zarr"))
    sharded, local = open_store(options.out), open_store(tmp_path / "local.zarr")
    for split in ("train", "test"):
        assert (sharded.tokens(split)[:] == local.tokens(split)[:]).all()
    files = sorted(p.relative_to(local.path) for p in local.path.rglob("*") if p.is_file())
    for name in files:
        if name.name != "zarr.json" or name.parent != Path("."):
            assert (sharded.path / name).read_bytes() == (local.path / name).read_bytes(), name
    manifests = [store.manifest.model_dump(exclude={"created_at"}) for store in (sharded, local)]
    assert manifests[0] == manifests[1]


def test_a_complete_store_is_not_submitted_again_and_another_store_is_refused(
    tmp_path, sbatch_calls
):
    options = _options(tmp_path / "done.zarr")
    generate(options)
    assert submit_generate(options, tasks=2, settings=SlurmSettings()).job_id is None
    assert _calls(sbatch_calls) == []
    with pytest.raises(GssmDataError, match="holds another store"):
        submit_generate(options.model_copy(update={"seed": 5}), tasks=2, settings=SlurmSettings())
    with pytest.raises(GssmDataError, match="--force cannot be combined with Slurm tasks"):
        submit_generate(
            options.model_copy(update={"force": True}), tasks=2, settings=SlurmSettings()
        )


def test_a_task_with_an_unreadable_options_file_exits_1_with_one_line(tmp_path, capsys):
    assert main(["shard", str(tmp_path / "missing.json"), "--shard", "0/2"]) == 1
    assert capsys.readouterr().err.startswith("error: cannot read ")


def test_submit_command_prints_the_job_and_the_store_path(tmp_path, sbatch_calls, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(
        app,
        ["submit", "--tasks", "2", "--preset", "debug", "--n", "1000", "--n-test", "100",
         "--seq-len", "9", "--out", "s.zarr", "--partition", "debug"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"job 101 (2 tasks): {tmp_path / 's.zarr'}" in result.output
    assert (
        "#SBATCH --partition=debug" in (tmp_path / "s.zarr.slurm" / "generate.sbatch").read_text()
    )


def _two_regime_recipe(folder: Path, *, train_sizes: list[int]) -> Path:
    """A recipe of two debug regimes with explicit alphas (no calibration)."""
    recipe = {
        "seed": 1,
        "seq_len": 9,
        "regimes": [
            {"name": "a", "preset": "debug", "alpha": 0.5},
            {"name": "b", "preset": "debug", "alpha": 2.0, "target": "observed"},
        ],
        "scales": {"small": {"train_sizes": train_sizes, "n_test": 40}},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.integration
def test_a_scaling_recipe_is_one_array_per_regime_then_an_index_job_after_them(
    tmp_path, sbatch_calls
):
    recipe_path = _two_regime_recipe(tmp_path, train_sizes=[30, 100])
    out = tmp_path / "out"
    submitted = submit_scaling(
        recipe_path, scale="small", out_dir=out, tasks=2, settings=SlurmSettings()
    )
    assert [store.job_id for store in submitted.stores] == ["101", "102"]
    assert submitted.index_job_id == "103"
    index_call = _calls(sbatch_calls)[-1]
    assert "--dependency=afterok:101:102" in index_call
    assert "--kill-on-invalid-dep=yes" in index_call

    # What the cluster would run: every task of both arrays, then the index job.
    for store in submitted.stores:
        for shard in ("0/2", "1/2"):
            assert main(["shard", str(store.job_dir / "options.json"), "--shard", shard]) == 0
    command = submitted.index_script.read_text().splitlines()[-1].split()
    assert command[2:5] == ["-m", "gssm_data.slurm", "index"]
    assert main(command[4:]) == 0
    index = json.loads((out / "recipe" / "index-small.json").read_text())
    assert [item["store"] for item in index["regimes"]] == [
        str(store.path) for store in submitted.stores
    ]


def test_named_regimes_alone_are_submitted_and_indexed(tmp_path, sbatch_calls):
    recipe_path = _two_regime_recipe(tmp_path, train_sizes=[30])
    out = tmp_path / "out"
    submitted = submit_scaling(
        recipe_path, scale="small", out_dir=out, tasks=1, settings=SlurmSettings(), regimes=["b"]
    )
    assert len(submitted.stores) == 1 and submitted.index_job_id == "102"
    main(["shard", str(submitted.stores[0].job_dir / "options.json"), "--shard", "0/1"])
    command = submitted.index_script.read_text().splitlines()[-1].split()
    assert command[-2:] == ["--regimes", "b"]
    assert main(command[4:]) == 0
    index = json.loads((out / "recipe" / "index-small.json").read_text())
    assert [item["name"] for item in index["regimes"]] == ["b"]
