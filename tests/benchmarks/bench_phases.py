"""Where `make demo`'s time goes: its phases on a reduced demo, each as a share (`make bench`).

The demo (scripts/demo.py) writes a `base` store with its exact entropy, trains
the demo model on it with evaluations, and draws the loss plot. Here the same
steps run in this process on a smaller store and fewer steps:

- generate: sampling and writing the blocks, then checking them (generate's
  `write` and `verify` phases);
- entropy: the exact-entropy pass generate ends with (the test split to the
  default target standard error, the train split's check);
- train: the training steps (the trainer's profiler: data wait, forward and
  backward, optimizer);
- eval: the evaluations against the exact entropy (the profiler's `eval`);
- run set-up and checkpoints: the rest of the `train()` call;
- plot: `llama-train plot`'s drawing of the run.

Start-up of the three commands (interpreter and imports) is not included: it is
paid once per command, the same at any size. The shares are printed, with the
scale factors that turn them into the full demo's (steps and sequences).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from gssm_data.generate import GenerateOptions, generate
from gssm_data.presets import load_preset
from llama_train.analysis.plot import plot_runs
from llama_train.analysis.runs import load_runs
from llama_train.recipe.train import train
from llama_train.recipe.train_config import resolve_config

ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = ROOT / "packages/llama-train/configs/demo.yaml"
# The demo: 20,000 train and 1,000 test sequences of 129 tokens, 1,000 steps, an
# evaluation every 200. Reduced: the same sequence length and model, fewer of each.
N_TRAIN, N_TEST, SEQ_LEN = 4096, 256, 129
STEPS, EVAL_EVERY = 100, 50
DEMO_STEPS, DEMO_EVALS, DEMO_TEST = 1000, 5, 1000


def test_demo_phases_as_shares_of_the_total(tmp_path: Path) -> None:
    seconds: dict[str, float] = {}
    store = tmp_path / "demo-base.zarr"
    options = GenerateOptions(
        graph=load_preset("base"),
        name="base",
        out=store,
        n_train=N_TRAIN,
        n_test=N_TEST,
        seq_len=SEQ_LEN,
        seed=0,
        workers=1,
        threads=1,
        with_latents=True,
    )
    result = generate(options)
    seconds["entropy"] = result.phase_seconds["entropy"]
    seconds["generate"] = result.seconds - seconds["entropy"]

    run_dir = tmp_path / "run"
    config = resolve_config(
        DEMO_CONFIG,
        [
            f"data.path={store}",
            f"run.dir={run_dir}",
            f"train.steps={STEPS}",
            f"eval.every={EVAL_EVERY}",
            f"checkpoint.every={STEPS}",
            "train.progress=false",
        ],
    )
    clock = time.perf_counter()
    train(config)
    wall = time.perf_counter() - clock
    profile = json.loads((run_dir / "summary.json").read_text())["profile_seconds"]
    seconds["train"] = profile["data_wait"] + profile["forward_backward"] + profile["optimizer"]
    seconds["eval"] = profile["eval"]
    seconds["run set-up and checkpoints"] = max(wall - seconds["train"] - seconds["eval"], 0.0)

    clock = time.perf_counter()
    plot_runs(load_runs([run_dir]), tmp_path / "loss.png")
    seconds["plot"] = time.perf_counter() - clock

    total = sum(seconds.values())
    print(
        f"\nreduced demo ({N_TRAIN:,} train / {N_TEST} test sequences of {SEQ_LEN} tokens, "
        f"{STEPS} steps, an evaluation every {EVAL_EVERY}; one thread): {total:.1f} s"
    )
    for phase, value in sorted(seconds.items(), key=lambda item: -item[1]):
        print(f"  {phase:<28} {value:7.2f} s  {100 * value / total:5.1f} %")
    print(
        f"  the full demo: x{DEMO_STEPS / STEPS:.0f} train steps, "
        f"x{DEMO_EVALS * DEMO_TEST / (STEPS // EVAL_EVERY * N_TEST):.1f} evaluated sequences, "
        f"x{DEMO_TEST / N_TEST:.1f} test entropy"
    )
    assert all(value >= 0 for value in seconds.values())
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert seconds["train"] > 0 and seconds["entropy"] > 0


if __name__ == "__main__":
    pytest.main([__file__, "-q", "-s", "-p", "no:cacheprovider", "-o", "python_files=bench_*.py"])
