"""A store edited after it was written: one line before training, never a model traceback.

The model is built from the store's manifest (vocabulary, sequence length), and every
block read for training or evaluation is checked against its recorded CRC-32 and the
manifest's vocabulary (`llama_train.core.chunk_check`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from typer.testing import CliRunner

from gssm_data.store import block_checksum
from llama_train.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def pristine(make_debug_store) -> Path:
    return make_debug_store(n_train=128, n_test=32, seq_len=9, block_size=64)


@pytest.fixture()
def store(pristine, tmp_path) -> Path:
    copy = tmp_path / "debug.zarr"
    shutil.copytree(pristine, copy)
    return copy


def _train(store: Path, tmp_path: Path):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"path": str(store), "batch_size": 16},
                "model": {"dim": 16, "n_layers": 1, "n_heads": 2},
                "train": {"steps": 2, "progress": False, "threads": 1},
                "run": {"dir": str(tmp_path / "run")},
            }
        )
    )
    return runner.invoke(app, ["run", str(config)])


def _error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def _edit_manifest(store: Path, key: str, value: int) -> None:
    path = store / "zarr.json"
    document = json.loads(path.read_text())
    document["attributes"]["manifest"][key] = value
    path.write_text(json.dumps(document))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("vocab_size", 4, "says vocab_size 4 but its graph's observed node has 8 states"),
        ("vocab_size", 1_000_000_000, "says vocab_size 1000000000 but its graph's"),
        ("seq_len", 33, "holds 128 sequences of 33 tokens but its tokens array is 128 x 9"),
        ("seq_len", 5, "holds 128 sequences of 5 tokens but its tokens array is 128 x 9"),
    ],
)
def test_a_tampered_manifest_is_one_line_before_training(store, tmp_path, key, value, message):
    _edit_manifest(store, key, value)
    line = _error(_train(store, tmp_path))
    assert f"the manifest of {store}" in line and message in line, line
    assert "gssm-data verify" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def _rewrite(store: Path, split: str, block: int, change, *, forge_checksum: bool) -> None:
    tokens = zarr.open_array(store / split / "tokens", mode="r+")
    rows = slice(block * 64, (block + 1) * 64)
    changed = change(np.asarray(tokens[rows]))
    tokens[rows] = changed
    if forge_checksum:  # as a forger would: the CRC then matches the new tokens
        checksums = zarr.open_array(store / split / "block_crc32", mode="r+")
        checksums[block] = block_checksum(changed)


def test_a_damaged_test_split_is_caught_by_its_checksums(store, tmp_path):
    """The evaluation reads the test split through the same check as training."""
    _rewrite(store, "test", 0, lambda rows: (rows + 1) % 8, forge_checksum=False)
    line = _error(_train(store, tmp_path))
    assert f"test block 0 of {store} fails its checksum (recorded 0x" in line, line


def test_tokens_outside_the_vocabulary_are_one_line_even_with_a_forged_checksum(store, tmp_path):
    def out_of_range(rows: np.ndarray) -> np.ndarray:
        rows = rows.copy()
        rows[3, 4] = 200
        return rows

    _rewrite(store, "train", 1, out_of_range, forge_checksum=True)
    line = _error(_train(store, tmp_path))
    assert f"train block 1 of {store} holds token 200, outside the vocabulary of 8" in line, line
