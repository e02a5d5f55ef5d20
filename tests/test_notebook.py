"""notebooks/runs.ipynb runs top to bottom on a tiny run made here (nbclient, a real kernel)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from llama_train.recipe.train import train
from llama_train.recipe.train_config import resolve_config

# A real kernel running the notebook on a trained run: excluded from `make test-fast`.
pytestmark = pytest.mark.integration

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "runs.ipynb"


def test_the_runs_notebook_executes_and_draws_every_run(
    tmp_path: Path, write_preset_store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = write_preset_store(
        tmp_path / "debug.zarr", "debug", n_train=64, n_test=16, seq_len=9, block_size=32
    )
    sweep = tmp_path / "sweep"
    for lr in ("0.001", "0.003"):
        config = resolve_config(
            None,
            [
                f"data.path={store}",
                f"run.dir={sweep / f'optim.lr={lr}'}",
                f"optim.lr={lr}",
                "model.dim=16",
                "model.n_layers=1",
                "model.n_heads=2",
                "data.batch_size=8",
                "train.steps=4",
                "train.log_every=2",
                "eval.every=2",
            ],
        )
        train(config, progress=False)
    monkeypatch.setenv("LLAMA_TRAIN_RUNS", str(sweep))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    listed = next(o for o in outputs if "text/plain" in o.get("data", {}))
    assert "optim.lr=0.001" in listed["data"]["text/plain"]
    figures = [o["data"] for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(figures) == 2  # the report figure and the throughput figure
    names = {trace.get("name") for trace in figures[0]["application/vnd.plotly.v1+json"]["data"]}
    assert {"optim.lr=0.001", "optim.lr=0.003"} <= names
    assert any("image/png" in o.get("data", {}) for o in outputs)
