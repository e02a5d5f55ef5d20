"""A damaged training chunk stops the run in one line naming the split and block.

Two kinds of damage: a chunk that still decodes but holds other tokens (it
would otherwise train silently), and one that no longer decodes (it would
otherwise be a codec traceback).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from typer.testing import CliRunner

from llama_train.cli import app
from llama_train.core.chunk_check import ChunkChecker

runner = CliRunner()


@pytest.fixture(scope="module")
def pristine(make_debug_store) -> Path:
    return make_debug_store(n_train=128, n_test=16, seq_len=9, block_size=64)  # 2 train blocks


@pytest.fixture()
def store(pristine, tmp_path) -> Path:
    copy = tmp_path / "debug.zarr"
    shutil.copytree(pristine, copy)
    return copy


def _rewrite_tokens(store: Path, block: int) -> None:
    """Valid, decodable tokens that differ from the recorded ones (a silent corruption)."""
    tokens = zarr.open_array(store / "train" / "tokens", mode="r+")
    rows = slice(block * 64, (block + 1) * 64)
    changed = np.asarray(tokens[rows])
    changed[:, 1:] = (changed[:, 1:] + 1) % 8
    tokens[rows] = changed


def _garble(store: Path, block: int) -> None:
    chunk = store / "train" / "tokens" / "c" / str(block) / "0"
    chunk.write_bytes(b"\x00not zstd at all" * 8)


def _train(store: Path, tmp_path: Path, *extra: str):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"path": str(store), "batch_size": 64, "shuffle_window": 1},
                "model": {"dim": 16, "n_layers": 1, "n_heads": 2},
                "train": {"steps": 2, "progress": False, "threads": 1},
                "run": {"dir": str(tmp_path / "run")},
            }
        )
    )
    return runner.invoke(app, ["run", str(config), *extra])


@pytest.mark.integration
@pytest.mark.parametrize(
    ("damage", "message"),
    [(_rewrite_tokens, "fails its checksum (recorded 0x"), (_garble, "is unreadable (")],
    ids=["decodable", "undecodable"],
)
@pytest.mark.parametrize("workers", [0, 1])
def test_a_damaged_chunk_stops_training_in_one_line(store, tmp_path, damage, message, workers):
    damage(store, 1)
    result = _train(store, tmp_path, f"data.num_workers={workers}")
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert f"error: train block 1 of {store} {message}" in errors[0]
    assert "gssm-data verify" in errors[0]


def test_a_sound_store_passes_and_each_block_is_checked_once(store, monkeypatch):
    checker = ChunkChecker(store, "train")
    calls = []
    original = checker.block

    def counting(block: int) -> np.ndarray:
        calls.append(block)
        return original(block)

    first = counting(0)
    counting(0)
    assert first.shape == (64, 9) and checker._passed == {0}
    _rewrite_tokens(store, 0)  # damaged after the first check: not re-checked in this process
    assert counting(0).shape == (64, 9)
    assert calls == [0, 0, 0]
