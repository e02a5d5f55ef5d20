"""Batched decoding with a KV cache: many prompts of different lengths in one batch.

Prompts are left-padded to a common length; the cache records each row's padding, so
row b's tokens keep their own positions (slot - pad[b]) and never attend to filler
slots (`core.attention`). A row therefore decodes exactly as it would alone, up to
float rounding of the batched matmuls.

Sampling is reproducible *per row*: row r of a call with `seed` draws its uniforms from
its own generator, seeded by (seed, row id), and turns them into tokens by inverting the
cumulative distribution. So a sample depends on its seed, its row id and its prompt,
never on which other rows share its batch or on the batch size; `torch.multinomial`
with one shared generator would give a row different draws in a different batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from llama_train.core.model import KVCache, Llama
from llama_train.errors import LlamaTrainError

# The filler token of padded slots; any token works (no real token attends to it).
PAD_TOKEN = 0


@dataclass(frozen=True)
class Decoded:
    """Result of :func:`generate_batch` for B rows and M new tokens."""

    new_tokens: Tensor  # (B, M) int64
    model_nll: Tensor  # (B, M) float64: -log q(token) under the model at temperature 1
    sampler_nll: Tensor  # (B, M) float64: -log q'(token) under the law it was drawn from
    logits: Tensor | None  # (B, M, V) the logits each new token was drawn from, if asked


def row_uniforms(seed: int, row_ids: Sequence[int], steps: int) -> np.ndarray:
    """(rows, steps) uniforms in [0, 1): row r's come from a generator seeded by (seed, r)."""
    return np.stack(
        [np.random.default_rng([seed, int(row)]).random(steps) for row in row_ids]
    ).reshape(len(row_ids), steps)


def sampler_logits(logits: Tensor, temperature: float, top_k: int | None = None) -> Tensor:
    """The logits (B, V) -> (B, V) float64 of the law a sampler with temperature > 0 draws
    from: divided by the temperature, tokens below the k-th largest (ties with it kept)
    set to -inf."""
    scaled = logits.double() / temperature
    if top_k is not None and top_k < scaled.size(-1):
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]  # (B, 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return scaled


def sampler_log_probs(logits: Tensor, temperature: float, top_k: int | None = None) -> Tensor:
    """log q'(token) (B, V) float64 of the distribution :func:`sample_with_uniforms` draws
    from; greedy decoding (temperature 0) is the point mass on the argmax."""
    if temperature == 0:
        point = torch.full(logits.shape, float("-inf"), dtype=torch.float64, device=logits.device)
        return point.scatter(-1, logits.argmax(dim=-1, keepdim=True), 0.0)
    return F.log_softmax(sampler_logits(logits, temperature, top_k), dim=-1)


