"""Training throughput of the real trainer against a bare PyTorch loop (`make bench`).

Both run the demo model (packages/llama-train/configs/demo.yaml) on the same
batches of a small `hmm` store, in this process, with the same thread count:

- trainer: `llama_train.recipe.train.train(config)`, the function `llama-train run`
  calls, with everything it does per step (loader, learning-rate schedule,
  clipping, loss window, metrics lines, progress bookkeeping). Its steady
  rate is read from its own metrics.jsonl: tokens between the first and the
  last metrics line over the `elapsed` between them (the first
  `log_every` steps, the warm-up, are left out; so are the final evaluation
  and checkpoint, which come after the last line).
- bare loop: the same model, AdamW settings, gradient clipping and batches
  (read from the trainer's loader beforehand, into memory), written here in
  five lines; timed over the same steps, warm-up excluded.

Runs alternate (bare, trainer, bare, trainer) and the best of each is kept,
so background load on a shared machine hits both alike. Target: trainer /
bare >= 0.9. The loader is then timed alone: its batches per second against
the batches the training step consumes per second (target >= 20x).
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
import torch

from gssm_data.sampler import BLOCK_SIZE
from llama_train.core.data import build_loader
from llama_train.core.model import Llama
from llama_train.recipe.train import train
from llama_train.recipe.train_config import TrainConfig, resolve_config
from llama_train.rundir import read_metrics

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "packages/llama-train/configs/demo.yaml"
STEPS, LOG_EVERY, REPEATS = 60, 10, 2
LOADER_BATCHES = 3000  # 12 epochs of the 8192-row store: window reads included


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, write_preset_store) -> Path:
    """The demo's data at a smaller size: `hmm`, 129 tokens, 2 blocks of train sequences."""
    out = tmp_path_factory.mktemp("bench") / "hmm.zarr"
    write_preset_store(out, "hmm", n_train=2 * BLOCK_SIZE, n_test=256, seq_len=129)
    return out


def _config(store: Path, run_dir: Path) -> TrainConfig:
    return resolve_config(
        DEMO_CONFIG,
        [
            f"data.path={store}",
            f"run.dir={run_dir}",
            f"train.steps={STEPS}",
            f"train.log_every={LOG_EVERY}",
            "train.progress=false",
            f"eval.every={STEPS}",
            f"checkpoint.every={STEPS}",
        ],
    )


def _trainer_tokens_per_second(config: TrainConfig) -> float:
    train(config, progress=False)
    lines = [r for r in read_metrics(config.run_dir) if "loss" in r]
    first, last = lines[0], lines[-1]
    return (last["tokens"] - first["tokens"]) / (last["elapsed"] - first["elapsed"])


def _bare_tokens_per_second(config: TrainConfig, batches: list[torch.Tensor]) -> float:
    """The loop a person would write by hand around the same model and batches."""
    model = Llama(config.model, seed=config.run.seed)
    optim = config.optim
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay
    )
    started = 0.0
    for step, batch in enumerate(batches):
        if step == LOG_EVERY:  # the trainer's first metrics line: warm-up excluded alike
            started = time.perf_counter()
        loss = model(batch[:, :-1], batch[:, 1:]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    loss.item()
    tokens = (len(batches) - LOG_EVERY) * batches[0].shape[0] * (batches[0].shape[1] - 1)
    return tokens / (time.perf_counter() - started)


def _loader_batches_per_second(config: TrainConfig) -> float:
    loader = iter(build_loader(config.data, seed=config.run.seed))
    next(loader)  # worker start-up, if any
    started = time.perf_counter()
    for _ in itertools.islice(loader, LOADER_BATCHES):
        pass
    return LOADER_BATCHES / (time.perf_counter() - started)


def test_trainer_throughput_against_a_bare_loop(store: Path, tmp_path: Path) -> None:
    config = _config(store, tmp_path / "warmup")
    if config.train.threads is not None:  # what train() sets: the bare loop gets the same
        torch.set_num_threads(config.train.threads)
    batches = list(itertools.islice(iter(build_loader(config.data, seed=config.run.seed)), STEPS))
    bare, trainer = [], []
    for repeat in range(REPEATS):
        bare.append(_bare_tokens_per_second(config, batches))
        trainer.append(_trainer_tokens_per_second(_config(store, tmp_path / f"run{repeat}")))
    ratio = max(trainer) / max(bare)
    tokens_per_step = config.data.batch_size * (config.model.max_seq_len - 1)
    steps_per_second = max(trainer) / tokens_per_step
    loader_rate = _loader_batches_per_second(config)
    consumption = steps_per_second * config.train.grad_accum
    print(
        f"\ntrainer vs bare loop, demo model ({config.model.dim} dim, {config.model.n_layers} "
        f"layers), batch {config.data.batch_size} x {config.model.max_seq_len} tokens, "
        f"{torch.get_num_threads()} threads, best of {REPEATS}"
    )
    print(f"  bare PyTorch loop:    {max(bare):10.0f} tokens/s   (runs: {_runs(bare)})")
    print(f"  llama-train trainer:  {max(trainer):10.0f} tokens/s   (runs: {_runs(trainer)})")
    print(f"  ratio trainer / bare: {ratio:10.3f}   (target >= 0.9: {_met(ratio >= 0.9)})")
    print(
        f"  loader: {loader_rate:.0f} batches/s (num_workers={config.data.num_workers}) against "
        f"{consumption:.2f} consumed per second: {loader_rate / consumption:.0f}x "
        f"(target >= 20x: {_met(loader_rate / consumption >= 20)})"
    )


def _runs(values: list[float]) -> str:
    return ", ".join(f"{value:.0f}" for value in values)


def _met(condition: bool) -> str:
    return "met" if condition else "NOT met"
