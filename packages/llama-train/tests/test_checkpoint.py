"""Checkpoints: atomic saves, retention with pending evaluations, corrupt fallback, RNG states."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from llama_train.core import checkpoint
from llama_train.core.checkpoint import (
    CheckpointManager,
    CorruptCheckpointWarning,
    TorchPayload,
    rng_state,
    save_file,
    set_rng_state,
)
from llama_train.errors import LlamaTrainError


def _training_state(step: int) -> dict[str, Any]:
    """What the trainer saves: a model and AdamW after one step, a loader position, RNGs."""
    torch.manual_seed(step)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "loader": {"next_row": 64 * step, "stream": {"source": "zarr", "seed": 0}},
        "rng": rng_state(),
        "step": step,
    }


def _assert_same(actual: Any, expected: Any) -> None:
    """Recursive equality for nested state dicts holding tensors."""
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            _assert_same(actual[key], expected[key])
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected)
        for a, b in zip(actual, expected, strict=True):
            _assert_same(a, b)
    else:
        assert actual == expected


def _hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_a_saved_state_loads_back_identical_and_restores_a_model(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    state = _training_state(3)
    folder = manager.save(3, state)
    step, loaded = manager.load_latest()
    assert step == 3 and folder.name == "step_000003"
    _assert_same(loaded, state)
    model = torch.nn.Linear(4, 3)
    model.load_state_dict(loaded["model"])
    meta = json.loads((folder / "meta.json").read_text())
    assert set(meta["files"]) == {"model_optim.pt", "state.pt"}
    assert meta["step"] == 3 and _hidden(tmp_path) == []


def test_no_checkpoint_yet_gives_none(tmp_path):
    assert CheckpointManager(tmp_path / "absent").load_latest() is None


_KILLED_MIDWAY = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import torch
    from llama_train.core.checkpoint import CheckpointManager, TorchPayload, save_file

    class DiesMidway(TorchPayload):
        def write(self, folder, payload):
            save_file(folder / self.filename, dict(payload))
            (folder / "second_shard.pt").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)

    directory = Path(sys.argv[1])
    CheckpointManager(directory).save(1, {"model": {"w": torch.ones(3)}, "step": 1})
    CheckpointManager(directory, payload=DiesMidway()).save(2, {"model": {"w": torch.zeros(3)}})
    """
)


def test_a_save_killed_midway_leaves_the_previous_checkpoint_as_latest(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", _KILLED_MIDWAY, str(tmp_path)], capture_output=True, timeout=120
    )
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    assert _hidden(tmp_path) == [".step_000002.tmp"]
    manager = CheckpointManager(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the killed save is not even a suspect
        step, state = manager.load_latest()
    assert step == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    manager.save(3, {"step": 3})
    assert _hidden(tmp_path) == [] and manager.steps() == [1, 3]


def test_an_error_during_a_save_leaves_no_folder_behind(tmp_path):
    class Fails(TorchPayload):
        def write(self, folder: Path, payload: dict[str, Any]) -> None:
            (folder / self.filename).write_bytes(b"partial")
            raise RuntimeError("boom")

    manager = CheckpointManager(tmp_path, payload=Fails())
    with pytest.raises(RuntimeError, match="boom"):
        manager.save(5, _training_state(5))
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_a_one_line_user_error_and_leaves_no_checkpoint(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep=2)
    manager.save(1, _training_state(1))

    def full_disk(descriptor: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.os, "fsync", full_disk)
    with pytest.raises(LlamaTrainError) as raised:
        manager.save(2, _training_state(2))
    message = str(raised.value)
    assert "no space left" in message and "step 2" in message and "\n" not in message
    monkeypatch.undo()
    assert manager.steps() == [1] and _hidden(tmp_path) == []
    assert manager.load_latest()[0] == 1


def test_keep_last_k_never_deletes_a_checkpoint_pending_evaluation(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    manager.save(100, {"step": 100})
    manager.mark_pending_eval(100)
    for step in (200, 300, 400):
        manager.save(step, {"step": step})
    assert manager.steps() == [100, 300, 400]
    assert manager.pending_eval() == [100]
    manager.clear_pending_eval(100)
    assert manager.steps() == [300, 400] and manager.pending_eval() == []
    assert _hidden(tmp_path) == []


def test_saving_an_existing_step_again_replaces_it(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    manager.save(7, {"step": 7, "value": 1})
    manager.save(7, {"step": 7, "value": 2})
    assert manager.load_latest() == (7, {"step": 7, "value": 2})
    assert _hidden(tmp_path) == []


def _flip_a_byte(folder: Path) -> None:
    path = folder / "model_optim.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(folder: Path) -> None:
    path = folder / "model_optim.pt"
    path.write_bytes(path.read_bytes()[:100])


def _drop_meta(folder: Path) -> None:
    (folder / "meta.json").unlink()


def _drop_state(folder: Path) -> None:
    (folder / "state.pt").unlink()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_flip_a_byte, "model_optim.pt fails its checksum"),
        (_truncate, "model_optim.pt has 100 bytes"),
        (_drop_meta, "meta.json is missing"),
        (_drop_state, "state.pt is missing"),
    ],
)
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_with_a_warning(
    tmp_path, damage, reason
):
    manager = CheckpointManager(tmp_path, keep=3)
    first = _training_state(1)
    manager.save(1, first)
    damage(manager.save(2, _training_state(2)))
    with pytest.warns(CorruptCheckpointWarning, match=reason):
        step, state = manager.load_latest()
    assert step == 1
    _assert_same(state, first)


