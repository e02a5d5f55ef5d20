"""train.compile_cache: where torch.compile keeps what it compiled, so that runs of one
model shape compile it once between them, each in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llama_train.cli import app
from llama_train.core.compile_cache import compile_cache
from llama_train.errors import LlamaTrainError

CACHE_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"


def test_the_cache_directory_holds_for_the_block_only(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_VARIABLE, str(tmp_path / "before"))
    with compile_cache(tmp_path / "shared" / "cache"):
        assert os.environ[CACHE_VARIABLE] == str(tmp_path / "shared" / "cache")
        assert (tmp_path / "shared" / "cache").is_dir()
    assert os.environ[CACHE_VARIABLE] == str(tmp_path / "before")
    with compile_cache(None):  # unset: torch's own choice stands
        assert os.environ[CACHE_VARIABLE] == str(tmp_path / "before")


def test_a_cache_directory_that_cannot_be_made_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    refused = pytest.raises(LlamaTrainError, match=r"train.compile_cache: cannot create .*a-file/c")
    with refused, compile_cache(blocker / "c"):
        pass


def test_a_run_whose_cache_cannot_be_made_stops_in_one_line_before_writing(
    make_debug_store, tmp_path
):
    store = make_debug_store(n_train=32, n_test=16, seq_len=17)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    run_dir = tmp_path / "run"
    base = tmp_path / "base.yaml"
    base.write_text(f"data: {{path: {store}}}\nmodel: {{dim: 16, n_heads: 1}}\n")
    overrides = [f"run.dir={run_dir}", "train.compile=true", f"train.compile_cache={blocker}/c"]
    result = CliRunner().invoke(app, ["run", str(base), *overrides])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: train.compile_cache: cannot create {blocker / 'c'}: Not a directory"
    ]
    assert not run_dir.exists()


def _graphs(cache: Path) -> set[Path]:
    """The cache's compiled graphs: inductor's FX graphs and AOT autograd's entries."""
    return {
        path.relative_to(cache)
        for kind in ("fxgraph", "aotautograd")
        for path in (cache / kind).rglob("*")
        if path.is_file()
    }


@pytest.mark.slow
def test_a_second_run_of_the_shape_loads_every_graph_from_the_cache(make_debug_store, tmp_path):
    """Two runs of one shape (different lr), each in a fresh process, share a cache: the
    first compiles into it, the second finds every graph there (it adds none; a graph
    it missed would be compiled and written). About a minute of code generation."""
    store = make_debug_store(n_train=64, n_test=16, seq_len=17)
    cache = tmp_path / "cache"
    base = tmp_path / "base.yaml"
    base.write_text(
        f"""
data: {{path: {store}, batch_size: 4}}
model: {{dim: 16, n_layers: 1, n_heads: 1}}
train: {{steps: 2, threads: 1, progress: false, compile: true, compile_cache: {cache}}}
"""
    )

    command = [sys.executable, "-m", "llama_train", "run", str(base)]

    def run(name: str, lr: str) -> None:
        done = subprocess.run(
            [*command, f"run.dir={tmp_path / name}", f"optim.lr={lr}"],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert (tmp_path / name / "summary.json").is_file()

    run("first", "1e-3")
    compiled = _graphs(cache)
    assert compiled, "the first run wrote no graph into train.compile_cache"
    run("second", "3e-3")
    assert _graphs(cache) == compiled


def test_without_torchs_helper_the_variable_alone_points_the_cache(tmp_path, monkeypatch):
    """Older torch has no temporary_cache_dir: the environment variable does the job."""
    import os

    from llama_train.core import compile_cache as module

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/before")
    with module._cache_dir_variable(str(tmp_path)):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/before"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    with module._cache_dir_variable(str(tmp_path)):
        pass
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
