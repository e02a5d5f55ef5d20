"""Tokens per second of `gssm-data generate` against a reference sampler (`make bench`).

The `hmm` preset at seq_len 257, as the upstream experiments use it, measured
in the same run:

- reference: a straightforward sampler as research code writes it, vectorised
  over sequences, with one cumsum + argmax draw per token and node;
- generate, end to end: the console script with `--workers 2` writing a store
  (layout, sampling, writing, verifying every block, entropy of the test split
  and of 4096 train sequences, rename), with the default 10,000 test sequences.
  Its summary line splits the time into phases: the write phase gives the rate
  that scales with `--n`, the rest is a fixed cost; together they extrapolate
  the time of `--n 1e8`;
- peak memory: the summed RSS of the process tree (main process and workers),
  sampled every 20 ms.

Targets: at least 20x the reference, `--n 1e8` under 30 minutes and
under 2 GB on a 2-core machine.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from gssm_data.kernels import draw_kernels
from gssm_data.presets import load_preset
from gssm_data.sampler import BLOCK_SIZE

SEQ_LEN = 257
REFERENCE_SEQUENCES = 1024
TRAIN_BLOCKS = 200
N_TEST = 10_000  # the default, so the fixed cost is the real one
TARGET_N = 10**8


def reference_tokens(graph, conditionals, n_sequences: int, seq_len: int, seed: int) -> np.ndarray:
    """One cumsum + argmax per token and node: the research-code baseline."""
    rng = np.random.default_rng(seed)
    order = graph.order
    position = {node.name: k for k, node in enumerate(order)}
    states = np.zeros((len(order), n_sequences, seq_len), dtype=np.int64)
    for t in range(1, seq_len):
        for k, node in enumerate(order):
            sizes = graph.input_sizes(node.name)
            inputs = ([] if node.observed else [states[k, :, t - 1]]) + [
                states[position[parent], :, t] for parent in node.parents
            ]
            row = np.zeros(n_sequences, dtype=np.int64)
            for value, size in zip(inputs, sizes, strict=True):
                row = row * size + value
            table = conditionals[node.name].reshape(-1, node.states)
            cumulative = np.cumsum(table[row], axis=1)
            uniform = rng.random((n_sequences, 1))
            states[k, :, t] = np.argmax(cumulative > uniform, axis=1)
    return states[position[graph.observed.name]].astype(np.uint8)


class PeakTreeMemory:
    """Largest summed RSS of a process and its descendants, sampled in a thread."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                tree = [self.process, *self.process.children(recursive=True)]
                self.peak = max(self.peak, sum(_rss(p) for p in tree))
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.02)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _rss(process: psutil.Process) -> int:
    try:
        return process.memory_info().rss
    except psutil.NoSuchProcess:
        return 0


def run_generate(out: Path, n_train: int) -> tuple[float, int, str]:
    """Wall time, peak tree memory and summary line of the console script writing a store."""
    script = Path(sys.executable).parent / "gssm-data"
    command = [script, "generate", "--preset", "hmm", "--n", str(n_train), "--workers", "2"]
    command += ["--seq-len", str(SEQ_LEN), "--out", str(out)]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = PeakTreeMemory(child.pid)
    stdout, stderr = child.communicate()
    seconds = time.perf_counter() - started
    peak = memory.stop()
    assert child.returncode == 0, stderr
    assert Path(stdout.strip()) == out.absolute()
    return seconds, peak, stderr.strip().splitlines()[-1]


def test_generate_throughput_against_reference_sampler(tmp_path: Path) -> None:
    graph = load_preset("hmm")
    conditionals = draw_kernels(graph, 0)
    started = time.perf_counter()
    tokens = reference_tokens(graph, conditionals, REFERENCE_SEQUENCES, SEQ_LEN, seed=0)
    reference_rate = tokens.size / (time.perf_counter() - started)

    n_train = TRAIN_BLOCKS * BLOCK_SIZE
    seconds, peak, summary = run_generate(tmp_path / "hmm.zarr", n_train)
    phases = {key: float(value) for key, value in re.findall(r"(\w+) ([\d.]+) s\b", summary)}
    write_rate = float(re.search(r"then ([\d.]+) M tokens/s", summary)[1]) * 1e6  # type: ignore[index]
    tokens_total = (n_train + N_TEST) * SEQ_LEN
    end_to_end_rate = tokens_total / seconds
    blocks = TRAIN_BLOCKS + -(-N_TEST // BLOCK_SIZE)
    target_blocks = -(-TARGET_N // BLOCK_SIZE) + -(-N_TEST // BLOCK_SIZE)
    first_block = float(re.search(r"first block after ([\d.]+) s", summary)[1])  # type: ignore[index]
    fixed = seconds - (tokens_total - BLOCK_SIZE * SEQ_LEN) / write_rate - phases["verify"]
    target_seconds = (
        (TARGET_N + N_TEST) * SEQ_LEN / write_rate
        + phases["verify"] * target_blocks / blocks
        + fixed
    )

    print()
    print(f"generate --preset hmm --seq-len {SEQ_LEN} --workers 2 --n {n_train}")
    print(f"  summary: {summary}")
    print(f"  reference sampler (cumsum/argmax): {reference_rate / 1e6:7.2f} M tokens/s")
    print(
        f"  generate, write phase:             {write_rate / 1e6:7.2f} M tokens/s "
        f"= {write_rate / reference_rate:.1f}x the reference"
    )
    print(
        f"  generate, end to end:              {end_to_end_rate / 1e6:7.2f} M tokens/s "
        f"= {end_to_end_rate / reference_rate:.1f}x ({seconds:.1f} s, of which "
        f"{fixed:.1f} s fixed: start-up and first block {first_block:.1f} s, entropy, rename)"
    )
    print(f"  peak memory (process tree RSS):    {peak / 2**20:7.0f} MiB")
    print(f"  extrapolated --n 1e8:              {target_seconds / 60:7.1f} min")
    assert write_rate > reference_rate
