"""Fixtures shared by the llama-train tests: small, real gssm-data stores and one trained run."""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from gssm_data.generate import GenerateOptions, generate
from gssm_data.presets import load_preset
from llama_train.recipe.train import Preempted, train
from llama_train.recipe.train_config import resolve_config


def write_debug_store(
    out: Path, *, n_train: int, n_test: int, seq_len: int, block_size: int = 64
) -> Path:
    """A `debug`-preset store (vocabulary 8) at `out`."""
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


@pytest.fixture()
def stopped_by_sigterm() -> Callable[[Callable[[], object]], Preempted]:
    """`stop(call)`: run `call`, which a SIGTERM it sends itself stops; its Preempted.

    A preemption watch that saw a signal leaves it ignored (the process is on its way
    out); the test's process is not, so SIGTERM's handler is given back.
    """

    def stop(call: Callable[[], object]) -> Preempted:
        previous = signal.getsignal(signal.SIGTERM)
        try:
            with pytest.raises(Preempted) as stopped:
                call()
        finally:
            signal.signal(signal.SIGTERM, previous)
        return stopped.value

    return stop


@pytest.fixture(scope="module")
def make_debug_store(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Write a `debug`-preset store (vocabulary 8) with small blocks; returns its path.

    Module-scoped: each test module gets its own stores, so a module that writes
    into one (e.g. per-token entropy) cannot change another module's data.
    """

    def make(*, n_train: int, n_test: int, seq_len: int, block_size: int = 64) -> Path:
        out = tmp_path_factory.mktemp("stores") / "debug.zarr"
        return write_debug_store(
            out, n_train=n_train, n_test=n_test, seq_len=seq_len, block_size=block_size
        )

    return make


@dataclass(frozen=True)
class TinyRun:
    """A finished run: the YAML file it was trained from and its run directory."""

    config: Path
    run_dir: Path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """A 2-step run of a 1-layer model of width 16 on the debug preset, trained once a session.

    Sequences of 12 tokens (test_generate scores samples by summing over every latent path,
    which grows with the length); evaluated and checkpointed at step 2 (test_untrusted_run_dir
    forges that checkpoint). Shared by every test file that only reads a trained run, so it
    must not change: a test that alters the run works on a copy (`shutil.copytree`).
    """
    root = tmp_path_factory.mktemp("tiny-run")
    store = write_debug_store(root / "debug.zarr", n_train=64, n_test=16, seq_len=12)
    config = root / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"path": str(store), "batch_size": 8},
                "model": {"dim": 16, "n_layers": 1, "n_heads": 2},
                "train": {"steps": 2, "progress": False, "threads": 1},
                "eval": {"every": 2},
                "checkpoint": {"every": 2},
                "run": {"dir": str(root / "run")},
            }
        )
    )
    train(resolve_config(config), progress=False)
    return TinyRun(config=config, run_dir=root / "run")
