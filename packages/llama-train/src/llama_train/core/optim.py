"""AdamW, the learning-rate schedule, and gradient clipping.

The schedule is a pure function of the step (`lr_at`), as in nanoGPT's `get_lr`
and lingua's `lr_cosine` / `lr_wsd`: the loop calls `set_lr(optimizer,
lr_at(step, total_steps, cfg))` before each optimizer step, so resuming from a
checkpoint needs no scheduler state.

Weight decay (decoupled, AdamW) applies to every matrix (ndim >= 2): the linear
weights and, by default, the token embedding. Norm gains (and biases, which this
model has none of) are not decayed: decay would pull a gain towards 0, i.e. shrink
the signal, rather than regularise a mapping. Embeddings are decayed as nanoGPT and
lingua do, for three reasons: a GSSM vocabulary is small and every token is seen in
nearly every batch, so embedding rows get gradients as steadily as linear weights
(the usual argument against decaying rare-token rows does not apply); a tied
embedding *is* the output projection, a linear weight, and decaying embeddings keeps
tied and untied models under the same rule; and `decay_embeddings: false` (the
OLMo 2 choice) is one switch away for experiments that want it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

Schedule = Literal["cosine", "linear", "constant", "wsd"]
DecayShape = Literal["1-sqrt", "linear", "cosine"]


class OptimConfig(BaseModel):
    """The `optim` section of a training config."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    lr: Annotated[float, Field(gt=0, description="peak learning rate")] = 3e-4
    # beta2 = 0.95 rather than PyTorch's 0.999: the Llama/GPT-3 choice, steadier
    # with the large, fast-changing gradients of small-batch language modelling.
    betas: tuple[
        Annotated[float, Field(ge=0, lt=1)],
        Annotated[float, Field(ge=0, lt=1)],
    ] = (0.9, 0.95)
    eps: Annotated[float, Field(gt=0, description="AdamW epsilon")] = 1e-8
    weight_decay: Annotated[
        float, Field(ge=0, description="decoupled weight decay on matrices")
    ] = 0.1
    decay_embeddings: Annotated[
        bool, Field(description="also decay the token embedding (see module docstring)")
    ] = True
    warmup_steps: Annotated[
        int, Field(ge=0, description="linear warmup from lr / warmup_steps to lr")
    ] = 100
    warmup_tokens_per_parameter: Annotated[
        float | None,
        Field(
            gt=0,
            description="warmup as a rule instead of warmup_steps: this many tokens per "
            "parameter (total count, embeddings and head included; 1 = N tokens, Porian et "
            "al. 2024), rounded up to whole steps of the run's global batch; when set it "
            "replaces warmup_steps",
        ),
    ] = None
    schedule: Annotated[
        Schedule,
        Field(
            description="after warmup: cosine or linear decay to min_lr_ratio * lr, "
            "constant, or wsd (warmup-stable-decay: constant, then a decay of "
            "decay_shape over the last decay_fraction of the steps)"
        ),
    ] = "cosine"
    decay_shape: Annotated[
        DecayShape,
        Field(
            description="wsd: shape of the decay, 1-sqrt (Hägele et al. 2024), linear or cosine "
            "(a run directory written before this key existed decayed linearly)"
        ),
    ] = "1-sqrt"
    min_lr_ratio: Annotated[
        float, Field(ge=0, le=1, description="final learning rate as a fraction of lr")
    ] = 0.1
    decay_fraction: Annotated[
        float, Field(gt=0, le=1, description="wsd: fraction of all steps spent decaying")
    ] = 0.2
    grad_clip: Annotated[
        float, Field(ge=0, description="max global gradient norm; 0 disables clipping")
    ] = 1.0


def resolve_warmup(cfg: OptimConfig, *, parameters: int, tokens_per_step: int) -> OptimConfig:
    """`cfg` with warmup_steps set from warmup_tokens_per_parameter (unchanged without it).

    The rule needs the model's total parameter count and the global batch, which the
    config alone does not know (the batch counts every rank); the trainer resolves it
    once it has built both, and every caller of :func:`lr_at` uses the resolved copy.
    """
    rule = cfg.warmup_tokens_per_parameter
    if rule is None:
        return cfg
    steps = math.ceil(rule * parameters / tokens_per_step)
    return cfg.model_copy(update={"warmup_steps": steps, "warmup_tokens_per_parameter": None})


