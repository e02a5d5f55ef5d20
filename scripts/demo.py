"""`make demo`: make a small store, train a small model on it, compare with the exact entropy.

    .venv/bin/python scripts/demo.py            # about 2 min of CPU (more wall when busy)
    .venv/bin/python scripts/demo.py --fresh    # retrain from scratch (the store is kept)

Three commands of the repository, run as a user would run them:

1. `gssm-data generate --preset base ... --with-latents` writes `datasets/demo-base.zarr`
   (20,000 training and 1,000 test sequences of 129 tokens, with their exact entropy and
   the latent states, so that `llama-train probe runs/demo` works afterwards); a complete
   store is reused, so the script is idempotent. A store of an older demo without latents
   is rewritten with them: the same seed gives the same tokens, so a trained run stays
   valid.
2. `llama-train run packages/llama-train/configs/demo.yaml` trains into `runs/demo`
   (running it again resumes, and a finished run only rewrites its summary).
3. `llama-train plot runs/demo` draws the loss curves next to the exact entropy.

It ends with a table: the final test loss, the exact entropy of the same test
sequences (the best any model can do), the excess loss, and two easy
baselines from the store's manifest (unigram frequencies, zstd compression).
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from llama_train.rundir import RunSummary

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "packages" / "llama-train" / "configs" / "demo.yaml"
STORE = ROOT / "datasets" / "demo-base.zarr"
RUN_DIR = ROOT / "runs" / "demo"
GENERATE = [
    "generate",
    "--preset", "base",
    "--n", "20000",
    "--n-test", "1000",
    "--seq-len", "129",
    "--seed", "0",
    "--with-latents",  # the latents do not change the tokens: the sampler draws them anyway
    "--out", str(STORE),
]  # fmt: skip

console = Console()
# Wall seconds of each command, in order (printed at the end: where the demo's time went).
TIMINGS: list[tuple[str, float]] = []


def command(name: str) -> str:
    """The console script `name` of this interpreter's environment (the repo's .venv)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        sys.exit(f"error: {name} is not installed; run `make venv` first")
    return found


def run(arguments: list[str]) -> None:
    """Run one command from the repository root; stop the demo if it fails."""
    shown = " ".join([Path(arguments[0]).name, *arguments[1:]])
    console.print(f"[bold]$ {shown}[/]", highlight=False)
    clock = time.perf_counter()
    if subprocess.run(arguments, cwd=ROOT).returncode != 0:
        sys.exit(1)
    TIMINGS.append((" ".join([Path(arguments[0]).name, arguments[1]]), time.perf_counter() - clock))


def store_lacks_latents() -> bool:
    """True for a complete store of an older demo, written without --with-latents."""
    from gssm_data.errors import GssmDataError
    from gssm_data.store import open_store

    if not STORE.exists():
        return False
    try:
        return not open_store(STORE).manifest.with_latents
    except GssmDataError:
        return False  # not a complete store: generate says what to do


def results_table(summary: RunSummary) -> Table:
    """Final test loss, exact entropy, excess loss and baselines, in nats and bits."""
    table = Table(
        title=f"demo: {summary.parameters:,}-parameter model, "
        f"{summary.step} steps, {summary.eval_sequences} test sequences"
    )
    table.add_column("per predicted token")
    table.add_column("nats", justify="right")
    table.add_column("bits", justify="right")
    rows = [
        ("model test loss", summary.test_loss),
        ("exact entropy (the floor)", summary.test_entropy),
        ("excess loss (model - floor)", summary.excess_loss),
    ]
    baselines = summary.baselines or {}
    if "unigram_bits" in baselines:
        rows.append(("unigram baseline", baselines["unigram_bits"] * math.log(2)))
    if "zstd_bits" in baselines:
        rows.append(("zstd -19 baseline", baselines["zstd_bits"] * math.log(2)))
    if "gzip_bits" in baselines:
        rows.append(("gzip -9 baseline", baselines["gzip_bits"] * math.log(2)))
    for name, nats in rows:
        table.add_row(name, f"{nats:.5f}", f"{nats / math.log(2):.5f}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="delete runs/demo and retrain")
    parser.add_argument(
        "--image", type=Path, default=RUN_DIR / "loss.png", help="where the loss plot goes"
    )
    args = parser.parse_args()
    if args.fresh and RUN_DIR.exists():
        shutil.rmtree(RUN_DIR)
    if store_lacks_latents():
        console.print(f"{STORE} has no latents: writing it again with them (same tokens)")
        run([command("gssm-data"), *GENERATE, "--force"])
    else:
        run([command("gssm-data"), *GENERATE])
    run([command("llama-train"), "run", str(CONFIG), f"data.path={STORE}", f"run.dir={RUN_DIR}"])
    run([command("llama-train"), "plot", str(RUN_DIR), "--out", str(args.image)])
    from llama_train.rundir import read_summary

    summary = read_summary(RUN_DIR)
    assert summary is not None, f"llama-train run left no summary in {RUN_DIR}"
    console.print()
    console.print(results_table(summary))
    image = args.image.resolve()
    shown = image.relative_to(ROOT) if image.is_relative_to(ROOT) else image
    console.print(
        f"trained {summary.tokens:,} tokens at {summary.tokens_per_s:,.0f} tokens/s "
        f"in {summary.train_seconds:.0f} s; loss curves: {shown}",
        highlight=False,
    )
    total = sum(seconds for _, seconds in TIMINGS)
    console.print(
        "time: "
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in TIMINGS)
        + f" (total {total / 60:.1f} min)",
        highlight=False,
    )
    console.print(
        f"next: `llama-train probe {RUN_DIR.relative_to(ROOT)}` probes the hidden state for "
        "the latent state, against the exact Bayes filter",
        highlight=False,
    )


if __name__ == "__main__":
    main()
