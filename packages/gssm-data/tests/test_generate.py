"""generate: determinism across workers and shards, prefixes, resume after a kill, safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gssm_data import generate as generate_module
from gssm_data.common.humanize import parse_count
from gssm_data.errors import GssmDataError
from gssm_data.generate import (
    GenerateOptions,
    Shard,
    default_store_path,
    format_count,
    generate,
)
from gssm_data.kernels import draw_kernels
from gssm_data.presets import load_preset
from gssm_data.sampler import STREAMS, BlockSampler
from gssm_data.store import PROGRESS_DIR, open_store, partial_path, verify_store

BLOCK = 64
SEQ_LEN = 17


@pytest.fixture(autouse=True)
def few_entropy_sequences(monkeypatch: pytest.MonkeyPatch) -> None:
    """Measure the train entropy on 128 sequences, not 4096: the figure is not under test."""
    monkeypatch.setattr(generate_module, "TRAIN_ENTROPY_SEQUENCES", 128)


def options(out: Path, **changes: object) -> GenerateOptions:
    """A store of a few small blocks of the debug graph (fast to write and to measure)."""
    fields: dict[str, object] = {
        "graph": load_preset("debug"),
        "name": "debug",
        "out": out,
        "n_train": 5 * BLOCK + 10,
        "n_test": 2 * BLOCK + 3,
        "seq_len": SEQ_LEN,
        "seed": 3,
        "workers": 1,
        "block_size": BLOCK,
    }
    fields.update(changes)
    return GenerateOptions.model_validate(fields)


def data_files(root: Path) -> dict[str, bytes]:
    """Every chunk and array-metadata file, by relative path (the root zarr.json holds a
    creation time and is compared through its manifest instead)."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.relative_to(root) != Path("zarr.json")
    }


def comparable_manifest(path: Path) -> dict:
    manifest = open_store(path).manifest.model_dump(mode="json")
    manifest.pop("created_at")
    return manifest


