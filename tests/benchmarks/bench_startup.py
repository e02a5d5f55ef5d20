"""A study point as its own process: its start-up's share, and its efficiency (`make bench`).

The small study's smallest point (studies/small.yaml: d16, 128 train sequences of
257 tokens, two epochs = 16 steps, two evaluations) runs three ways on one hmm store:

- own process: `llama-train run` as a Slurm array task runs it; its CPU (user +
  system, from the child's rusage) and the CPU it had spent when its first step
  began (summary.json's startup_cpu_seconds: interpreter, imports, set-up);
- warm worker: `train()` again in this process, imports paid (a `study run` worker);
- bare loop: the same model, batch and steps in a minimal loop (forward, backward,
  clipping, torch.optim.AdamW), no evaluation, checkpoint or logging.

Printed: start-up as a share of the own-process point, and the trained tokens per
CPU-second of each way as a ratio to the bare loop, all measured in this one run
(one thread each), so the ratios hold at whatever load the machine has.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gssm_data.generate import GenerateOptions, generate
from gssm_data.presets import load_preset
from gssm_data.store import open_store
from llama_train.core.model import Llama
from llama_train.core.optim import build_optimizer, clip_gradients
from llama_train.recipe.train import train
from llama_train.recipe.train_config import resolve_config

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "packages/llama-train/configs/studies/base-small.yaml"
N_TRAIN, BATCH, SEQ_LEN, EPOCHS, EVALUATIONS = 128, 16, 257, 2, 2
STEPS = EPOCHS * N_TRAIN // BATCH


def _overrides(store: Path, run_dir: Path) -> list[str]:
    """The point as `study run` configures it (studies/small.yaml, model d16, lr 1e-2)."""
    return [
        f"data.path={store}",
        f"data.n_train={N_TRAIN}",
        f"run.dir={run_dir}",
        "model.dim=16",
        "model.n_layers=1",
        "model.n_heads=1",
        "optim.lr=1e-2",
        f"train.steps={STEPS}",
        f"eval.every={STEPS // EVALUATIONS}",
    ]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _bare_loop(store: Path, tokens_seen: int) -> float:
    """CPU seconds of the minimal loop over the point's steps and batches."""
    config = resolve_config(BASE, _overrides(store, store.parent / "unused"))
    rows = torch.from_numpy(open_store(store).tokens("train")[:N_TRAIN].astype("int64"))
    torch.manual_seed(0)
    model = Llama(config.model.model_copy(update={"vocab_size": int(rows.max()) + 1}))
    optimizer = build_optimizer(model, config.optim)
    order = torch.randperm(N_TRAIN * EPOCHS) % N_TRAIN
    clock = time.process_time()
    for step in range(STEPS):
        batch = rows[order[step * BATCH : (step + 1) * BATCH]]
        optimizer.zero_grad(set_to_none=True)
        model(batch[:, :-1], batch[:, 1:]).loss.backward()
        clip_gradients(model, config.optim.grad_clip)
        optimizer.step()
    seconds = time.process_time() - clock
    assert tokens_seen == STEPS * BATCH * (SEQ_LEN - 1)
    return seconds


IMPORT_CPU = """
import json, time
import torch
clock, seconds = time.process_time(), {}
for module in ("torch.distributed.checkpoint.state_dict", "torch._dynamo"):
    __import__(module)
    seconds[module], clock = time.process_time() - clock, time.process_time()
print(json.dumps(seconds))
"""


def _import_cpu(env: dict[str, str]) -> dict[str, float]:
    """CPU seconds of importing DCP's state_dict, then torch._dynamo, in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_CPU],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    return json.loads(done.stdout)


def test_a_study_points_start_up_share_and_tokens_per_cpu_second(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    store = tmp_path / "hmm.zarr"
    generate(
        GenerateOptions(
            graph=load_preset("hmm"),
            name="hmm",
            out=store,
            n_train=1024,
            n_test=256,
            seq_len=SEQ_LEN,
            seed=0,
            workers=1,
            threads=1,
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    before = _children_cpu()
    command = [sys.executable, "-m", "llama_train", "run", str(BASE)]
    done = subprocess.run(
        [*command, *_overrides(store, tmp_path / "own"), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    own_cpu = _children_cpu() - before
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    startup = summary["startup_cpu_seconds"]
    tokens = summary["tokens"]

    config = resolve_config(BASE, _overrides(store, tmp_path / "warm-up"))
    train(config, progress=False)  # pays this process's imports, as a worker's first point
    clock = time.process_time()
    warm = train(resolve_config(BASE, _overrides(store, tmp_path / "warm")), progress=False)
    warm_cpu = time.process_time() - clock
    bare_cpu = _bare_loop(store, tokens)

    rates = {
        "own process": tokens / own_cpu,
        "warm worker": tokens / warm_cpu,
        "bare loop": tokens / bare_cpu,
    }
    print(
        f"\na study point as its own process (d16, {N_TRAIN} sequences of {SEQ_LEN} tokens, "
        f"{STEPS} steps, {EVALUATIONS} evaluations; one thread; load "
        f"{os.getloadavg()[0]:.1f}): {own_cpu:.2f} s of CPU"
    )
    print(
        f"  start-up (before its first step)  {startup:6.2f} s  "
        f"{100 * startup / own_cpu:5.1f} % of the point"
    )
    once = own_cpu - startup - warm_cpu
    print(
        f"  the point's work as a warm worker does it  {warm_cpu:6.2f} s  "
        f"{100 * warm_cpu / own_cpu:5.1f} %"
    )
    print(
        f"  other once-per-process costs after start-up {once:6.2f} s  "
        f"{100 * once / own_cpu:5.1f} %"
    )
    for module, seconds in _import_cpu(env).items():
        print(f"    of which importing {module} (first checkpoint) {seconds:5.2f} s")
    print("  tokens per CPU-second:")
    for way, rate in rates.items():
        print(f"    {way:<12} {rate:10,.0f}  {rate / rates['bare loop']:5.2f} x the bare loop")
    assert warm["tokens"] == tokens
    assert 0 < startup < own_cpu
    assert all(rate > 0 for rate in rates.values())


if __name__ == "__main__":
    pytest.main([__file__, "-q", "-s", "-p", "no:cacheprovider", "-o", "python_files=bench_*.py"])
