"""Speed of the exact entropy: factored scaled forward vs a log-space reference.

Run with `make bench` (``pytest -s tests/benchmarks -o python_files='bench_*.py'``).

- `hmm` preset, B = 256 sequences of 257 tokens: sequences per second of
  :func:`gssm_data.entropy.sequence_entropy` against the straightforward
  research-code reference written below (materialise the S x S joint
  transition, ``logsumexp`` per step), as a ratio measured in the same run.
  Target: >= 20x.
- `large` preset (4 latents, 10^4 joint states), where the S x S reference is
  infeasible (10^8 entries per step and sequence): absolute seconds per
  sequence of 257 tokens. Target: < 1 s.

Both also check that the figures agree (the reference to 1e-9 nats).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import numpy as np
import torch

from gssm_data.entropy import sequence_entropy
from gssm_data.graph import GraphSpec
from gssm_data.kernels import draw_kernels
from gssm_data.presets import load_preset
from gssm_data.sampler import BlockSampler

SEQ_LEN = 257


def _joint_log_tables(
    graph: GraphSpec, conditionals: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """log A (S, S) of the joint latent transition and log E (S, V) of the emission."""
    names = [node.name for node in graph.latents]
    states = list(itertools.product(*(range(node.states) for node in graph.latents)))
    size = len(states)
    transition = np.ones((size, size))
    emission = np.empty((size, graph.vocab_size))
    for j, new in enumerate(states):
        current = dict(zip(names, new, strict=True))
        for i, old in enumerate(states):
            previous = dict(zip(names, old, strict=True))
            for node in graph.latents:
                inputs = (previous[node.name], *(current[p] for p in node.parents))
                transition[i, j] *= conditionals[node.name][(*inputs, current[node.name])]
        observed = graph.observed
        emission[j] = conditionals[observed.name][tuple(current[p] for p in observed.parents)]
    return np.log(transition), np.log(emission)


def reference_log_space(
    graph: GraphSpec, conditionals: dict[str, np.ndarray], tokens: np.ndarray
) -> np.ndarray:
    """The research-code forward: S x S log transition, one logsumexp per step."""
    log_transition, log_emission = _joint_log_tables(graph, conditionals)
    log_a = torch.as_tensor(log_transition)
    log_e = torch.as_tensor(log_emission)
    tokens_t = torch.as_tensor(tokens.astype(np.int64))
    n_seq, n_steps = tokens.shape
    log_alpha = torch.full((n_seq, log_a.shape[0]), -torch.inf, dtype=torch.float64)
    log_alpha[:, 0] = 0.0  # every latent in state 0 at t = 0
    log_prefix = torch.zeros(n_seq, dtype=torch.float64)
    nats = torch.empty((n_seq, n_steps - 1), dtype=torch.float64)
    for t in range(1, n_steps):
        log_alpha = torch.logsumexp(log_alpha[:, :, None] + log_a[None], dim=1)
        log_alpha = log_alpha + log_e[:, tokens_t[:, t]].T
        log_total = torch.logsumexp(log_alpha, dim=1)
        nats[:, t - 1] = log_prefix - log_total
        log_prefix = log_total
    return nats.numpy()


def _sample(name: str, n_seq: int) -> tuple[GraphSpec, dict[str, np.ndarray], np.ndarray]:
    graph = load_preset(name)
    conditionals = draw_kernels(graph, seed=0)
    sampler = BlockSampler(graph, conditionals, SEQ_LEN, seed=0, block_size=n_seq)
    return graph, conditionals, sampler.block(1, 0).tokens


def _best_of(runs: int, work: Callable[[], object]) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def test_hmm_factored_forward_against_log_space_reference() -> None:
    graph, conditionals, tokens = _sample("hmm", 256)
    fast = sequence_entropy(graph, conditionals, tokens)
    slow = reference_log_space(graph, conditionals, tokens)
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-9)
    fast_s = _best_of(3, lambda: sequence_entropy(graph, conditionals, tokens))
    slow_s = _best_of(1, lambda: reference_log_space(graph, conditionals, tokens))
    n = len(tokens)
    print(
        f"\n[entropy] hmm (S={graph.joint_latent_states}, B={n}, T={SEQ_LEN}, "
        f"torch threads {torch.get_num_threads()}): factored {n / fast_s:,.0f} seq/s, "
        f"log-space reference {n / slow_s:,.0f} seq/s, ratio {slow_s / fast_s:.1f}x (target >= 20x)"
    )


def test_large_preset_seconds_per_sequence() -> None:
    """Absolute time on 10^4 joint states, with torch's default threads and with one.

    On a machine busy with other work, torch's spinning intra-op threads can
    make the default several times slower than one thread: both are printed.
    """
    graph, conditionals, tokens = _sample("large", 32)
    nats = sequence_entropy(graph, conditionals, tokens)
    assert np.all(np.isfinite(nats)) and np.all(nats >= 0)
    default_threads = torch.get_num_threads()
    timings = {default_threads: _best_of(1, lambda: sequence_entropy(graph, conditionals, tokens))}
    if default_threads != 1:
        torch.set_num_threads(1)
        try:
            timings[1] = _best_of(1, lambda: sequence_entropy(graph, conditionals, tokens))
        finally:
            torch.set_num_threads(default_threads)
    per_sequence = ", ".join(
        f"{seconds / len(tokens):.3f} s/sequence with {threads} thread(s)"
        for threads, seconds in timings.items()
    )
    print(
        f"\n[entropy] large (S={graph.joint_latent_states:,}, B={len(tokens)}, T={SEQ_LEN}): "
        f"{per_sequence} (target < 1 s)"
    )
