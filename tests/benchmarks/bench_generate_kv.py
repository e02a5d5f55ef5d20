"""Generation speed: the KV cache against recomputing the whole prefix (`make bench`).

The demo architecture (packages/llama-train/configs/demo.yaml: dim 64, 2 layers, 4
heads, vocabulary 64, context 129), random weights, one thread:

- cached: `core.generation.generate_batch`, what `llama-train generate` runs: one
  prefill pass, then one slot per row and new token;
- recompute: `core.generation.generate_recompute`, the same sampler without a cache:
  every new token runs the whole prefix again (quadratic in the length);
- both draw the same tokens (asserted), so the ratio is pure speed;
- then prompts of different lengths (1..64 tokens) decoded as one padded batch
  against the same prompts decoded one at a time (batch 1 each).

Best of REPEATS for each, alternating, so background load hits both alike.
"""

from __future__ import annotations

import time

import torch

from llama_train.core.decoding import generate_batch, generate_recompute
from llama_train.core.model import Llama, ModelConfig

BATCH, NEW_TOKENS, REPEATS = 16, 128, 2
MIXED_PROMPTS, MIXED_NEW = 16, 64


def _model() -> Llama:
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=64, max_seq_len=129)
    return Llama(config, seed=0).eval()


def _rate(run, tokens: int) -> tuple[float, object]:
    started = time.perf_counter()
    result = run()
    return tokens / (time.perf_counter() - started), result


def test_kv_cache_generation_against_recomputing_the_prefix() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _model()
        prompt = torch.zeros(BATCH, 1, dtype=torch.long)
        tokens = BATCH * NEW_TOKENS
        cached_rates, recompute_rates = [], []
        for _ in range(REPEATS):
            rate, cached = _rate(
                lambda: generate_batch(model, list(prompt), NEW_TOKENS, seed=1).new_tokens,
                tokens,
            )
            cached_rates.append(rate)
            rate, recomputed = _rate(
                lambda: generate_recompute(model, prompt, NEW_TOKENS, seed=1), tokens
            )
            recompute_rates.append(rate)
            assert torch.equal(cached, recomputed)
        generator = torch.Generator().manual_seed(0)
        lengths = torch.randint(1, 65, (MIXED_PROMPTS,), generator=generator).tolist()
        mixed = [
            torch.cat([torch.zeros(1, dtype=torch.long), torch.randint(0, 64, (n - 1,))])
            for n in lengths
        ]
        mixed_tokens = MIXED_PROMPTS * MIXED_NEW
        batched_rates, single_rates = [], []
        for _ in range(REPEATS):
            batched_rates.append(
                _rate(lambda: generate_batch(model, mixed, MIXED_NEW), mixed_tokens)[0]
            )
            single_rates.append(
                _rate(lambda: [generate_batch(model, [p], MIXED_NEW) for p in mixed], mixed_tokens)[
                    0
                ]
            )
    finally:
        torch.set_num_threads(threads)
    cached_best, recompute_best = max(cached_rates), max(recompute_rates)
    print(
        f"\nllama-train generate (KV cache), demo model (dim 64, 2 layers), batch {BATCH}, "
        f"prompt '0' + {NEW_TOKENS} new tokens, 1 thread, best of {REPEATS}"
    )
    print(f"  recompute the whole prefix: {recompute_best:9.0f} tokens/s")
    print(
        f"  KV cache:                   {cached_best:9.0f} tokens/s = "
        f"{cached_best / recompute_best:.1f}x recompute (same tokens)"
    )
    print(
        f"  {MIXED_PROMPTS} prompts of {min(lengths)}-{max(lengths)} tokens + {MIXED_NEW} new: "
        f"one padded batch {max(batched_rates):.0f} tokens/s, one prompt at a time "
        f"{max(single_rates):.0f} tokens/s = {max(batched_rates) / max(single_rates):.1f}x"
    )