def sample_with_uniforms(
    logits: Tensor, uniforms: Tensor, temperature: float, top_k: int | None = None
) -> Tensor:
    """One token per row of logits (B, V) -> (B,), by inverting the CDF at uniforms (B,).

    temperature 0 is greedy (argmax); top_k keeps the k most likely tokens (ties with
    the k-th too). The CDF is summed in float64, so a draw moves only when its uniform
    falls within rounding of a boundary.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = sampler_logits(logits, temperature, top_k)
    cdf = scaled.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    target = uniforms.to(cdf)[:, None] * cdf[:, -1:]  # (B, 1)
    # First index whose CDF exceeds the target: zero-probability tokens are never hit.
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return index.clamp(max=scaled.size(-1) - 1)


def left_pad(prompts: Sequence[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """Stack 1-D prompts into (B, L) with L the longest, filler first; and pad (B,)."""
    longest = max(int(p.numel()) for p in prompts)
    batch = torch.full((len(prompts), longest), PAD_TOKEN, dtype=torch.long, device=device)
    pad = torch.empty(len(prompts), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        batch[row, longest - prompt.numel() :] = prompt.to(device)
        pad[row] = longest - prompt.numel()
    return batch, pad


def check_request(
    model: Llama, prompt_lengths: Sequence[int], max_new_tokens: int, temperature: float
) -> None:
    """User errors of a generation request, each one line."""
    if not prompt_lengths:
        raise LlamaTrainError("no prompts to continue")
    if min(prompt_lengths) < 1:
        raise LlamaTrainError("every prompt needs at least the start token 0")
    if max_new_tokens < 1:
        raise LlamaTrainError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not np.isfinite(temperature) or temperature < 0:
        raise LlamaTrainError(
            f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}"
        )
    context = model.rope_cos.size(0)
    # The last token is never fed back, so a sample may be one token longer than the context.
    longest = max(prompt_lengths) + max_new_tokens - 1
    if longest > context:
        raise LlamaTrainError(
            f"prompt of {max(prompt_lengths)} tokens + {max_new_tokens} new tokens needs "
            f"{longest} positions; the model has model.max_seq_len={context}"
        )


@torch.no_grad()
def generate_batch(
    model: Llama,
    prompts: Sequence[Tensor],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    row_ids: Sequence[int] | None = None,
    keep_logits: bool = False,
) -> Decoded:
    """Continue every 1-D prompt by max_new_tokens tokens, all rows in one batch.

    The padded prompts are prefilled in one pass; each new token then costs one slot
    per row thanks to the KV cache. `row_ids` (default 0..B-1) name the rows' random
    streams (module docstring). Runs in eval mode and restores the previous mode.
    """
    if top_k is not None and top_k < 1:
        raise LlamaTrainError(f"top_k must be >= 1, got {top_k}")
    check_request(model, [int(p.numel()) for p in prompts], max_new_tokens, temperature)
    ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
    device = model.rope_cos.device
    uniforms = torch.from_numpy(row_uniforms(seed, ids, max_new_tokens)).to(device)
    batch, pad = left_pad(prompts, device)
    was_training = model.training
    model.eval()
    new_tokens, nll, sampler_nll, kept = [], [], [], []
    try:
        cache = KVCache(model.config.n_layers, batch.size(1) + max_new_tokens, pad=pad)
        logits = model(batch, cache=cache).logits[:, -1]  # (B, V)
        for step in range(max_new_tokens):
            token = sample_with_uniforms(logits, uniforms[:, step], temperature, top_k)  # (B,)
            log_q = F.log_softmax(logits.double(), dim=-1)
            nll.append(-log_q.gather(1, token[:, None]).squeeze(1))
            log_sampler = sampler_log_probs(logits, temperature, top_k)
            sampler_nll.append(-log_sampler.gather(1, token[:, None]).squeeze(1))
            new_tokens.append(token)
            if keep_logits:
                kept.append(logits)
            if step + 1 < max_new_tokens:
                logits = model(token[:, None], cache=cache).logits[:, -1]
    finally:
        model.train(was_training)
    return Decoded(
        new_tokens=torch.stack(new_tokens, dim=1),
        model_nll=torch.stack(nll, dim=1),
        sampler_nll=torch.stack(sampler_nll, dim=1),
        logits=torch.stack(kept, dim=1) if keep_logits else None,
    )


@torch.no_grad()
def generate_recompute(
    model: Llama,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    row_ids: Sequence[int] | None = None,
) -> Tensor:
    """The reference without a cache: every step runs the whole prefix (B, L + step) again.

    Equal-length prompts (B, L) only; returns the new tokens (B, M). What the KV cache is
    measured against (`make bench`) and checked against (tests).
    """
    ids = list(range(prompt.size(0))) if row_ids is None else list(row_ids)
    uniforms = torch.from_numpy(row_uniforms(seed, ids, max_new_tokens)).to(prompt.device)
    was_training = model.training
    model.eval()
    sequence = prompt
    try:
        for step in range(max_new_tokens):
            logits = model(sequence).logits[:, -1]
            token = sample_with_uniforms(logits, uniforms[:, step], temperature, top_k)
            sequence = torch.cat([sequence, token[:, None]], dim=1)
    finally:
        model.train(was_training)
    return sequence[:, prompt.size(1) :]
