"""The store: reading API, layout any Zarr v3 client reads, errors, verification."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

from gssm_data import generate as generate_module
from gssm_data.errors import GssmDataError
from gssm_data.generate import GenerateOptions, Shard, generate
from gssm_data.kernels import draw_kernels
from gssm_data.manifest import FORMAT_VERSION
from gssm_data.presets import load_preset
from gssm_data.sampler import STREAMS, BlockSampler
from gssm_data.store import block_checksum, open_store, partial_path, verify_store

BLOCK = 64
N_TRAIN, N_TEST, SEQ_LEN = 3 * BLOCK + 5, BLOCK + 1, 17


def _options(out: Path, **changes: object) -> GenerateOptions:
    fields: dict[str, object] = {
        "graph": load_preset("base"),
        "name": "base",
        "out": out,
        "n_train": N_TRAIN,
        "n_test": N_TEST,
        "seq_len": SEQ_LEN,
        "seed": 11,
        "with_latents": True,
        "block_size": BLOCK,
    }
    fields.update(changes)
    return GenerateOptions.model_validate(fields)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small store of the base graph (3 latents), with latents, for read-only tests."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generate_module, "TRAIN_ENTROPY_SEQUENCES", 128)
        return generate(_options(tmp_path_factory.mktemp("store") / "base.zarr")).path


@pytest.fixture
def copy(store_path: Path, tmp_path: Path) -> Path:
    """A private copy of the store, for tests that damage it."""
    return Path(shutil.copytree(store_path, tmp_path / "copy.zarr"))


def test_arrays_have_the_documented_shapes_dtypes_and_chunks(store_path: Path) -> None:
    store = open_store(store_path)
    tokens = store.tokens("train")
    assert tokens.shape == (N_TRAIN, SEQ_LEN) and tokens.dtype == np.uint8
    assert tokens.chunks == (BLOCK, SEQ_LEN)
    assert store.tokens("test").shape == (N_TEST, SEQ_LEN)
    for node in store.graph.latents:
        latents = store.latents("test", node.name)
        assert latents.shape == (N_TEST, SEQ_LEN) and latents.chunks == (BLOCK, SEQ_LEN)
    assert store.manifest.token_dtype == "uint8" and store.manifest.vocab_size == 64
    assert store.manifest.splits["train"].blocks == 4 and store.manifest.complete


def test_conditionals_are_the_tables_that_were_sampled(store_path: Path) -> None:
    store = open_store(store_path)
    expected = draw_kernels(load_preset("base"), 11)
    tables = store.conditionals()
    assert tables.keys() == expected.keys()
    for node, table in expected.items():
        np.testing.assert_array_equal(tables[node], table)
        assert store.conditional(node).dtype == np.float64
    block = store.sampler().block(STREAMS["test"], 1)
    np.testing.assert_array_equal(store.tokens("test")[BLOCK:], block.tokens[:1])


def test_latents_are_the_states_the_tokens_were_drawn_from(store_path: Path) -> None:
    store = open_store(store_path)
    graph = load_preset("base")
    sampler = BlockSampler(graph, draw_kernels(graph, 11), SEQ_LEN, 11, block_size=BLOCK)
    block = sampler.block(STREAMS["train"], 2, with_latents=True)
    for node in ("Z1", "Z2", "Z3"):
        np.testing.assert_array_equal(
            store.latents("train", node)[2 * BLOCK : 3 * BLOCK], block.latents[node]
        )


def test_entropy_and_baselines_are_in_the_manifest(store_path: Path) -> None:
    store = open_store(store_path)
    test_entropy, train_entropy = store.entropy("test"), store.entropy("train")
    assert test_entropy is not None and train_entropy is not None
    assert test_entropy.n_sequences == N_TEST and train_entropy.n_sequences == 128
    assert test_entropy.method == "exact"
    assert len(test_entropy.per_position) == SEQ_LEN - 1
    baselines = store.baselines("test")
    assert baselines is not None and baselines.unigram_bits > 0
    assert store.per_token_entropy("train") is None  # written only by `gssm-data entropy --write`


def test_a_plain_zarr_client_reads_the_store_without_our_package(store_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import json, sys, zarr
        group = zarr.open_group({str(store_path)!r}, mode="r")
        tokens = group["train/tokens"][:]
        manifest = group.attrs["manifest"]
        assert "gssm_data" not in sys.modules
        print(json.dumps({{"shape": list(tokens.shape), "sum": int(tokens.sum()),
                          "n": manifest["splits"]["train"]["n"],
                          "table": group["graph/X/conditional"].shape}}))
        """
    )
    output = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True
    ).stdout
    seen = json.loads(output)
    tokens = open_store(store_path).tokens("train")[:]
    assert seen == {
        "shape": [N_TRAIN, SEQ_LEN],
        "sum": int(tokens.sum()),
        "n": N_TRAIN,
        "table": [16, 64],
    }
    assert json.loads((store_path / "zarr.json").read_text())["zarr_format"] == 3


