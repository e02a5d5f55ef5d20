"""A forged run directory cannot run code: not through eval, export, load_model or resume.

The forger here does what a real one would: plants a pickle whose unpickling
runs code in the DCP metadata (and in a non-tensor DCP entry), then recomputes
every checksum in meta.json so that the folder passes its integrity checks.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from typer.testing import CliRunner

from llama_train import load_model
from llama_train.cli import app
from llama_train.core.dcp_reader import SafeLoadPlanner, UnsafeCheckpointError, load_metadata

runner = CliRunner()


class _Payload:
    """Unpickling this creates `marker`: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.fixture(scope="module")
def trained(tiny_run) -> tuple[Path, Path]:
    """The session's finished 2-step run (conftest): (config file, run directory)."""
    return tiny_run.config, tiny_run.run_dir


def _reseal(folder: Path) -> None:
    """Recompute meta.json's sizes and sha256 as a forger would."""
    meta = json.loads((folder / "meta.json").read_text())
    for name in meta["files"]:
        data = (folder / name).read_bytes()
        meta["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.fixture()
def forged(trained, tmp_path) -> tuple[Path, Path, Path]:
    """A copy of the run whose DCP metadata runs code when unpickled: (config, run, marker)."""
    config, run_dir = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    marker = tmp_path / "marker"
    folder = copy / "checkpoints" / "step_000002"
    (folder / "dcp" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    _reseal(folder)
    forged_config = tmp_path / "tiny.yaml"
    raw = yaml.safe_load(config.read_text())
    raw["run"]["dir"] = str(copy)
    raw["train"]["steps"] = 4  # resume past the forged checkpoint
    forged_config.write_text(yaml.safe_dump(raw))
    return forged_config, copy, marker


@pytest.mark.integration
def test_the_plain_pickle_would_run_code(forged):
    # The test's own premise: unpickling the planted file with pickle does create the marker.
    _, run_dir, marker = forged
    pickle.loads((run_dir / "checkpoints/step_000002/dcp/.metadata").read_bytes())
    assert marker.read_text() == "pwned"


@pytest.mark.integration
def test_eval_and_load_model_of_a_forged_run_never_unpickle(forged, trained):
    _, run_dir, marker = forged
    result = runner.invoke(app, ["eval", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    original = runner.invoke(app, ["eval", str(trained[1]), "--json"])
    assert json.loads(result.output)["loss"] == json.loads(original.output)["loss"]
    model, config = load_model(run_dir)
    assert config.model.dim == 16 and sum(p.numel() for p in model.parameters()) > 0
    assert not marker.exists()


@pytest.mark.integration
def test_export_of_a_forged_run_never_unpickles(forged, tmp_path):
    _, run_dir, marker = forged
    result = runner.invoke(
        app, ["export", str(run_dir), "--format", "state-dict", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 0, result.output
    assert not marker.exists()


@pytest.mark.integration
def test_resuming_a_forged_run_refuses_in_one_line_without_running_code(forged):
    config, _, marker = forged
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "builtins.exec" in errors[0] and "refusing" in errors[0]
    assert "Traceback" not in result.output
    assert not marker.exists()


def test_a_non_tensor_dcp_entry_is_read_without_running_code(tmp_path):
    marker = tmp_path / "marker"
    buffer = io.BytesIO()
    torch.save(_Payload(marker), buffer)
    buffer.seek(0)
    planner = SafeLoadPlanner()
    planner.flatten_state_dict = False
    planner.state_dict = {}

    item = SimpleNamespace(dest_index=SimpleNamespace(fqn="optimizer.param_groups.0.lr"))

    with pytest.raises(UnsafeCheckpointError, match="refusing to load it"):
        planner.load_bytes(item, buffer)  # type: ignore[arg-type]
    assert not marker.exists()


@pytest.mark.integration
def test_sound_metadata_still_loads(trained):
    _, run_dir = trained
    path = run_dir / "checkpoints/step_000002/dcp/.metadata"
    with open(path, "rb") as file:
        metadata = load_metadata(file, source=str(path))
    assert "model.tok_embeddings.weight" in metadata.state_dict_metadata


@pytest.mark.integration
def test_a_checkpoint_without_safetensors_weights_is_refused_in_one_line(trained, tmp_path):
    _, run_dir = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    folder = copy / "checkpoints" / "step_000002"
    (folder / "model.safetensors").unlink()
    meta = json.loads((folder / "meta.json").read_text())
    del meta["files"]["model.safetensors"]
    (folder / "meta.json").write_text(json.dumps(meta))  # as an older llama-train wrote it
    result = runner.invoke(app, ["eval", str(copy)])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "has no model.safetensors" in result.output
