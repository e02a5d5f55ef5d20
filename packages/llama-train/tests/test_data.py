"""The training loader: sharding, determinism, exact resume, prefixes, online data.

Most tests read small Zarr arrays whose row i holds the value i in every
column, so a batch says exactly which rows it contains.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from pydantic import ValidationError

from gssm_data.generate import GenerateOptions, generate
from gssm_data.graph import parse_graph
from gssm_data.kernels import draw_kernels
from gssm_data.presets import load_preset
from gssm_data.sampler import STREAMS, BlockSampler
from gssm_data.store import open_store
from llama_train.core.data import (
    DataConfig,
    OnlineRowStream,
    TrainLoader,
    ZarrRowStream,
    build_loader,
    online_sampler,
    resolve_data,
)
from llama_train.errors import LlamaTrainError

N_ROWS, SEQ_LEN, CHUNK_ROWS = 100, 3, 16  # 7 chunks, the last one of 4 rows


@pytest.fixture(scope="module")
def row_ids(tmp_path_factory: pytest.TempPathFactory) -> zarr.Array:
    """A (100, 3) uint16 array chunked by 16 rows, row i = [i, i, i]."""
    path = tmp_path_factory.mktemp("rows") / "tokens.zarr"
    array = zarr.create_array(
        store=path, shape=(N_ROWS, SEQ_LEN), chunks=(CHUNK_ROWS, SEQ_LEN), dtype="uint16"
    )
    array[:] = np.repeat(np.arange(N_ROWS, dtype=np.uint16)[:, None], SEQ_LEN, axis=1)
    return array


def _stream(array: zarr.Array, *, n_rows: int = N_ROWS, seed: int = 0) -> ZarrRowStream:
    return ZarrRowStream(array, n_rows=n_rows, seed=seed, window_chunks=2)


def _ids(batch: torch.Tensor | np.ndarray) -> list[int]:
    """Row ids of a batch (every column of row i holds i)."""
    return [int(x) for x in batch[:, 0]]


def _take(loader: TrainLoader, count: int) -> list[torch.Tensor]:
    return list(itertools.islice(iter(loader), count))


def _global_order(per_rank: list[list[torch.Tensor]]) -> list[int]:
    """Row ids of global batches in order, each the rank slices side by side."""
    return [
        row for batches in zip(*per_rank, strict=True) for batch in batches for row in _ids(batch)
    ]


# ---------------------------------------------------------------------------
# The row stream


def test_each_epoch_is_a_permutation_of_the_prefix_and_epochs_reshuffle(row_ids):
    stream = _stream(row_ids)
    epochs = [_ids(stream.rows(e * N_ROWS, (e + 1) * N_ROWS)) for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(N_ROWS))
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0] != list(range(N_ROWS))  # actually shuffled


def test_rows_are_a_pure_function_of_position_whatever_the_read_pattern(row_ids):
    whole = _ids(_stream(row_ids).rows(0, 3 * N_ROWS))
    pieces = _stream(row_ids)
    # Out of order, crossing windows and epochs, from a fresh cache each time.
    spans = [(250, 300), (0, 7), (93, 141), (7, 93), (141, 250)]
    for start, stop in spans:
        assert _ids(pieces.rows(start, stop)) == whole[start:stop]


def test_a_window_mixes_rows_of_its_chunks_only(row_ids):
    stream = _stream(row_ids)
    layout_rows = _ids(stream.rows(0, 32))  # first window: two full chunks (or one + the tail)
    chunks = {row // CHUNK_ROWS for row in layout_rows}
    assert len(chunks) == 2
    assert layout_rows != sorted(layout_rows)


def test_each_chunk_is_read_once_per_epoch_by_one_reader(row_ids):
    class CountingArray:
        def __init__(self, array: zarr.Array) -> None:
            self.array, self.shape, self.chunks, self.dtype = (
                array,
                array.shape,
                array.chunks,
                array.dtype,
            )
            self.reads: list[int] = []

        def __getitem__(self, key: slice) -> np.ndarray:
            assert key.start % CHUNK_ROWS == 0 and key.stop - key.start <= CHUNK_ROWS
            self.reads.append(key.start // CHUNK_ROWS)
            return self.array[key]

    counting = CountingArray(row_ids)
    stream = ZarrRowStream(counting, n_rows=N_ROWS, seed=1, window_chunks=2)
    for start in range(0, N_ROWS, 5):
        stream.rows(start, start + 5)
    assert sorted(counting.reads) == list(range(7))


def test_prefix_selects_only_the_first_rows(row_ids):
    rows = _ids(_stream(row_ids, n_rows=37).rows(0, 2 * 37))
    assert sorted(rows[:37]) == list(range(37)) == sorted(rows[37:])


def test_more_rows_than_the_array_holds_is_a_user_error(row_ids):
    with pytest.raises(LlamaTrainError, match="cannot select 101 rows of an array of 100"):
        _stream(row_ids, n_rows=101)


def test_the_seed_changes_the_order(row_ids):
    assert _ids(_stream(row_ids, seed=0).rows(0, 50)) != _ids(_stream(row_ids, seed=1).rows(0, 50))


# ---------------------------------------------------------------------------
# The loader: sharding, determinism, resume


def test_two_ranks_by_two_workers_cover_an_epoch_with_no_overlap_and_no_gap(row_ids):
    batch_size, world = 5, 2  # global batch 10: an epoch is exactly 10 global batches
    per_rank = [
        _take(
            TrainLoader(
                _stream(row_ids), batch_size=batch_size, rank=r, world_size=world, num_workers=2
            ),
            10,
        )
        for r in range(world)
    ]
    rows = [row for batches in per_rank for batch in batches for row in _ids(batch)]
    assert sorted(rows) == list(range(N_ROWS))
    # And the global batches, rank slices side by side, are the stream in order.
    assert _global_order(per_rank) == _ids(_stream(row_ids).rows(0, N_ROWS))


def test_batches_that_straddle_epochs_still_visit_each_row_once_per_epoch(row_ids):
    # Global batch 6 does not divide 100: batch 16 holds the end of epoch 0 and start of 1.
    loaders = [TrainLoader(_stream(row_ids), batch_size=3, rank=r, world_size=2) for r in range(2)]
    stream_order = _global_order([_take(loader, 34) for loader in loaders])
    assert sorted(stream_order[:N_ROWS]) == list(range(N_ROWS))
    assert sorted(stream_order[N_ROWS : 2 * N_ROWS]) == list(range(N_ROWS))


def test_batches_are_int64_and_identical_whatever_the_worker_count(row_ids):
    reference = _take(TrainLoader(_stream(row_ids), batch_size=4, num_workers=0), 30)
    with_workers = _take(TrainLoader(_stream(row_ids), batch_size=4, num_workers=2), 30)
    assert all(b.dtype == torch.int64 and b.shape == (4, SEQ_LEN) for b in reference)
    assert all(torch.equal(a, b) for a, b in zip(reference, with_workers, strict=True))


def test_resuming_from_a_state_dict_continues_with_the_same_batches(row_ids):
    uninterrupted = _take(TrainLoader(_stream(row_ids), batch_size=7, num_workers=2), 25)
    first = TrainLoader(_stream(row_ids), batch_size=7, num_workers=2)
    consumed = _take(first, 9)  # workers have prefetched more than 9: they must not count
    state = first.state_dict()
    resumed = TrainLoader(_stream(row_ids), batch_size=7, num_workers=2)
    resumed.load_state_dict(state)
    following = _take(resumed, 16)
    assert all(torch.equal(a, b) for a, b in zip(consumed + following, uninterrupted, strict=True))
    assert state["next_row"] == 63 and resumed.epoch == pytest.approx(175 / N_ROWS)


def test_a_position_saved_on_two_ranks_resumes_on_one_with_no_gap(row_ids):
    stream_order = _ids(_stream(row_ids).rows(0, 80))
    ranks = [TrainLoader(_stream(row_ids), batch_size=4, rank=r, world_size=2) for r in range(2)]
    seen = _global_order([_take(rank, 3) for rank in ranks])
    assert ranks[0].state_dict() == ranks[1].state_dict()
    single = TrainLoader(_stream(row_ids), batch_size=4)
    single.load_state_dict(ranks[0].state_dict())
    seen += _global_order([_take(single, 5)])
    assert seen == stream_order[:44]


def test_one_rank_accumulating_two_steps_reads_the_rows_of_two_ranks(row_ids):
    single = _take(TrainLoader(_stream(row_ids), batch_size=4), 8)
    pair = [
        _take(TrainLoader(_stream(row_ids), batch_size=4, rank=r, world_size=2), 4)
        for r in range(2)
    ]
    for step in range(4):  # optimizer step s: micro-batches 2s, 2s+1 versus ranks 0, 1
        assert torch.equal(single[2 * step], pair[0][step])
        assert torch.equal(single[2 * step + 1], pair[1][step])


def test_a_position_saved_under_other_data_settings_is_refused(row_ids):
    saved = TrainLoader(_stream(row_ids, n_rows=50), batch_size=4).state_dict()
    loader = TrainLoader(_stream(row_ids, n_rows=60), batch_size=4)
    with pytest.raises(LlamaTrainError, match="n_rows: 50 -> 60"):
        loader.load_state_dict(saved)


# ---------------------------------------------------------------------------
# Online data


@pytest.fixture(scope="module")
def debug_sampler() -> BlockSampler:
    # Flat kernels (alpha 10): two equal sequences of 12 tokens would be a real collision.
    graph = parse_graph(
        {
            "nodes": [
                {"name": "Z1", "states": 4, "alpha": 10.0},
                {"name": "X", "states": 8, "alpha": 10.0, "parents": ["Z1"], "observed": True},
            ]
        }
    )
    return BlockSampler(graph, draw_kernels(graph, 5), seq_len=12, seed=5, block_size=4)


def test_online_batches_are_distinct_across_ranks_and_workers_and_deterministic(debug_sampler):
    def batches(rank: int, workers: int) -> list[torch.Tensor]:
        loader = TrainLoader(
            OnlineRowStream(debug_sampler),
            batch_size=4,
            rank=rank,
            world_size=2,
            num_workers=workers,
        )
        return _take(loader, 6)

    rank0, rank1 = batches(0, 2), batches(1, 2)
    assert all(torch.equal(a, b) for a, b in zip(rank0, batches(0, 0), strict=True))
    rows = {tuple(row.tolist()) for batch in rank0 + rank1 for row in batch}
    assert len(rows) == 48
    # Rank r of global batch g is block 2g + r of the online stream.
    for g in range(6):
        for rank, got in ((0, rank0), (1, rank1)):
            block = debug_sampler.block(STREAMS["online"], 2 * g + rank).tokens
            assert torch.equal(got[g], torch.from_numpy(block.astype(np.int64)))


def test_online_loader_resumes_exactly(debug_sampler):
    uninterrupted = _take(TrainLoader(OnlineRowStream(debug_sampler), batch_size=4), 8)
    first = TrainLoader(OnlineRowStream(debug_sampler), batch_size=4, num_workers=2)
    _take(first, 3)
    resumed = TrainLoader(OnlineRowStream(debug_sampler), batch_size=4)
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(_take(resumed, 5), uninterrupted[3:], strict=True))
    assert resumed.epoch is None


# ---------------------------------------------------------------------------
# Evaluation reads and configuration


@pytest.mark.parametrize(
    ("text", "count"),
    [
        (100000, 100000),
        ("1e5", 100000),
        (1e5, 100000),
        ("2.5M", 2500000),
        ("100k", 100000),
        ("100_000", 100000),
        ("1.5e3", 1500),
    ],
)
def test_counts_accept_scientific_and_suffixed_notation(text, count):
    assert DataConfig(path=Path("s.zarr"), n_train=text).n_train == count


@pytest.mark.parametrize("text", ["2.5", "abc", "0", "-3", "inf", True])
def test_counts_reject_fractions_junk_and_non_positive_values(text):
    with pytest.raises(ValueError):
        DataConfig(path=Path("s.zarr"), n_train=text)


def test_data_config_parses_n_train_and_forbids_unknown_keys():
    assert DataConfig(path=Path("s.zarr"), n_train="1e5").n_train == 100000
    with pytest.raises(ValidationError, match="extra"):
        DataConfig(path=Path("s.zarr"), n_trian=5)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "source zarr needs data.path"),
        ({"path": "s.zarr", "preset": "debug"}, "data.preset only apply to source online"),
        ({"source": "online", "path": "s.zarr", "seq_len": 8}, "give either data.path or"),
        ({"source": "online", "preset": "debug"}, "needs data.seq_len"),
        ({"source": "online", "preset": "debug", "graph": "g.yaml", "seq_len": 8}, "one of"),
        ({"source": "online", "path": "s.zarr", "n_train": 10}, "n_train applies to source zarr"),
    ],
)
def test_data_config_rejects_inconsistent_sources(fields, message):
    with pytest.raises(ValidationError, match=message):
        DataConfig(**fields)


# ---------------------------------------------------------------------------
# Real stores (gssm-data generate) and online sources


@pytest.fixture(scope="module")
def debug_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A debug-preset store: 300 train (5 blocks of 64, the last short) and 64 test sequences."""
    out = tmp_path_factory.mktemp("stores") / "debug.zarr"
    options = GenerateOptions(
        graph=load_preset("debug"),
        name="debug",
        out=out,
        n_train=300,
        n_test=64,
        seq_len=16,
        seed=4,
        block_size=64,
    )
    generate(options)
    return out