def test_when_every_checkpoint_is_corrupt_the_error_names_each(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    _flip_a_byte(manager.save(1, _training_state(1)))
    _drop_meta(manager.save(2, _training_state(2)))
    with pytest.warns(CorruptCheckpointWarning), pytest.raises(LlamaTrainError) as raised:
        manager.load_latest()
    message = str(raised.value)
    assert "step_000002 (meta.json is missing" in message
    assert "step_000001 (model_optim.pt fails its checksum)" in message
    assert "\n" not in message


def test_an_unreadable_checkpoint_directory_is_a_user_error(tmp_path):
    not_a_directory = tmp_path / "checkpoints"
    not_a_directory.write_text("oops")
    with pytest.raises(LlamaTrainError, match="cannot read checkpoint directory"):
        CheckpointManager(not_a_directory).load_latest()
    with pytest.raises(LlamaTrainError, match="cannot write checkpoint step 1"):
        CheckpointManager(not_a_directory).save(1, {"step": 1})


def test_every_file_of_a_multi_file_payload_is_checksummed(tmp_path):
    class Sharded:
        """A payload in a folder of several files, as torch.distributed.checkpoint writes."""

        name = "sharded"

        def write(self, folder: Path, payload: dict[str, Any]) -> None:
            (folder / "payload").mkdir()
            for key, value in payload.items():
                save_file(folder / "payload" / f"{key}.pt", value)

        def read(self, folder: Path, map_location: str) -> dict[str, Any]:
            return {
                path.stem: torch.load(path, map_location=map_location, weights_only=True)
                for path in (folder / "payload").iterdir()
            }

    manager = CheckpointManager(tmp_path, keep=3, payload=Sharded())
    state = _training_state(1)
    manager.save(1, state)
    folder = manager.save(2, state)
    meta = json.loads((folder / "meta.json").read_text())
    assert set(meta["files"]) == {"payload/model.pt", "payload/optimizer.pt", "state.pt"}
    _assert_same(manager.load(2), state)
    (folder / "payload" / "optimizer.pt").write_bytes(b"garbage")
    with pytest.warns(CorruptCheckpointWarning, match="payload/optimizer.pt has 7 bytes"):
        assert manager.load_latest()[0] == 1
    with pytest.raises(LlamaTrainError, match="written as 'sharded'"):
        CheckpointManager(tmp_path).load(1)


def test_marking_a_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(LlamaTrainError, match="no checkpoint of step 5"):
        CheckpointManager(tmp_path).mark_pending_eval(5)


def _draws() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.standard_normal()), torch.rand(3)


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    CheckpointManager(tmp_path).save(1, {"rng": rng_state()})
    expected = _draws()
    _draws()  # move every generator on
    set_rng_state(CheckpointManager(tmp_path).load(1)["rng"])
    got = _draws()
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