def parameter_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """AdamW parameter groups: "decay" (matrices) and "no_decay" (vectors), empty ones dropped."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():  # a tied matrix appears once
        if not param.requires_grad:
            continue
        skip = param.ndim < 2 or (not cfg.decay_embeddings and id(param) in embeddings)
        (no_decay if skip else decay).append(param)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": cfg.weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over `parameter_groups`; call it after moving the model to its device.

    The fused kernel is used when every parameter is on CUDA (one launch per step
    instead of one per tensor); elsewhere PyTorch's default implementation.
    """
    groups = parameter_groups(model, cfg)
    on_cuda = all(p.is_cuda for group in groups for p in group["params"])
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True if on_cuda else None
    )


def _cosine(progress: float, floor: float) -> float:
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _linear(progress: float, floor: float) -> float:
    return 1 - (1 - floor) * progress


def _constant(progress: float, floor: float) -> float:
    return 1.0


def _one_minus_sqrt(progress: float, floor: float) -> float:
    return floor + (1 - floor) * (1 - math.sqrt(progress))


# Shape of the decay phase, progress 0 -> 1 (wsd takes its shape from decay_shape).
_SHAPES: dict[str, Callable[[float, float], float]] = {
    "cosine": _cosine,
    "linear": _linear,
    "constant": _constant,
    "1-sqrt": _one_minus_sqrt,
}


def decay_start(total_steps: int, cfg: OptimConfig) -> int:
    """First step of the decay phase of a run of `total_steps` steps (0-based).

    Before it the lr depends on the step only, not on the run's length: warmup,
    then the peak. That is what lets a cooldown branch of length S fork from a
    longer run's stable phase at step `decay_start(S, cfg)` and continue exactly
    as a run of S steps would have (:mod:`llama_train.recipe.branches`). For cosine and
    linear the decay starts right after warmup; for wsd it covers the last
    round(decay_fraction * total_steps) steps (at least one), never the warmup.
    """
    start = cfg.warmup_steps
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        start = max(start, total_steps - decay_steps)
    return start


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate of optimizer step `step` (0-based) of a run of `total_steps` steps.

    Warmup: steps 0..warmup_steps-1 ramp linearly from lr / warmup_steps to lr.
    Then the decay runs from lr at its first step to min_lr_ratio * lr at the last
    step (total_steps - 1) and stays there beyond it; for wsd the decay covers the
    last round(decay_fraction * total_steps) steps (:func:`decay_start`), the lr is
    flat before them, and the decay has `decay_shape`: 1-sqrt is
    lr * (min + (1 - min) * (1 - sqrt(progress))), Hägele et al.'s cooldown, with
    progress = (step - start) / (total_steps - 1 - start) so that, like the other
    shapes here, it reaches the floor on the last step (epfml/schedules-and-scaling
    divides by the decay's length instead and reaches it one step after the run).
    A warmup longer than the run simply never reaches the decay.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    start = decay_start(total_steps, cfg)
    progress = (step - start) / max(1, total_steps - 1 - start)
    progress = min(1.0, max(0.0, progress))
    shape = cfg.decay_shape if cfg.schedule == "wsd" else cfg.schedule
    return cfg.lr * _SHAPES[shape](progress, cfg.min_lr_ratio)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_gradients(model: nn.Module, max_norm: float) -> Tensor:
    """Scale gradients in place so their global L2 norm is at most max_norm.

    Returns the pre-clip norm (a float32 scalar tensor, for logging). max_norm 0
    disables clipping but still measures the norm. With fp16 and a GradScaler,
    call `scaler.unscale_(optimizer)` first, so the norm is that of true gradients.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    limit = max_norm if max_norm > 0 else math.inf  # inf: scale factor clamps to 1
    return torch.nn.utils.clip_grad_norm_(params, limit).float()