def test_resolution_reads_vocabulary_length_and_prefix_from_the_manifest(debug_store):
    spec = resolve_data(DataConfig(path=debug_store, n_train="2e2"))
    assert (spec.source, spec.vocab_size, spec.seq_len, spec.n_train) == ("zarr", 8, 16, 200)
    assert spec.seed == 4 and spec.store is not None
    assert resolve_data(DataConfig(path=debug_store)).n_train == 300


def test_asking_for_more_sequences_than_the_store_holds_names_both_numbers(debug_store):
    with pytest.raises(LlamaTrainError, match=r"data.n_train=301 but .* holds 300 sequences"):
        resolve_data(DataConfig(path=debug_store, n_train=301))


def test_a_missing_store_or_preset_is_a_user_error(tmp_path):
    with pytest.raises(LlamaTrainError, match="no store at"):
        resolve_data(DataConfig(path=tmp_path / "absent.zarr"))
    with pytest.raises(LlamaTrainError, match="unknown preset 'nope'"):
        resolve_data(DataConfig(source="online", preset="nope", seq_len=8))


def test_the_loader_over_a_store_visits_each_train_sequence_once_per_epoch(debug_store):
    cfg = DataConfig(path=debug_store, batch_size=10, shuffle_window=2)
    loader = build_loader(cfg, seed=3, seq_len=16)
    rows = torch.cat(_take(loader, 30)).numpy()  # 300 rows: exactly one epoch
    stored = np.asarray(open_store(debug_store).tokens("train")[:])
    assert sorted(map(bytes, rows.astype(np.uint8))) == sorted(map(bytes, stored))
    assert loader.epoch == 1.0


