"""Tokens per second of the block sampler against a reference sampler (`make bench`).

The `hmm` preset at seq_len 257 (one latent of 64 states, 32 tokens, alpha
1e-3), one block of 4096 sequences at a time, as `gssm-data generate` draws it.
Measured in the same run:

- reference: a straightforward sampler as research code writes it, vectorised
  over sequences, with one cumsum + argmax draw over the full row per token and
  node;
- `BlockSampler.block`: alias tables, one 64-bit word per draw, the observed
  node vectorised over time chunks.

Figures are CPU seconds of this process (`time.process_time`), so other jobs on
a shared machine slow them less than wall time would; wall-clock rates are
printed beside them. Also printed: the time to build the alias tables of a
65,536-row table (the kind of table a four-input node has). About 10 s in all.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from gssm_data.graph import GraphSpec
from gssm_data.kernels import draw_kernels
from gssm_data.presets import load_preset
from gssm_data.sampler import BLOCK_SIZE, AliasTable, BlockSampler

SEQ_LEN = 257
SEED = 0


def reference_block(
    graph: GraphSpec, conditionals: dict[str, np.ndarray], n_seq: int, rng: np.random.Generator
) -> np.ndarray:
    """Tokens (n_seq, SEQ_LEN) drawn as research code does: cumsum + argmax per draw."""
    states = {node.name: np.zeros((n_seq, SEQ_LEN), dtype=np.int64) for node in graph.nodes}
    for t in range(1, SEQ_LEN):
        for node in graph.order:
            inputs = [] if node.observed else [states[node.name][:, t - 1]]
            inputs += [states[parent][:, t] for parent in node.parents]
            rows = conditionals[node.name][tuple(inputs)]  # (n_seq, states)
            cumulative = np.cumsum(rows, axis=1)
            uniform = rng.random((n_seq, 1)) * cumulative[:, -1:]
            states[node.name][:, t] = np.argmax(cumulative > uniform, axis=1)
    return states[graph.observed.name]


def measure(draw: Callable[[int], np.ndarray], repeats: int) -> tuple[float, float, np.ndarray]:
    """(CPU seconds, wall seconds) per call, best of `repeats`, and the last tokens."""
    draw(0)  # warm-up: allocations, caches
    cpu, wall = [], []
    tokens = np.empty(0)
    for i in range(repeats):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        tokens = draw(i + 1)
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start_wall)
    return min(cpu), min(wall), tokens


def unigram(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    counts = np.bincount(tokens[:, 1:].reshape(-1).astype(np.int64), minlength=vocab_size)
    return counts / counts.sum()


def test_block_sampler_against_reference_sampler() -> None:
    graph = load_preset("hmm")
    conditionals = draw_kernels(graph, SEED)
    sampler = BlockSampler(graph, conditionals, SEQ_LEN, SEED)
    tokens_per_block = BLOCK_SIZE * SEQ_LEN

    fast_cpu, fast_wall, fast_tokens = measure(lambda b: sampler.block(1, b).tokens, repeats=8)
    n_reference = BLOCK_SIZE  # the same vectorisation width
    ref_cpu, ref_wall, ref_tokens = measure(
        lambda b: reference_block(graph, conditionals, n_reference, np.random.default_rng(b)),
        repeats=3,
    )
    fast_rate, ref_rate = tokens_per_block / fast_cpu, n_reference * SEQ_LEN / ref_cpu
    print(
        f"\nsampler, hmm preset, seq_len {SEQ_LEN}, one core:"
        f"\n  BlockSampler.block : {fast_rate / 1e6:7.1f} M tokens/s CPU"
        f" ({tokens_per_block / fast_wall / 1e6:.1f} M/s wall)"
        f"\n  reference (cumsum) : {ref_rate / 1e6:7.1f} M tokens/s CPU"
        f" ({n_reference * SEQ_LEN / ref_wall / 1e6:.1f} M/s wall)"
        f"\n  ratio              : {fast_rate / ref_rate:7.1f}x"
    )
    # Same law: the unigram distributions agree (a broken fast sampler is no win).
    distance = (
        0.5
        * np.abs(
            unigram(fast_tokens, graph.vocab_size) - unigram(ref_tokens, graph.vocab_size)
        ).sum()
    )
    assert distance < 0.1, distance
    assert fast_rate > ref_rate


def test_alias_table_build_time() -> None:
    rows = np.random.default_rng(SEED).dirichlet(np.full(16, 0.05), size=65_536)
    start = time.process_time()
    table = AliasTable.build(rows)
    elapsed = time.process_time() - start
    print(
        f"\nAliasTable.build, 65,536 rows x 16 states: {elapsed * 1e3:.0f} ms CPU "
        f"({elapsed / table.n_rows * 1e9:.0f} ns per row)"
    )
