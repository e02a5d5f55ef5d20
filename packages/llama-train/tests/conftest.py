"""Fixtures shared by the llama-train tests: small, real gssm-data stores."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from gssm_data.generate import GenerateOptions, generate
from gssm_data.presets import load_preset


@pytest.fixture(scope="module")
def make_debug_store(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Write a `debug`-preset store (vocabulary 8) with small blocks; returns its path.

    Module-scoped: each test module gets its own stores, so a module that writes
    into one (e.g. per-token entropy) cannot change another module's data.
    """

    def make(*, n_train: int, n_test: int, seq_len: int, block_size: int = 64) -> Path:
        out = tmp_path_factory.mktemp("stores") / "debug.zarr"
        generate(
            GenerateOptions(
                graph=load_preset("debug"),
                name="debug",
                out=out,
                n_train=n_train,
                n_test=n_test,
                seq_len=seq_len,
                block_size=block_size,
            )
        )
        return out

    return make
