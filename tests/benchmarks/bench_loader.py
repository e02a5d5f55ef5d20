"""How many batches per second the training loader delivers (`make bench`).

Demo-sized batches (32 x 257 tokens) from a store of the `hmm` preset, with 0
and 2 DataLoader workers, against a baseline measured in the same run: the
per-row random reads the loader's chunk-and-window design avoids. The online
source (fresh sequences drawn by the sampler) is measured too. The trainer's
benchmark sets these figures against the training step's consumption.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from gssm_data.sampler import BLOCK_SIZE
from gssm_data.store import open_store
from llama_train.core.data import DataConfig, build_loader

BATCH_SIZE, SEQ_LEN = 32, 257
TRAIN_BLOCKS = 10  # 40960 sequences: more than one shuffle window of 8 chunks
MEASURED_BATCHES = 1500  # crosses at least one window boundary (1024 batches per window)


@pytest.fixture(scope="module")
def hmm_store(tmp_path_factory: pytest.TempPathFactory, write_preset_store) -> Path:
    out = tmp_path_factory.mktemp("bench") / "hmm.zarr"
    write_preset_store(
        out, "hmm", n_train=TRAIN_BLOCKS * BLOCK_SIZE, n_test=BLOCK_SIZE, seq_len=SEQ_LEN, workers=2
    )
    return out


def _batches_per_second(batches: Iterator[torch.Tensor], count: int) -> float:
    """Steady rate: the first batch (worker start-up) is taken before the clock starts."""
    first = next(batches)
    assert first.shape == (BATCH_SIZE, SEQ_LEN) and first.dtype == torch.int64
    started = time.perf_counter()
    for batch in itertools.islice(batches, count):
        assert batch.shape[0] == BATCH_SIZE
    return count / (time.perf_counter() - started)


def _random_row_reads(store: Path, count: int) -> float:
    """Baseline: each batch gathers 32 rows by 32 single-row zarr reads."""
    tokens = open_store(store).tokens("train")
    rng = np.random.default_rng(0)

    def batches() -> Iterator[torch.Tensor]:
        while True:
            rows = [tokens[int(i)] for i in rng.integers(0, tokens.shape[0], BATCH_SIZE)]
            yield torch.from_numpy(np.stack(rows).astype(np.int64))

    return _batches_per_second(batches(), count)


def test_loader_batches_per_second(hmm_store: Path) -> None:
    baseline = _random_row_reads(hmm_store, 20)
    tokens_per_batch = BATCH_SIZE * SEQ_LEN
    print(f"\nloader, hmm store, batch {BATCH_SIZE} x {SEQ_LEN} tokens (rank 0 of 1)")
    print(f"  per-row random zarr reads (baseline): {baseline:10.1f} batches/s")
    for workers in (0, 2):
        cfg = DataConfig(path=hmm_store, batch_size=BATCH_SIZE, num_workers=workers)
        rate = _batches_per_second(iter(build_loader(cfg, seed=0)), MEASURED_BATCHES)
        print(
            f"  zarr, {workers} workers: {rate:10.1f} batches/s = "
            f"{rate * tokens_per_batch / 1e6:6.2f} M tokens/s, {rate / baseline:6.1f}x baseline"
        )
    for workers in (0, 2):
        cfg = DataConfig(
            source="online",
            preset="hmm",
            seq_len=SEQ_LEN,
            batch_size=BATCH_SIZE,
            num_workers=workers,
        )
        rate = _batches_per_second(iter(build_loader(cfg)), 100)
        print(
            f"  online, {workers} workers: {rate:10.1f} batches/s = "
            f"{rate * tokens_per_batch / 1e6:6.2f} M tokens/s"
        )
