"""Stacked training against one model at a time (`make bench`; issue 16's two tables).

1. Training steps only: one stack of K members (`core.stack`) against K single
   models (`Llama` + torch AdamW + clipping, as `train.py` steps them), on the same
   batches in this process, one thread. K in {1, 4, 16, 64}, widths 16/32/64 (1, 1
   and 2 layers), batch 16 x 256 tokens: the study's shapes. Printed as the ratio
   (time of K single steps) / (time of one stack step), best of the repeats, so
   background load hits both alike. Eager only (torch.compile is not used by stacks).
2. Whole runs, start to summary.json, at a study run length (2 epochs of 512
   sequences, batch 16, evaluation and checkpoint at the end): K configs that differ
   in lr trained as K separate `llama-train run` processes, one after another (a
   one-core Slurm array), against one process training them as one stack
   (`train_stack`). The ratio is the wall time of the first over the second.

BENCH_STACK_QUICK=1 runs a short version (K up to 16, widths 16 and 32, table 2
with 4 configs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llama_train.core.model import Llama, ModelConfig
from llama_train.core.optim import OptimConfig, build_optimizer, clip_gradients, set_lr
from llama_train.core.stack import StackedAdamW, StackedLlama, clip_member_gradients

QUICK = os.environ.get("BENCH_STACK_QUICK") == "1"
KS = (1, 4, 16) if QUICK else (1, 4, 16, 64)
SHAPES = {16: (1, 1), 32: (1, 2), 64: (2, 4)}  # width: (layers, heads)
WIDTHS = (16, 32) if QUICK else (16, 32, 64)
BATCH, SEQ, VOCAB = 16, 256, 16
STEPS, REPEATS = (2, 1) if QUICK else (3, 2)
RUNS = 4 if QUICK else 16
RUN_ROWS = 512  # train sequences of a table-2 run: 2 epochs = 64 steps of 16


def _model_config(width: int) -> ModelConfig:
    layers, heads = SHAPES[width]
    return ModelConfig(
        dim=width, n_layers=layers, n_heads=heads, vocab_size=VOCAB, max_seq_len=SEQ + 1
    )


def _singles_seconds(config: ModelConfig, k: int, batches: list[torch.Tensor]) -> float:
    """Seconds per round of K single-model steps (forward, backward, clip, AdamW)."""
    cfg = OptimConfig(lr=1e-3)
    models = [Llama(config, seed=seed) for seed in range(k)]
    optimizers = [build_optimizer(model, cfg) for model in models]
    best = float("inf")
    for _ in range(REPEATS):
        for index, batch in enumerate(batches):
            if index == 1:  # the first round warms up
                started = time.perf_counter()
            for model, optimizer in zip(models, optimizers, strict=True):
                set_lr(optimizer, cfg.lr)
                model(batch[:, :-1], batch[:, 1:]).loss.backward()
                clip_gradients(model, cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        best = min(best, (time.perf_counter() - started) / (len(batches) - 1))
    return best


def _stack_seconds(config: ModelConfig, k: int, batches: list[torch.Tensor]) -> float:
    """Seconds per step of one stack of K members on the same batches."""
    cfgs = [OptimConfig(lr=1e-3)] * k
    stack = StackedLlama.from_models([Llama(config, seed=seed) for seed in range(k)])
    optimizer = StackedAdamW(stack, cfgs)
    best = float("inf")
    for _ in range(REPEATS):
        for index, batch in enumerate(batches):
            if index == 1:
                started = time.perf_counter()
            stack(batch[:, :-1], batch[:, 1:]).sum().backward()
            clip_member_gradients(stack, [cfg.grad_clip for cfg in cfgs])
            optimizer.step([cfg.lr for cfg in cfgs])
            optimizer.zero_grad()
        best = min(best, (time.perf_counter() - started) / (len(batches) - 1))
    return best


def test_table_1_training_steps() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=generator)] * (STEPS + 1)
        rows = []
        for width in WIDTHS:
            config = _model_config(width)
            for k in KS:
                singles = _singles_seconds(config, k, batches)
                stacked = _stack_seconds(config, k, batches)
                rows.append((width, config.n_layers, k, singles, stacked))
    finally:
        torch.set_num_threads(threads)
    print(
        f"\nstack table 1: training steps, eager, 1 thread, batch {BATCH} x {SEQ}, "
        f"best of {REPEATS}; ratio = K single steps / one stack step"
    )
    print(f"  {'width':>5} {'layers':>6} {'K':>3} {'K singles s':>12} {'stack s':>9} {'ratio':>6}")
    for width, layers, k, singles, stacked in rows:
        print(
            f"  {width:5d} {layers:6d} {k:3d} {singles:12.4f} {stacked:9.4f} "
            f"{singles / stacked:6.2f}"
        )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, write_preset_store) -> Path:
    out = tmp_path_factory.mktemp("bench-stack") / "hmm.zarr"
    write_preset_store(out, "hmm", n_train=RUN_ROWS, n_test=256, seq_len=SEQ + 1)
    return out


def _overrides(store: Path, run_dir: Path, index: int) -> list[str]:
    return [
        f"data.path={store}",
        f"run.dir={run_dir}",
        f"run.name=lr{index}",
        "model.dim=32",
        "model.n_layers=1",
        "model.n_heads=2",
        "data.batch_size=16",
        f"optim.lr={1e-3 * (1 + index)}",
        "optim.warmup_steps=10",
        f"train.steps={2 * RUN_ROWS // 16}",
        "train.threads=1",
        "train.log_every=20",
        "train.progress=false",
        "eval.every=1000000",
        "eval.max_sequences=256",
        "checkpoint.every=1000000",
        "checkpoint.keep=1",
    ]


_STACK_SCRIPT = """
import sys
from llama_train.config import resolve_config
from llama_train.train_stack import train_stack
groups = [arg.split("\\x1f") for arg in sys.argv[1:]]
result = train_stack([resolve_config(None, group) for group in groups], progress=False)
assert not result.errors, result.errors
"""


def test_table_2_whole_runs(store: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    for index in range(RUNS):
        command = [sys.executable, "-m", "llama_train", "run"]
        command += _overrides(store, tmp_path / "alone" / f"lr{index}", index)
        subprocess.run(command, check=True, env=env, capture_output=True)
    separate = time.perf_counter() - started
    groups = [
        "\x1f".join(_overrides(store, tmp_path / "stack" / f"lr{index}", index))
        for index in range(RUNS)
    ]
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", _STACK_SCRIPT, *groups], check=True, env=env, capture_output=True
    )
    stacked = time.perf_counter() - started
    for index in range(RUNS):
        assert (tmp_path / "stack" / f"lr{index}" / "summary.json").is_file()
    print(
        f"\nstack table 2: whole runs ({2 * RUN_ROWS // 16} steps, batch 16 x {SEQ}, width 32, "
        f"1 layer, eval + checkpoint), {RUNS} configs differing in lr, 1 thread"
    )
    print(f"  {RUNS} separate processes, one after another: {separate:8.1f} s")
    print(f"  one process, one stack of {RUNS}:            {stacked:8.1f} s")
    print(f"  ratio:                                     {separate / stacked:8.2f}")