def test_a_model_length_other_than_the_stores_is_refused(debug_store):
    with pytest.raises(LlamaTrainError, match="sequences of 32 tokens but the data has 16"):
        build_loader(DataConfig(path=debug_store), seq_len=32)


def test_online_data_from_a_store_samples_the_stores_own_process(debug_store):
    spec = resolve_data(DataConfig(source="online", path=debug_store))
    block = online_sampler(spec, block_size=64).block(STREAMS["train"], 1).tokens
    assert np.array_equal(block, open_store(debug_store).tokens("train")[64:128])


def test_online_data_from_a_preset_shares_kernels_with_a_store_of_that_seed(debug_store):
    spec = resolve_data(DataConfig(source="online", preset="debug", seed=4, seq_len=16))
    assert (spec.vocab_size, spec.seq_len, spec.store) == (8, 16, None)
    test_block = online_sampler(spec, block_size=64).block(STREAMS["test"], 0).tokens
    assert np.array_equal(test_block, open_store(debug_store).tokens("test")[:64])
    # Training batches come from the online stream, never the test one.
    first = next(
        iter(
            build_loader(
                DataConfig(source="online", preset="debug", seed=4, seq_len=16, batch_size=64),
                spec=spec,
            )
        )
    )
    assert not torch.equal(first, torch.from_numpy(test_block.astype(np.int64)))
