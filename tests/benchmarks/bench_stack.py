"""Stacked training against one model at a time (`make bench`).

1. Training steps only: one stack of K members (`core.stack`) against K single
   models (`Llama` + torch AdamW + clipping, as `train.py` steps them), on the same
   batches in this process, one thread. K in {1, 4, 16, 64}, widths 16/32/64 (1, 1
   and 2 layers), batch 16 x 256 tokens: the study's shapes. Each row times four
   contenders, eager and compiled (`train.compile`: the single model compiled, or the
   stack's member losses), alternating, best of the repeats, so background load hits
   all alike; printed as ratios of step times: K single steps over one stack step,
   eager and compiled, and the compiled stack against the eager stack and against K
   eager single models. Compilation is not in the step times: its cost is the first
   step of each compiled contender, printed apart (the first row of a width compiles;
   later rows find the graphs in this benchmark's own, initially empty, cache).
2. Whole runs, start to summary.json, at a study run length (2 epochs of 512
   sequences, batch 16, evaluation and checkpoint at the end): K configs that differ
   in lr trained as K separate `llama-train run` processes, one after another (a
   one-core Slurm array), against one process training them as one stack
   (`train_stack`). The ratio is the wall time of the first over the second.
3. The persistent compile cache (`train.compile_cache`): the first compiled step of a
   stack, and of a single model, in a fresh process with an empty cache (cold) and in
   a second fresh process with the cache the first one filled (warm), which is what
   every run of a study after the first of its shape pays.

BENCH_STACK_QUICK=1 runs a short version (K up to 16, widths 16 and 32, table 2
with 4 configs). BENCH_STACK_DEVICE=cuda runs table 1 on the GPU instead (bf16
autocast, as `train.amp=auto` trains there; each time is taken after a
`torch.cuda.synchronize`), printing the card's name; tables 2 and 3 are CPU tables:
run them with `-k "table_1"` deselected or leave the variable unset.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from llama_train.core.compile_cache import compile_cache
from llama_train.core.model import Llama, ModelConfig
from llama_train.core.optim import OptimConfig, build_optimizer, clip_gradients, set_lr
from llama_train.core.stack import (
    StackedAdamW,
    StackedLlama,
    chunk_members,
    clip_member_gradients,
)

QUICK = os.environ.get("BENCH_STACK_QUICK") == "1"
DEVICE = torch.device(os.environ.get("BENCH_STACK_DEVICE", "cpu"))
KS = (1, 4, 16) if QUICK else (1, 4, 16, 64)
SHAPES = {16: (1, 1), 32: (1, 2), 64: (2, 4)}  # width: (layers, heads)
WIDTHS = (16, 32) if QUICK else (16, 32, 64)
BATCH, SEQ, VOCAB = 16, 256, 16
STEPS, REPEATS = (1, 3) if QUICK else (2, 3)
RUNS = 4 if QUICK else 16
RUN_ROWS = 512  # train sequences of a table-2 run: 2 epochs = 64 steps of 16
COLD_WARM_WIDTH, COLD_WARM_K = 32, 4  # table 3's stack


def _model_config(width: int) -> ModelConfig:
    layers, heads = SHAPES[width]
    return ModelConfig(
        dim=width, n_layers=layers, n_heads=heads, vocab_size=VOCAB, max_seq_len=SEQ + 1
    )


def _singles_step(config: ModelConfig, k: int, compiled: bool) -> Callable[[torch.Tensor], None]:
    """One round of K single-model steps (forward, backward, clip, AdamW), as train.py."""
    cfg = OptimConfig(lr=1e-3)
    models = [Llama(config, seed=seed).to(DEVICE) for seed in range(k)]
    optimizers = [build_optimizer(model, cfg) for model in models]
    # As distributed.parallelize: the model compiled, the optimizer and clipping eager.
    callables = [torch.compile(model) if compiled else model for model in models]

    def step(batch: torch.Tensor) -> None:
        for model, call, optimizer in zip(models, callables, optimizers, strict=True):
            set_lr(optimizer, cfg.lr)
            with _autocast():
                loss = call(batch[:, :-1], batch[:, 1:]).loss
            loss.backward()
            clip_gradients(model, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def _stack_step(config: ModelConfig, k: int, compiled: bool) -> Callable[[torch.Tensor], None]:
    """One step of one stack of K members, as train_stack steps it."""
    cfgs = [OptimConfig(lr=1e-3)] * k
    stack = StackedLlama.from_models([Llama(config, seed=seed) for seed in range(k)]).to(DEVICE)
    optimizer = StackedAdamW(stack, cfgs)
    stack.chunk = chunk_members(config, BATCH * SEQ, DEVICE)
    if compiled:
        stack.compile_losses()

    def step(batch: torch.Tensor) -> None:
        with _autocast():
            stack.backward_losses(batch[:, :-1], batch[:, 1:])
        clip_member_gradients(stack, [cfg.grad_clip for cfg in cfgs])
        optimizer.step([cfg.lr for cfg in cfgs])
        optimizer.zero_grad()

    return step


def _autocast() -> contextlib.AbstractContextManager[None]:
    """bf16 autocast on a GPU (what `train.amp=auto` trains with there); nothing on a CPU."""
    if DEVICE.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _now() -> float:
    """The time once the device has finished what was queued (GPU kernels are asynchronous)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _best_seconds(
    steps: list[Callable[[torch.Tensor], None]], batch: torch.Tensor
) -> tuple[list[float], list[float]]:
    """Best seconds per step of each contender, and the seconds of its first step (for a
    compiled one, mostly compilation; not counted in the best). Repeats alternate between
    the contenders, so a burst of background load hits all alike."""
    first = []
    for step in steps:
        started = _now()
        step(batch)
        first.append(_now() - started)
    best = [float("inf")] * len(steps)
    for _ in range(REPEATS):
        for index, step in enumerate(steps):
            started = _now()
            for _ in range(STEPS):
                step(batch)
            best[index] = min(best[index], (_now() - started) / STEPS)
    return best, first


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_table_1_training_steps(one_thread: None, tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=generator).to(DEVICE)
    rows = []
    with compile_cache(tmp_path / "compile-cache"):
        for width in WIDTHS:
            config = _model_config(width)
            for k in KS:
                contenders = [
                    make(config, k, compiled)
                    for compiled in (False, True)
                    for make in (_singles_step, _stack_step)
                ]
                best, first = _best_seconds(contenders, batch)
                rows.append((width, config.n_layers, k, best, first[2:]))
    where = (
        f"{torch.cuda.get_device_name(DEVICE)}, bf16 autocast"
        if DEVICE.type == "cuda"
        else "CPU, 1 thread"
    )
    print(
        f"\nstack table 1: training steps, {where}, batch {BATCH} x {SEQ}, best of {REPEATS}; "
        "ratios of step times: K single steps / one stack step, eager (e) and compiled (c); "
        "seconds of the first compiled step (compilation) apart"
    )
    print(
        f"  {'width':>5} {'layers':>6} {'K':>3} {'e singles':>10} {'e stack':>8} {'ratio':>6} "
        f"{'c singles':>10} {'c stack':>8} {'ratio':>6} {'c/e stack':>9} {'c stack/e singles':>17}"
        f" {'1st c singles':>13} {'1st c stack':>11}"
    )
    for width, layers, k, (singles, stack, c_singles, c_stack), (first_s, first_k) in rows:
        print(
            f"  {width:5d} {layers:6d} {k:3d} {singles:10.4f} {stack:8.4f} {singles / stack:6.2f} "
            f"{c_singles:10.4f} {c_stack:8.4f} {c_singles / c_stack:6.2f} {stack / c_stack:9.2f} "
            f"{singles / c_stack:17.2f} {first_s:13.1f} {first_k:11.1f}"
        )


