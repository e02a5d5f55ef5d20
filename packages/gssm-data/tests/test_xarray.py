"""Every array of a store carries dimension names, so xarray opens each group."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from typer.testing import CliRunner

from gssm_data import generate as generate_module
from gssm_data.cli import app
from gssm_data.entropy import write_split_entropy
from gssm_data.generate import GenerateOptions, generate
from gssm_data.presets import load_preset
from gssm_data.store import open_store, verify_store

runner = CliRunner()


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A base-preset store (three latents, one with two parents) with latents and entropy."""
    monkeypatch.setattr(generate_module, "TRAIN_ENTROPY_SEQUENCES", 16)
    out = tmp_path / "base.zarr"
    options = GenerateOptions(
        graph=load_preset("base"),
        name="base",
        out=out,
        n_train=48,
        n_test=8,
        seq_len=5,
        block_size=32,
        with_latents=True,
    )
    generate(options)
    write_split_entropy(open_store(out, mode="r+"), "test", quiet=True)
    return out


def _groups(path: Path) -> list[str]:
    root = zarr.open_group(path, mode="r")
    return ["train", "test", "train/latents", "test/latents"] + [
        f"graph/{name}" for name in root["graph"].group_keys()
    ]


def _check_opens(path: Path) -> None:
    root = zarr.open_group(path, mode="r")
    for group in _groups(path):
        dataset = xr.open_zarr(path, group=group, consolidated=False)
        for name, variable in dataset.data_vars.items():
            np.testing.assert_array_equal(variable.values, root[f"{group}/{name}"][...])
    train = xr.open_zarr(path, group="train", consolidated=False)
    assert train["tokens"].dims == ("sequence", "position")
    assert train["block_crc32"].dims == ("block",)
    test = xr.open_zarr(path, group="test", consolidated=False)
    assert test["entropy"].dims == ("sequence", "predicted_position")
    assert test.sizes["predicted_position"] == test.sizes["position"] - 1
    z3 = xr.open_zarr(path, group="graph/Z3", consolidated=False)["conditional"]
    assert z3.dims == ("Z3_previous", "Z1", "Z2", "Z3")  # previous self, parents, next
    x = xr.open_zarr(path, group="graph/X", consolidated=False)["conditional"]
    np.testing.assert_allclose(x.sum("X"), 1.0)  # rows of p(x | parents) along the named axis
    tree = xr.open_datatree(path, engine="zarr", consolidated=False)
    assert tree["train/latents"].dataset.sizes["sequence"] == 48


def test_a_new_store_opens_in_xarray_group_by_group(store: Path) -> None:
    _check_opens(store)


def test_upgrade_names_the_dimensions_of_an_older_store(store: Path) -> None:
    stripped = 0
    for metadata in store.rglob("zarr.json"):  # what gssm-data wrote before naming them
        document = json.loads(metadata.read_text())
        if document.get("node_type") == "array":
            document.pop("dimension_names", None)
            metadata.write_text(json.dumps(document))
            stripped += 1
    with pytest.raises(KeyError, match="dimension_names"):
        xr.open_zarr(store, group="train", consolidated=False)
    upgraded = runner.invoke(app, ["upgrade", str(store)])
    assert upgraded.exit_code == 0, upgraded.output
    assert stripped == 4 + 2 * 5 + 1  # 4 tables; tokens, 3 latents, checksums; test entropy
    assert f"named the dimensions of {stripped} array(s)" in upgraded.stdout
    _check_opens(store)
    assert verify_store(open_store(store)) == []  # data and checksums untouched
    again = runner.invoke(app, ["upgrade", str(store)])
    assert again.exit_code == 0 and "is up to date" in again.stdout
