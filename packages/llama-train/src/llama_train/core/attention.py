"""The attention kernel of a forward pass: PyTorch SDPA or FlexAttention, and its mask.

Every forward pass attends causally over *slots*: a query in slot q sees the keys of
slots <= q. A batch of prompts of different lengths is left-padded (row b starts with
`pad[b]` filler slots), and then a query of row b also ignores the keys of the filler
slots. A filler query sees only its own slot, so its softmax is never empty (no NaN);
its output is never read by a real token.

Two kernels compute the same thing:

- ``sdpa``: ``F.scaled_dot_product_attention``, with ``is_causal`` when there is no
  padding (no mask tensor at all) or with a dense boolean mask (B, 1, T, S) otherwise.
- ``flex``: ``torch.nn.attention.flex_attention``, whose block mask skips the blocks the
  mask hides entirely. It runs full-sequence passes (training, evaluation, the prefill
  of a prompt batch); an incremental decoding step (one query over a cache) always uses
  SDPA, where a block mask has nothing to skip. FlexAttention has no dropout and no
  backward pass on CPU. On CUDA it is compiled; on CPU it runs uncompiled (a dense
  reference path: correct, not fast), because compiled CPU flex_attention returned wrong
  values, intermittently, for some sequence lengths in torch 2.13 (8, 24, 40, 56, 72 and
  88 positions among those `make bench` checks).

``model.attention: auto`` picks, per pass, the kernel that won in ``make bench``
(``tests/benchmarks/bench_attention.py``; figures in docs/benchmarks.md): see :func:`flex_wins`.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from llama_train.errors import LlamaTrainError

AttentionChoice = Literal["auto", "sdpa", "flex"]


def flex_unavailable_reason() -> str | None:
    """Why FlexAttention cannot run in this torch build, or None when it can."""
    try:
        import torch.nn.attention.flex_attention
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention (needs >= 2.5)"
    return None


def flex_wins(device: torch.device, *, padded: bool) -> bool:
    """Where `auto` uses FlexAttention: the cases where it beat SDPA in `make bench`.

    Measured on CPU (forward; compiled flex, after its one-off compilation) SDPA was
    faster for both the causal training shapes and the padded prefill masks, and the
    flex that runs on CPU is the slower uncompiled one, so auto keeps SDPA there. CUDA
    has not been measured by this project yet; until it is, auto keeps SDPA on every
    device, and `model.attention: flex` forces the other kernel.
    """
    del device, padded
    return False


@functools.cache
def compiled_flex() -> Any:
    """flex_attention compiled once per process (CUDA); eager flex is a dense reference."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _eager_flex(q: Tensor, k: Tensor, v: Tensor, block_mask: Any) -> Tensor:
    """Uncompiled flex_attention (CPU), without its warning that it is unfused."""
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(q, k, v, block_mask=block_mask)


@dataclass(frozen=True)
class AttentionPlan:
    """How every layer of one forward pass attends (built once per pass, shared by layers).

    `start` slots are already cached; the pass adds `queries` slots. `pad` (B,) counts
    the filler slots at the start of each row, or is None when no row is padded.
    """

    kernel: Literal["sdpa", "flex"]
    start: int
    queries: int
    pad: Tensor | None
    dense_mask: Tensor | None  # SDPA: (B, 1, T, S) or (T, S) bool; None = is_causal
    block_mask: Any = None  # flex: a BlockMask over (T, S)


def visible(query_slot: Tensor, key_slot: Tensor, pad: Tensor | None) -> Tensor:
    """The mask rule, on broadcastable slot indices: causal, padding hidden, a filler
    query sees itself. `pad` broadcasts against the query/key tensors (row axis)."""
    causal = key_slot <= query_slot
    if pad is None:
        return causal
    return causal & ((key_slot >= pad) | (key_slot == query_slot))


def build_dense_mask(start: int, queries: int, pad: Tensor | None, device: torch.device) -> Tensor:
    query_slot = start + torch.arange(queries, device=device)[:, None]  # (T, 1)
    key_slot = torch.arange(start + queries, device=device)[None, :]  # (1, S)
    if pad is None:
        return visible(query_slot, key_slot, None)  # (T, S)
    return visible(query_slot, key_slot, pad.view(-1, 1, 1, 1))  # (B, 1, T, S)


def build_block_mask(queries: int, pad: Tensor | None, device: torch.device) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    if pad is None:

        def mask_mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
            return k <= q

        return create_block_mask(mask_mod, None, None, queries, queries, device=device)

    def padded_mask_mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return visible(q, k, pad[b])

    batch = pad.size(0)
    return create_block_mask(padded_mask_mod, batch, None, queries, queries, device=device)


def plan_attention(
    choice: AttentionChoice,
    *,
    start: int,
    queries: int,
    pad: Tensor | None,
    device: torch.device,
    needs_grad: bool,
    dropout: bool,
) -> AttentionPlan:
    """Pick the kernel for one pass (see the module docstring) and build its mask once.

    needs_grad: the pass will be differentiated; dropout: attention dropout is active.
    `flex` where it cannot run is one clear error; `auto` falls back to SDPA.
    """
    full_pass = start == 0
    kernel: Literal["sdpa", "flex"] = "sdpa"
    if choice == "flex" and full_pass:
        _check_flex_runs(device, needs_grad=needs_grad, dropout=dropout)
        kernel = "flex"
    elif choice == "auto" and full_pass and flex_wins(device, padded=pad is not None):
        runs = flex_unavailable_reason() is None and not dropout
        if runs and not (needs_grad and device.type == "cpu"):
            kernel = "flex"
    if kernel == "flex":
        block = build_block_mask(queries, pad, device)
        return AttentionPlan("flex", start, queries, pad, None, block)
    if full_pass and pad is None:
        return AttentionPlan("sdpa", start, queries, None, None)
    dense = build_dense_mask(start, queries, pad, device)
    return AttentionPlan("sdpa", start, queries, pad, dense)


def _check_flex_runs(device: torch.device, *, needs_grad: bool, dropout: bool) -> None:
    reason = flex_unavailable_reason()
    if reason is not None:
        raise LlamaTrainError(f"model.attention=flex: {reason}; use auto or sdpa")
    if needs_grad and device.type == "cpu":
        raise LlamaTrainError(
            "model.attention=flex: FlexAttention has no backward pass on CPU; train with "
            "model.attention=auto or sdpa (flex runs forward-only passes on CPU)"
        )
    if dropout:
        raise LlamaTrainError(
            "model.attention=flex: FlexAttention has no attention dropout; set "
            "model.dropout=0 or use model.attention=auto or sdpa"
        )


def attend(q: Tensor, k: Tensor, v: Tensor, plan: AttentionPlan, dropout_p: float) -> Tensor:
    """Attention of q (B, H, T, hd) over k, v (B, H, S, hd) as `plan` says -> (B, H, T, hd)."""
    if plan.kernel == "flex":
        if q.device.type == "cpu":  # compiled CPU flex gave wrong values (module docstring)
            return _eager_flex(q, k, v, plan.block_mask)
        return compiled_flex()(q, k, v, block_mask=plan.block_mask)
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=plan.dense_mask,
        is_causal=plan.dense_mask is None,
        dropout_p=dropout_p,
    )
