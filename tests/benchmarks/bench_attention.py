"""Attention kernels: FlexAttention against SDPA, the numbers behind `model.attention: auto`.

The kernel alone (`core.attention.attend`), on the shapes the model runs:

- causal training/evaluation passes: the demo model (batch 32, 4 heads, 128 positions,
  head dim 16) and a larger one (batch 8, 8 heads, 512 positions, head dim 64); SDPA
  with ``is_causal`` against flex with a causal block mask;
- the prefill of a padded generation batch (rows left-padded by 0..T-1 slots): SDPA with
  a dense (B, 1, T, T) mask against flex with the padded block mask.

On CPU forward passes only (FlexAttention has no CPU backward); on CUDA, when present,
forward + backward for the causal shapes. Flex is compiled (`torch.compile`), and timed
after its compilation, whose one-off cost is printed apart; the block mask is built once
per model pass (shared by the layers), its cost printed apart too. Each timing is the
best of REPEATS rounds of CALLS calls, alternating the kernels.

Last, on CPU, compiled flex is checked against SDPA at the causal lengths of
CHECK_LENGTHS (TRIES random inputs each): in torch 2.13 it returned wrong values,
intermittently, at some of them, which is why the model runs flex uncompiled on CPU
(`core.attention`).
"""

from __future__ import annotations

import time

import pytest
import torch

from llama_train.core.attention import (
    AttentionPlan,
    attend,
    build_block_mask,
    build_dense_mask,
    compiled_flex,
    flex_unavailable_reason,
)

REPEATS, CALLS = 3, 10
CHECK_LENGTHS, TRIES = (8, 16, 24, 40, 64, 72, 128), 4
CAUSAL_SHAPES = [(32, 4, 128, 16), (8, 8, 512, 64)]  # (B, H, T, hd)
PADDED_SHAPE = (32, 4, 128, 16)


def _time(fn, device: torch.device) -> float:
    """Seconds per call, best of REPEATS rounds of CALLS calls."""
    best = float("inf")
    for _ in range(REPEATS):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(CALLS):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - started) / CALLS)
    return best


def _mask_seconds(T: int, pad: torch.Tensor | None, device: torch.device) -> tuple[float, object]:
    """Best of 3 builds of a block mask (after one warm-up build), and the mask."""
    mask = build_block_mask(T, pad, device)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        mask = build_block_mask(T, pad, device)
        best = min(best, time.perf_counter() - started)
    return best, mask


def _qkv(shape, device, grad: bool) -> list[torch.Tensor]:
    """q, k, v (B, H, T, hd) laid out as the model makes them: (B, T, H, hd) transposed."""
    B, H, T, hd = shape
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(B, T, H, hd, generator=generator)
        .to(device)
        .requires_grad_(grad)
        .transpose(1, 2)
        for _ in range(3)
    ]


def _compiled_flex_errors(device: torch.device) -> dict[int, int]:
    """Causal length -> how many of TRIES random inputs compiled flex got wrong (> 1e-4)."""
    flex = compiled_flex()
    wrong = {}
    with torch.no_grad():
        for T in CHECK_LENGTHS:
            block = build_block_mask(T, None, device)
            count = 0
            for _ in range(TRIES):
                q, k, v = (torch.randn(3, 4, T, 16, device=device) for _ in range(3))
                expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
                count += (flex(q, k, v, block_mask=block) - expected).abs().max().item() > 1e-4
            wrong[T] = count
    return wrong


def _compare(label: str, sdpa_plan, flex_plan, shape, device, backward: bool) -> None:
    q, k, v = _qkv(shape, device, backward)

    def run(plan):
        def call():
            # The compiled kernel, on CPU too (the model runs flex uncompiled there).
            if plan.kernel == "flex":
                out = compiled_flex()(q, k, v, block_mask=plan.block_mask)
            else:
                out = attend(q, k, v, plan, 0.0)
            if backward:
                out.sum().backward()
            return out

        return call

    started = time.perf_counter()
    flex_out = run(flex_plan)()  # compiles for this shape
    compile_s = time.perf_counter() - started
    sdpa_out = run(sdpa_plan)()
    error = (flex_out - sdpa_out).abs().max().item()
    sdpa_s = _time(run(sdpa_plan), device)
    flex_s = _time(run(flex_plan), device)
    passes = "fwd+bwd" if backward else "fwd"
    print(
        f"  {label} {tuple(shape)} {passes}: sdpa {sdpa_s * 1e3:8.3f} ms, flex "
        f"{flex_s * 1e3:8.3f} ms, sdpa/flex = {sdpa_s / flex_s:5.2f}x "
        f"(flex first call {compile_s:.1f} s; max |diff| {error:.1e})"
    )


@pytest.mark.skipif(flex_unavailable_reason() is not None, reason=str(flex_unavailable_reason()))
def test_flex_attention_against_sdpa() -> None:
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"\nattention kernels, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for device in devices:
        backward = device.type == "cuda"
        for shape in CAUSAL_SHAPES:
            T = shape[2]
            sdpa = AttentionPlan("sdpa", 0, T, None, None)
            mask_s, block = _mask_seconds(T, None, device)
            flex = AttentionPlan("flex", 0, T, None, None, block)
            with torch.set_grad_enabled(backward):
                _compare(f"[{device.type}] causal", sdpa, flex, shape, device, backward)
            print(f"    causal block mask: {mask_s * 1e3:.1f} ms per model pass")
        B, T = PADDED_SHAPE[0], PADDED_SHAPE[2]
        pad = torch.randint(0, T, (B,), generator=torch.Generator().manual_seed(1)).to(device)
        dense = AttentionPlan("sdpa", 0, T, pad, build_dense_mask(0, T, pad, device))
        mask_s, block = _mask_seconds(T, pad, device)
        flex = AttentionPlan("flex", 0, T, pad, None, block)
        with torch.no_grad():
            _compare(f"[{device.type}] padded prefill", dense, flex, PADDED_SHAPE, device, False)
        print(f"    padded block mask: {mask_s * 1e3:.1f} ms per model pass")
        if device.type == "cpu":
            wrong = _compiled_flex_errors(device)
            listed = ", ".join(f"T={T}: {n}/{TRIES}" for T, n in wrong.items())
            print(f"  [cpu] compiled flex wrong (> 1e-4 from SDPA), causal (3, 4, T, 16): {listed}")
