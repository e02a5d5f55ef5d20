"""Plots of a run: training and test loss against the exact entropy, and per position.

Reads only the run directory (metrics.jsonl, the latest eval/ result and
summary.json), so a finished, running or copied run can be plotted anywhere.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from llama_train.core.evaluate import latest_result
from llama_train.core.metrics import read_metrics
from llama_train.errors import LlamaTrainError
from llama_train.rundir import METRICS_FILENAME, SUMMARY_FILENAME


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw a run's curves into a PNG (default `<run dir>/loss.png`); return its path.

    Left (log scale): training loss per metrics line, evaluation loss, and
    the exact entropy of the evaluation set as the floor. Right: the last evaluation's
    loss at each position next to the exact entropy at that position.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LlamaTrainError(
            "plotting needs matplotlib: pip install 'llama-train[plot]'"
        ) from None
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train_lines = [r for r in records if r.get("loss") is not None]
    eval_lines = [r for r in records if r.get("eval/loss") is not None]
    if not train_lines and not eval_lines:
        raise LlamaTrainError(f"{run_dir / METRICS_FILENAME} has no loss to plot yet")
    final = latest_result(run_dir)
    figure, (curve, positions) = plt.subplots(1, 2, figsize=(12, 4.5))
    if train_lines:
        curve.plot(
            [r["step"] for r in train_lines],
            [r["loss"] for r in train_lines],
            label="training loss",
            color="tab:blue",
            linewidth=1,
        )
    if eval_lines:
        curve.plot(
            [r["step"] for r in eval_lines],
            [r["eval/loss"] for r in eval_lines],
            "o-",
            label="test loss",
            color="tab:orange",
            markersize=3,
        )
        entropy = eval_lines[-1]["eval/entropy"]
        curve.axhline(
            entropy, color="black", linestyle="--", label=f"exact entropy {entropy:.4f} nats"
        )
    for key, label, style in (("unigram_bits", "unigram", ":"), ("zstd_bits", "zstd", "-.")):
        nats = _baseline_nats(run_dir, key)
        if nats is not None:
            curve.axhline(nats, color="grey", linestyle=style, label=f"{label} {nats:.4f} nats")
    # Log scale: the approach to the floor, not the first steps, is the story.
    curve.set_yscale("log")
    curve.set_xlabel("step")
    curve.set_ylabel("nats per token (log scale)")
    curve.set_title(f"{run_dir.name}: loss against the exact entropy")
    curve.legend(fontsize="small")
    curve.grid(alpha=0.3)
    if final is not None:
        xs = range(1, len(final.loss_per_position) + 1)
        positions.plot(
            xs, final.loss_per_position, label=f"model (step {final.step})", color="tab:orange"
        )
        positions.plot(
            xs, final.entropy_per_position, label="exact entropy", color="black", linestyle="--"
        )
        positions.set_title(f"per position, {final.split} split ({final.n_sequences} sequences)")
        positions.legend()
    else:
        positions.set_title("no evaluation yet")
    positions.set_xlabel("position t (predicting x_t from x_<t)")
    positions.set_ylabel("nats")
    positions.grid(alpha=0.3)
    figure.tight_layout()
    target = Path(out) if out is not None else run_dir / "loss.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=120)
    plt.close(figure)
    return target


def _baseline_nats(run_dir: Path, key: str) -> float | None:
    """A baseline of the run's data from its summary.json (bits there), in nats; None if absent."""
    path = run_dir / SUMMARY_FILENAME
    if not path.is_file():
        return None
    baselines = json.loads(path.read_text()).get("baselines") or {}
    return baselines[key] * math.log(2) if key in baselines else None