def test_tokens_are_the_sampler_blocks_truncated(tmp_path: Path) -> None:
    result = generate(options(tmp_path / "s.zarr", with_latents=True))
    store = open_store(result.path)
    graph = load_preset("debug")
    sampler = BlockSampler(graph, draw_kernels(graph, 3), SEQ_LEN, 3, block_size=BLOCK)
    for split, n in (("train", 5 * BLOCK + 10), ("test", 2 * BLOCK + 3)):
        blocks = [
            sampler.block(STREAMS[split], b, with_latents=True) for b in range(-(-n // BLOCK))
        ]
        expected = np.concatenate([block.tokens for block in blocks])[:n]
        np.testing.assert_array_equal(store.tokens(split)[:], expected)
        latent = np.concatenate([block.latents["Z1"] for block in blocks])[:n]
        np.testing.assert_array_equal(store.latents(split, "Z1")[:], latent)
    assert result.status == "complete"
    assert result.blocks_written == result.blocks_total == 6 + 3
    assert not partial_path(result.path).exists()


def test_same_bytes_whatever_the_number_of_workers(tmp_path: Path) -> None:
    one = generate(options(tmp_path / "one.zarr", workers=1)).path
    two = generate(options(tmp_path / "two.zarr", workers=2)).path
    assert data_files(one) == data_files(two)
    assert comparable_manifest(one) == comparable_manifest(two)


def test_shards_write_the_same_store_and_the_last_one_publishes(tmp_path: Path) -> None:
    whole = generate(options(tmp_path / "whole.zarr")).path
    out = tmp_path / "sharded.zarr"
    statuses = [generate(options(out, shard=Shard(index=k, count=3))).status for k in (2, 0, 1)]
    assert statuses == ["shard-done", "shard-done", "complete"]
    assert data_files(out) == data_files(whole)
    assert comparable_manifest(out) == comparable_manifest(whole)


def test_shard_k_writes_blocks_congruent_to_k(tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    generate(options(out, shard=Shard(index=1, count=4)))
    done = generate_module._finished_blocks(partial_path(out))
    # Blocks are numbered across splits, train first: 0..5 train, 6..8 test.
    numbers = sorted(block + (6 if split == "test" else 0) for split, block in done)
    assert numbers == [1, 5]


def test_train_of_n_is_a_prefix_of_train_of_10n_and_test_does_not_depend_on_n(
    tmp_path: Path,
) -> None:
    small = open_store(generate(options(tmp_path / "small.zarr", n_train=50)).path)
    large = open_store(generate(options(tmp_path / "large.zarr", n_train=500)).path)
    np.testing.assert_array_equal(small.tokens("train")[:], large.tokens("train")[:50])
    np.testing.assert_array_equal(small.tokens("test")[:], large.tokens("test")[:])
    assert small.manifest.fingerprint == large.manifest.fingerprint


@pytest.mark.integration
def test_resume_after_sigkill_gives_the_bytes_of_an_uninterrupted_run(tmp_path: Path) -> None:
    big = {"n_train": 40 * 512, "n_test": 64, "seq_len": 129, "block_size": 512}
    out = tmp_path / "killed.zarr"
    # The child's blocks take 0.2 s more each (its spawned workers re-import this script),
    # so the kill lands mid-run however loaded the machine is; the bytes are unchanged.
    script = tmp_path / "slow_generate.py"
    script.write_text(
        "import sys, time\n"
        "from pathlib import Path\n"
        "from gssm_data import generate as module\n"
        "from gssm_data.presets import load_preset\n"
        "write = module.BlockWriter.write\n"
        "module.BlockWriter.write = lambda self, *a: (time.sleep(0.2), write(self, *a))[1]\n"
        "if __name__ == '__main__':\n"
        "    module.generate(module.GenerateOptions(graph=load_preset('debug'), name='debug',\n"
        f"        out=Path(sys.argv[1]), seed=3, workers=2, **{big!r}))\n"
    )
    child = subprocess.Popen(
        [sys.executable, str(script), str(out)], start_new_session=True, stderr=subprocess.PIPE
    )
    markers = partial_path(out) / PROGRESS_DIR / "train"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and child.poll() is None:
        if markers.is_dir() and sum(1 for p in markers.iterdir() if p.name.isdigit()) >= 3:
            break
        time.sleep(0.002)
    os.killpg(child.pid, signal.SIGKILL)  # the child and its spawned workers
    child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode() if child.stderr else ""
    assert not out.exists() and partial_path(out).exists()
    written_before = len(generate_module._finished_blocks(partial_path(out)))
    assert 3 <= written_before < 41

    resumed = generate(options(out, **big))
    reference = generate(options(tmp_path / "reference.zarr", **big))
    assert resumed.status == "complete"
    assert resumed.blocks_written == 41 - written_before
    assert data_files(out) == data_files(reference.path)
    assert comparable_manifest(out) == comparable_manifest(reference.path)
    assert verify_store(open_store(out)) == []


def test_running_the_same_command_again_on_a_complete_store_does_nothing(tmp_path: Path) -> None:
    first = generate(options(tmp_path / "s.zarr"))
    before = data_files(first.path)
    again = generate(options(tmp_path / "s.zarr", workers=2))
    assert again.status == "already-complete" and again.blocks_written == 0
    assert data_files(first.path) == before


def test_a_complete_store_is_replaced_only_with_force(tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    generate(options(out))
    with pytest.raises(GssmDataError, match=r"already exists with other settings.*--force"):
        generate(options(out, n_train=100))
    assert open_store(out).manifest.splits["train"].n == 5 * BLOCK + 10
    generate(options(out, n_train=100, force=True))
    assert open_store(out).manifest.splits["train"].n == 100
    assert not list(tmp_path.glob("*.replaced-*"))


def test_a_partial_store_with_other_settings_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    generate(options(out, shard=Shard(index=0, count=2)))
    with pytest.raises(GssmDataError, match=r"interrupted run with other settings \(n_train"):
        generate(options(out, n_train=999))
    result = generate(options(out, n_train=999, force=True))
    assert open_store(result.path).manifest.splits["train"].n == 999


def test_a_second_concurrent_run_of_the_same_task_is_refused(tmp_path: Path) -> None:
    import fcntl

    out = tmp_path / "s.zarr"
    generate(options(out, shard=Shard(index=1, count=2)))
    lock = partial_path(out) / PROGRESS_DIR / "writer-shard-0-of-2.lock"
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running task 0 holds it
        with pytest.raises(GssmDataError, match="already writing"):
            generate(options(out, shard=Shard(index=0, count=2)))
    assert generate(options(out, shard=Shard(index=0, count=2))).status == "complete"


def test_file_system_errors_are_user_errors(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(GssmDataError, match="run the same command again"):
        generate(options(tmp_path / "file" / "s.zarr"))


def test_force_cannot_be_combined_with_shard(tmp_path: Path) -> None:
    with pytest.raises(GssmDataError, match="--force cannot be combined with --shard"):
        generate(options(tmp_path / "s.zarr", force=True, shard=Shard(index=0, count=2)))


def test_too_little_free_disk_stops_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        generate_module.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})()
    )
    with pytest.raises(GssmDataError, match=r"not enough free disk.*GB needed"):
        generate(options(tmp_path / "s.zarr"))
    assert not partial_path(tmp_path / "s.zarr").exists()  # checked before the layout


def test_disk_estimate_is_close_to_the_written_size(tmp_path: Path) -> None:
    store = open_store(generate(options(tmp_path / "s.zarr", n_train=8 * 512, block_size=512)).path)
    written = sum(p.stat().st_size for p in (store.path / "train" / "tokens").rglob("c/*/*"))
    per_row = generate_module._compressed_bytes_per_row(store.manifest, store.conditionals())
    estimate = per_row * 8 * 512
    assert 0.8 * written < estimate < 2.0 * written


def test_a_block_that_fails_verification_is_unmarked_and_rewritten(tmp_path: Path) -> None:
    reference = generate(options(tmp_path / "reference.zarr")).path
    out = tmp_path / "s.zarr"
    generate(options(out, shard=Shard(index=1, count=2)))  # odd blocks, not published
    (partial_path(out) / "train" / "tokens" / "c" / "1" / "0").write_bytes(b"not zstd")
    with pytest.raises(GssmDataError, match=r"1 block\(s\) failed verification.*block 1 of train"):
        generate(options(out))
    assert ("train", 1) not in generate_module._finished_blocks(partial_path(out))
    assert generate(options(out)).blocks_written == 1
    assert data_files(out) == data_files(reference)


def test_a_stale_finalise_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    generate(options(out, shard=Shard(index=0, count=2)))
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    lock = partial_path(out) / PROGRESS_DIR / "finalise.lock"
    lock.write_text(json.dumps({"host": generate_module._HOST, "pid": int(dead.stdout)}))
    assert generate(options(out)).status == "complete"


def test_a_live_finalise_lock_stops_a_shard_quietly_and_a_whole_run_loudly(
    tmp_path: Path,
) -> None:
    out = tmp_path / "s.zarr"
    generate(options(out, shard=Shard(index=0, count=2)))
    lock = partial_path(out) / PROGRESS_DIR / "finalise.lock"
    lock.write_text(json.dumps({"host": "another-node", "pid": 1}))
    assert generate(options(out, shard=Shard(index=1, count=2))).status == "shard-done"
    with pytest.raises(GssmDataError, match="being finalised by pid 1 on another-node"):
        generate(options(out))


def test_parse_count_reads_what_people_type() -> None:
    assert parse_count("1e8") == 100_000_000
    assert parse_count("2.5M") == 2_500_000
    assert parse_count("100_000") == 100_000
    assert parse_count("10k") == 10_000
    assert parse_count("4096") == 4096
    for bad in ("1.5", "abc", "-3", "2.5e-1", ""):
        with pytest.raises(GssmDataError, match="--n"):
            parse_count(bad)


def test_format_count_is_short_and_exact() -> None:
    assert [format_count(n) for n in (100_000_000, 10_000, 2_500_000, 12_345, 1, 1500)] == [
        "1e8", "1e4", "2.5M", "12345", "1", "1.5k",
    ]  # fmt: skip


def test_default_path_names_preset_fingerprint_and_sizes() -> None:
    graph = load_preset("hmm")
    path = default_store_path("hmm", graph, seed=0, seq_len=257, n_train=10**8, n_test=10**4)
    fingerprint = (
        options(Path("x"))
        .model_copy(update={"graph": graph, "seed": 0, "seq_len": 257, "block_size": 4096})
        .fingerprint
    )
    assert path == Path("datasets") / f"hmm-{fingerprint}-n1e8-t1e4.zarr"


def test_shard_parse_rejects_out_of_range_tasks() -> None:
    assert Shard.parse("3/8") == Shard(index=3, count=8)
    for bad in ("8/8", "1", "a/b", "1/0"):
        with pytest.raises(GssmDataError, match="--shard"):
            Shard.parse(bad)