_FIRST_STEP_SCRIPT = """
import sys, time, torch
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import bench_stack as bench
from llama_train.core.compile_cache import compile_cache
torch.set_num_threads(1)
batch = torch.randint(0, bench.VOCAB, (bench.BATCH, bench.SEQ + 1))
make = bench._stack_step if sys.argv[3] == "stack" else bench._singles_step
with compile_cache(Path(sys.argv[2])):
    step = make(bench._model_config(bench.COLD_WARM_WIDTH), bench.COLD_WARM_K, True)
    started = time.perf_counter()
    step(batch)
print(time.perf_counter() - started)
"""


CPU_ONLY = pytest.mark.skipif(DEVICE.type != "cpu", reason="a CPU table (BENCH_STACK_DEVICE)")


@CPU_ONLY
def test_table_3_compile_cache_cold_and_warm(tmp_path: Path) -> None:
    def first_step(what: str) -> float:
        """Seconds of the first compiled step of `what` in a fresh process."""
        cache = tmp_path / f"cache-{what}"  # its own: the two share generated kernels
        script = [sys.executable, "-c", _FIRST_STEP_SCRIPT, str(Path(__file__).parent)]
        done = subprocess.run(
            [*script, str(cache), what],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return float(done.stdout.split()[-1])

    print(
        f"\nstack table 3: first compiled step (K = {COLD_WARM_K}, width {COLD_WARM_WIDTH}, "
        f"batch {BATCH} x {SEQ}, 1 thread), each in a fresh process: cold = empty "
        "train.compile_cache, warm = the cache the cold process filled"
    )
    for what, label in (("stack", "one stack"), ("singles", "single models")):
        cold, warm = first_step(what), first_step(what)
        print(f"  {label:<14} cold {cold:6.1f} s   warm {warm:6.1f} s   = {cold / warm:5.1f}x")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, write_preset_store) -> Path:
    out = tmp_path_factory.mktemp("bench-stack") / "hmm.zarr"
    write_preset_store(out, "hmm", n_train=RUN_ROWS, n_test=256, seq_len=SEQ + 1)
    return out


