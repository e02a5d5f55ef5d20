"""Shared fixtures of the cross-package tests: the installed commands, no network.

These tests run the console scripts the way a user does (subprocesses), so
the environment they get matters: wandb is pointed at a temporary directory
and kept offline-or-off, so no test can reach the network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from gssm_data.generate import GenerateOptions, generate
from gssm_data.presets import load_preset


@pytest.fixture(autouse=True)
def no_network_logging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """wandb never uploads from a test, and writes only under the test's directory."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")


def _command(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"the console script {name} is not installed (make venv)")
    return found


@pytest.fixture()
def cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run `gssm-data ...` or `llama-train ...` in the test's directory; fail with its stderr."""

    def run(name: str, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [_command(name), *arguments],
            cwd=tmp_path,
            env=os.environ.copy(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        if check and result.returncode != 0:
            pytest.fail(
                f"{name} {' '.join(arguments)} exited {result.returncode}:\n{result.stderr}"
            )
        return result

    return run


@pytest.fixture(scope="session")
def write_preset_store() -> Callable[..., Path]:
    """`write(out, preset, n_train=..., n_test=..., seq_len=..., **options)`: a real store.

    The one way the cross-package tests and benchmarks make their data, in
    process (no console script); `options` are further GenerateOptions fields
    (block_size, workers).
    """

    def write(out: Path, preset: str, **options: object) -> Path:
        generate(GenerateOptions(graph=load_preset(preset), name=preset, out=out, **options))
        return out

    return write
