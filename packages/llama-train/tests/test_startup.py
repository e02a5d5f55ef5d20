"""Claims about start-up: a short run's process does not pay for what it does not use.

`--help` and `--version` load no torch; summary.json says how much CPU the process
spent before its first step.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from llama_train.recipe.train import train
from llama_train.recipe.train_config import resolve_config


def _fresh_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize(
    "argv",
    [["llama_train.cli", "--help"], ["llama_train.cli", "--version"], ["gssm_data.cli", "--help"]],
)
def test_help_and_version_do_not_import_torch(argv: list[str]) -> None:
    module, option = argv
    done = _fresh_python(
        f"""
        import sys
        sys.argv = ["prog", {option!r}]
        from {module} import main
        try:
            main()
        except SystemExit:
            pass
        print("torch" in sys.modules, file=sys.stderr)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "printed nothing"
    assert done.stderr.strip().splitlines()[-1] == "False"


def test_the_summary_reports_the_cpu_spent_before_the_first_step(
    make_debug_store, tmp_path: Path
) -> None:
    store = make_debug_store(n_train=64, n_test=16, seq_len=17)
    config = resolve_config(
        None,
        [
            f"data.path={store}",
            f"run.dir={tmp_path / 'run'}",
            "data.batch_size=8",
            "model.dim=16",
            "model.n_layers=1",
            "model.n_heads=2",
            "train.steps=3",
            "train.progress=false",
        ],
    )
    before = time.process_time()
    summary = train(config)
    after = time.process_time()
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["startup_cpu_seconds"] == summary["startup_cpu_seconds"]
    # This process's CPU clock at the first step: after the call began, before it ended.
    assert before <= summary["startup_cpu_seconds"] <= after