def _base_config(store: Path, tmp_path: Path) -> Path:
    """The settings every table-2 run shares (the study's base-small.yaml, at a run length
    of 2 epochs of RUN_ROWS sequences)."""
    path = tmp_path / "base.yaml"
    path.write_text(
        f"""
data: {{path: {store}, batch_size: 16}}
model: {{dim: 32, n_layers: 1, n_heads: 2}}
optim: {{warmup_steps: 10}}
train: {{steps: {2 * RUN_ROWS // 16}, threads: 1, log_every: 20, progress: false}}
eval: {{every: 1000000, max_sequences: 256}}
checkpoint: {{every: 1000000, keep: 1}}
"""
    )
    return path


def _overrides(run_dir: Path, index: int) -> list[str]:
    return [f"run.dir={run_dir}", f"run.name=lr{index}", f"optim.lr={1e-3 * (1 + index)}"]


_STACK_SCRIPT = """
import sys
from llama_train.recipe.train_config import resolve_config
from llama_train.recipe.train_stack import train_stack
base, *groups = sys.argv[1:]
configs = [resolve_config(base, group.split("\x1f")) for group in groups]
result = train_stack(configs, progress=False)
assert not result.errors, result.errors
"""


def _timed(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return time.perf_counter() - started


@CPU_ONLY
def test_table_2_whole_runs(store: Path, tmp_path: Path) -> None:
    base = _base_config(store, tmp_path)
    run = [sys.executable, "-m", "llama_train", "run", str(base)]
    separate = sum(
        _timed([*run, *_overrides(tmp_path / "alone" / f"lr{index}", index)])
        for index in range(RUNS)
    )
    groups = [
        "\x1f".join(_overrides(tmp_path / "stack" / f"lr{index}", index)) for index in range(RUNS)
    ]
    stacked = _timed([sys.executable, "-c", _STACK_SCRIPT, str(base), *groups])
    for index in range(RUNS):
        assert (tmp_path / "stack" / f"lr{index}" / "summary.json").is_file()
    print(
        f"\nstack table 2: whole runs ({2 * RUN_ROWS // 16} steps, batch 16 x {SEQ}, width 32, "
        f"1 layer, eval + checkpoint), {RUNS} configs differing in lr, 1 thread"
    )
    print(f"  {RUNS} separate processes, one after another: {separate:8.1f} s")
    print(f"  one process, one stack of {RUNS}:            {stacked:8.1f} s")
    print(f"  ratio:                                     {separate / stacked:8.2f}")
