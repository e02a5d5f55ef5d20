"""`gssm-data extend`: longer test sequences of the same process, with their exact entropy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from gssm_data.cli import app
from gssm_data.entropy import sequence_entropy
from gssm_data.extend import default_extended_path, extend
from gssm_data.generate import GenerateOptions, generate
from gssm_data.manifest import fingerprint
from gssm_data.presets import load_preset
from gssm_data.store import open_store, verify_store

SEQ_LEN, LONG, N_TEST, BLOCK, SEED = 17, 50, 40, 16, 5
runner = CliRunner()


def _generate(out: Path, *, seq_len: int, n_test: int, mode: str | None = None, **extra) -> Path:
    graph = load_preset("debug")
    generate(
        GenerateOptions(
            graph=graph.with_mode(mode) if mode else graph,
            name="debug",
            out=out,
            n_train=32,
            n_test=n_test,
            seq_len=seq_len,
            seed=SEED,
            block_size=BLOCK,
            **extra,
        )
    )
    return out


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _generate(
        tmp_path_factory.mktemp("extend") / "parent.zarr", seq_len=SEQ_LEN, n_test=N_TEST
    )


@pytest.fixture(scope="module")
def extended(parent: Path) -> Path:
    return extend(parent, seq_len=LONG, n_test=N_TEST + 8).path


def test_extended_store_holds_one_longer_test_split_and_names_its_parent(
    parent: Path, extended: Path
) -> None:
    store, source = open_store(extended), open_store(parent)
    m = store.manifest
    assert extended == default_extended_path(parent, LONG, N_TEST + 8)
    assert extended.name == "parent-len50-t48.zarr"
    assert list(m.splits) == ["test"] and m.splits["test"].n == N_TEST + 8
    assert store.tokens("test").shape == (N_TEST + 8, LONG)
    assert (m.seq_len, m.seed, m.graph, m.block_size) == (
        LONG,
        SEED,
        source.graph,
        BLOCK,
    )
    assert m.parent is not None
    assert (m.parent.fingerprint, m.parent.seq_len) == (source.manifest.fingerprint, SEQ_LEN)
    assert Path(m.parent.path) == parent.absolute()
    assert m.fingerprint == fingerprint(source.graph, SEED, LONG, BLOCK)
    for node, table in source.conditionals().items():
        np.testing.assert_array_equal(store.conditional(node), table)
    assert verify_store(store) == []


def test_rows_begin_with_the_parents_test_rows(parent: Path, extended: Path) -> None:
    """Same sampler, seed and stream: the first SEQ_LEN tokens are the parent's sequences."""
    long_tokens = open_store(extended).tokens("test")[:N_TEST]
    short_tokens = open_store(parent).tokens("test")[:]
    np.testing.assert_array_equal(long_tokens[:, :SEQ_LEN], short_tokens)
    assert not np.array_equal(long_tokens[:, SEQ_LEN:], np.zeros_like(long_tokens[:, SEQ_LEN:]))


def test_same_bytes_as_generate_at_the_longer_length(extended: Path, tmp_path: Path) -> None:
    direct = _generate(tmp_path / "direct.zarr", seq_len=LONG, n_test=N_TEST + 8)
    np.testing.assert_array_equal(
        open_store(extended).tokens("test")[:], open_store(direct).tokens("test")[:]
    )


def test_extend_is_deterministic(parent: Path, extended: Path, tmp_path: Path) -> None:
    again = extend(parent, seq_len=LONG, n_test=N_TEST + 8, out=tmp_path / "again.zarr", workers=2)
    np.testing.assert_array_equal(
        open_store(again.path).tokens("test")[:], open_store(extended).tokens("test")[:]
    )
    rerun = extend(parent, seq_len=LONG, n_test=N_TEST + 8, out=again.path)
    assert rerun.status == "already-complete"


def test_manifest_entropy_is_the_forward_algorithm_on_the_parents_tables(
    parent: Path, extended: Path
) -> None:
    stats = open_store(extended).entropy("test")
    assert stats is not None and stats.method == "exact" and stats.n_sequences == N_TEST + 8
    source = open_store(parent)
    tokens = np.asarray(open_store(extended).tokens("test")[:])
    nats = sequence_entropy(source.graph, source.conditionals(), tokens)  # (n, LONG - 1)
    np.testing.assert_allclose(stats.per_position, nats.mean(axis=0), rtol=1e-12)
    assert stats.nats_per_token == pytest.approx(nats.mean(), rel=1e-12)
    # Causality: the first positions' entropy is that of the parent's own rows.
    short = sequence_entropy(source.graph, source.conditionals(), tokens[:N_TEST, :SEQ_LEN])
    np.testing.assert_allclose(nats[:N_TEST, : SEQ_LEN - 1], short, rtol=1e-12)


def test_latents_follow_the_parent(tmp_path: Path) -> None:
    source = _generate(tmp_path / "latent.zarr", seq_len=SEQ_LEN, n_test=8, with_latents=True)
    result = extend(source, seq_len=30, n_test=8)
    store = open_store(result.path)
    assert store.manifest.with_latents
    np.testing.assert_array_equal(
        store.latents("test", "Z1")[:, :SEQ_LEN], open_store(source).latents("test", "Z1")[:]
    )


def _one_line_error(arguments: list[str], *fragments: str) -> None:
    result = runner.invoke(app, ["extend", *arguments, "--quiet"])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_prints_the_new_store_path(parent: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.zarr"
    result = runner.invoke(
        app, ["extend", str(parent), "--seq-len", "20", "--n-test", "1e1", "--out", str(out), "-q"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out.absolute())
    assert open_store(out).tokens("test").shape == (10, 20)


def test_cli_errors_are_one_line(parent: Path, tmp_path: Path) -> None:
    _one_line_error([str(parent), "--seq-len", str(SEQ_LEN)], "not longer", f"{SEQ_LEN}")
    _one_line_error([str(parent), "--seq-len", "40", "--n-test", "0"], "at least 1")
    _one_line_error([str(parent), "--seq-len", "40", "--n-test", "inf"], "--n-test 'inf' is not")
    _one_line_error([str(parent), "--seq-len", "40", "--n-test", "many"], "not a count")
    _one_line_error([str(parent), "--seq-len", "40", "--n-test", "2.5"], "whole number")
    _one_line_error([str(tmp_path / "missing.zarr"), "--seq-len", "40"], "no store at")
    _one_line_error([str(parent), "--seq-len", "40", "--out", str(parent)], "parent store itself")
    transition = _generate(tmp_path / "t.zarr", seq_len=SEQ_LEN, n_test=4, mode="transition")
    _one_line_error([str(transition), "--seq-len", "40"], "transition nodes", "no stored tables")