def test_recorded_checksums_are_crc32_of_each_block(store_path: Path) -> None:
    store = open_store(store_path)
    checksums = store.block_checksums("train")
    assert checksums is not None and checksums.shape == (4,)
    tokens, latents = store.read_block("train", 3)
    assert tokens.shape == (5, SEQ_LEN)  # the last block is truncated
    assert int(checksums[3]) == block_checksum(tokens, latents)


def test_missing_store_says_so(tmp_path: Path) -> None:
    with pytest.raises(GssmDataError, match="no store at"):
        open_store(tmp_path / "nothing.zarr")


def test_an_interrupted_store_points_to_resuming(tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    generate(_options(out, shard=Shard(index=0, count=2)))
    with pytest.raises(GssmDataError, match=r"interrupted generate left .*partial.*resume"):
        open_store(out)
    with pytest.raises(GssmDataError, match="incomplete"):
        open_store(partial_path(out))
    store = open_store(out, allow_incomplete=True)
    assert store.path == partial_path(out) and not store.manifest.complete


def test_a_folder_that_is_not_a_store_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(GssmDataError, match="not a Zarr v3 group"):
        open_store(tmp_path / "empty")
    zarr.open_group(tmp_path / "plain.zarr", mode="w")
    with pytest.raises(GssmDataError, match="not a gssm-data store"):
        open_store(tmp_path / "plain.zarr")


def test_a_newer_format_is_refused_with_upgrade_advice(copy: Path) -> None:
    group = zarr.open_group(copy, mode="r+")
    manifest = dict(group.attrs["manifest"])
    manifest["format_version"] = FORMAT_VERSION + 1
    group.attrs["manifest"] = manifest
    with pytest.raises(GssmDataError, match="upgrade gssm-data"):
        open_store(copy)


def test_unknown_split_or_node_is_a_clear_error(store_path: Path) -> None:
    store = open_store(store_path)
    with pytest.raises(GssmDataError, match="no split 'valid'; splits: train, test"):
        store.tokens("valid")
    with pytest.raises(GssmDataError, match="'X' is not a latent node"):
        store.latents("train", "X")
    with pytest.raises(GssmDataError, match="no node 'Q'"):
        store.conditional("Q")


def test_manifest_is_written_only_in_r_plus_mode(copy: Path) -> None:
    store = open_store(copy)
    renamed = store.manifest.model_copy(update={"name": "renamed"})
    with pytest.raises(GssmDataError, match="read-only"):
        store.write_manifest(renamed)
    open_store(copy, mode="r+").write_manifest(renamed)
    assert open_store(copy).manifest.name == "renamed"


def test_a_sound_store_verifies_clean(store_path: Path) -> None:
    assert verify_store(open_store(store_path)) == []


def test_verify_finds_a_corrupted_chunk(copy: Path) -> None:
    (copy / "train" / "tokens" / "c" / "2" / "0").write_bytes(b"\x00garbage")
    problems = verify_store(open_store(copy))
    assert len(problems) == 1 and problems[0].startswith("block 2 of train: unreadable")


def test_verify_finds_a_truncated_chunk_file(copy: Path) -> None:
    chunk = copy / "test" / "latents" / "Z3" / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    problems = verify_store(open_store(copy))
    assert len(problems) == 1 and problems[0].startswith("block 1 of test: unreadable")


def test_verify_finds_a_valid_chunk_in_the_wrong_place(copy: Path) -> None:
    chunks = copy / "train" / "tokens" / "c"
    shutil.copyfile(chunks / "0" / "0", chunks / "1" / "0")
    problems = verify_store(open_store(copy))
    assert len(problems) == 1 and "block 1 of train: checksum mismatch" in problems[0]


def test_verify_finds_out_of_range_tokens(copy: Path) -> None:
    zarr.open_array(copy / "test" / "tokens", mode="r+")[:BLOCK] = 200
    problems = verify_store(open_store(copy))
    assert problems == ["block 0 of test: token 200 out of range for vocab_size 64"]


def test_verify_finds_a_missing_chunk_and_a_truncated_store(copy: Path) -> None:
    (copy / "train" / "latents" / "Z2" / "c" / "3" / "0").unlink()
    problems = verify_store(open_store(copy))
    assert len(problems) == 1 and "block 3 of train: checksum mismatch" in problems[0]
    (copy / "train" / "tokens" / "c" / "1" / "0").unlink()
    assert "block 1 of train: chunk file train/tokens/c/1/0 is missing" in verify_store(
        open_store(copy)
    )
    shutil.rmtree(copy / "test")
    assert "array test/tokens is missing" in verify_store(open_store(copy))
