"""Claims about AdamW groups, the learning-rate schedule and gradient clipping."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from pydantic import ValidationError

from llama_train.core.model import Llama, ModelConfig
from llama_train.core.optim import (
    OptimConfig,
    build_optimizer,
    clip_gradients,
    decay_start,
    lr_at,
    parameter_groups,
    resolve_warmup,
    set_lr,
)


def tiny_model(**overrides: object) -> Llama:
    fields: dict[str, object] = {
        "dim": 32,
        "n_layers": 2,
        "n_heads": 4,
        "vocab_size": 11,
        "max_seq_len": 16,
        "ffn_multiple_of": 16,
    }
    fields.update(overrides)
    return Llama(ModelConfig(**fields))


# --- schedule ------------------------------------------------------------------------------


def test_warmup_starts_at_lr_over_warmup_steps_and_ends_at_lr() -> None:
    cfg = OptimConfig(lr=1e-3, warmup_steps=10)
    assert lr_at(0, 100, cfg) == pytest.approx(1e-4)
    assert lr_at(4, 100, cfg) == pytest.approx(5e-4)
    assert lr_at(9, 100, cfg) == pytest.approx(1e-3)
    assert lr_at(10, 100, cfg) == pytest.approx(1e-3)  # first decay step: full lr


def test_cosine_is_halfway_between_lr_and_its_floor_midway_through_the_decay() -> None:
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.2, schedule="cosine")
    # Decay runs over steps 10..110 of a 111-step run; 60 is its midpoint.
    assert lr_at(60, 111, cfg) == pytest.approx(0.6)
    assert lr_at(35, 111, cfg) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)))


@pytest.mark.parametrize(
    ("schedule", "shape"),
    [("cosine", "1-sqrt"), ("linear", "1-sqrt")]
    + [("wsd", shape) for shape in ("1-sqrt", "linear", "cosine")],
)
def test_decaying_schedules_reach_min_lr_on_the_last_step_and_stay_there(
    schedule: str, shape: str
) -> None:
    cfg = OptimConfig(
        lr=2.0, warmup_steps=5, min_lr_ratio=0.1, schedule=schedule, decay_shape=shape
    )
    assert lr_at(99, 100, cfg) == pytest.approx(0.2)
    assert lr_at(500, 100, cfg) == pytest.approx(0.2)
    after_warmup = [lr_at(step, 100, cfg) for step in range(5, 100)]
    assert all(a >= b for a, b in itertools.pairwise(after_warmup))


def test_linear_schedule_decays_in_equal_steps() -> None:
    cfg = OptimConfig(lr=1.0, warmup_steps=0, min_lr_ratio=0.0, schedule="linear")
    assert [lr_at(step, 5, cfg) for step in range(5)] == pytest.approx([1, 0.75, 0.5, 0.25, 0])


def test_constant_schedule_holds_lr_after_warmup() -> None:
    cfg = OptimConfig(lr=0.5, warmup_steps=2, schedule="constant")
    assert [lr_at(step, 6, cfg) for step in range(6)] == pytest.approx([0.25] + [0.5] * 5)


def test_wsd_is_flat_until_the_last_decay_fraction_then_decays_linearly() -> None:
    cfg = OptimConfig(
        lr=1.0,
        warmup_steps=10,
        schedule="wsd",
        decay_fraction=0.2,
        min_lr_ratio=0.0,
        decay_shape="linear",
    )
    # 100 steps: decay over the last 20 (steps 80..99), from 1 at 80 to 0 at 99.
    assert all(lr_at(step, 100, cfg) == 1.0 for step in range(10, 81))
    assert lr_at(81, 100, cfg) == pytest.approx(1 - 1 / 19)
    assert lr_at(99, 100, cfg) == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("shape", "formula"),
    [
        ("1-sqrt", lambda p: 1 - math.sqrt(p)),
        ("linear", lambda p: 1 - p),
        ("cosine", lambda p: 0.5 * (1 + math.cos(math.pi * p))),
    ],
)
def test_wsd_decays_with_its_shape_from_the_peak_to_the_floor(shape, formula) -> None:
    # 50 steps, decay_fraction 0.2: the decay covers steps 40..49, progress (s - 40) / 9.
    peak, floor = 3e-3, 0.1
    cfg = OptimConfig(
        lr=peak,
        warmup_steps=4,
        schedule="wsd",
        decay_fraction=0.2,
        min_lr_ratio=floor,
        decay_shape=shape,
    )
    assert all(lr_at(step, 50, cfg) == peak for step in range(4, 41))
    for step in range(40, 50):
        progress = (step - 40) / 9
        expected = peak * (floor + (1 - floor) * formula(progress))
        assert lr_at(step, 50, cfg) == pytest.approx(expected, rel=1e-12)


def test_wsd_decays_in_1_minus_sqrt_unless_told_otherwise() -> None:
    cfg = OptimConfig(lr=1.0, warmup_steps=0, schedule="wsd", decay_fraction=0.5, min_lr_ratio=0)
    # 10 steps: decay over steps 5..9, progress 1/4 at step 6.
    assert cfg.decay_shape == "1-sqrt"
    assert lr_at(6, 10, cfg) == pytest.approx(0.5)


def test_before_the_decay_the_lr_does_not_depend_on_the_run_length() -> None:
    """What lets a cooldown branch fork from a longer run's stable phase."""
    cfg = OptimConfig(lr=1.0, warmup_steps=3, schedule="wsd", decay_fraction=0.25)
    for short in (4, 8, 13, 40):
        start = decay_start(short, cfg)
        assert start == max(3, short - max(1, round(0.25 * short)))
        assert [lr_at(s, short, cfg) for s in range(start)] == [
            lr_at(s, 1000, cfg) for s in range(start)
        ]
        assert start == short or lr_at(start + 1, short, cfg) < 1.0


def test_the_warmup_rule_is_n_tokens_in_whole_steps() -> None:
    cfg = OptimConfig(warmup_tokens_per_parameter=1.0, warmup_steps=7)
    resolved = resolve_warmup(cfg, parameters=10_001, tokens_per_step=1000)
    assert resolved.warmup_steps == 11  # ceil(10_001 / 1000): at least N tokens
    twice = OptimConfig(warmup_tokens_per_parameter=2.0)
    assert resolve_warmup(twice, parameters=5_000, tokens_per_step=1000).warmup_steps == 10
    assert resolve_warmup(OptimConfig(warmup_steps=7), parameters=1, tokens_per_step=1) == (
        OptimConfig(warmup_steps=7)
    )


def test_warmup_longer_than_the_run_only_warms_up() -> None:
    cfg = OptimConfig(lr=1.0, warmup_steps=50)
    assert [lr_at(step, 10, cfg) for step in range(10)] == pytest.approx(
        [(step + 1) / 50 for step in range(10)]
    )


def test_single_step_run_uses_the_warmed_up_lr() -> None:
    assert lr_at(0, 1, OptimConfig(lr=1.0, warmup_steps=0)) == pytest.approx(1.0)


def test_optim_config_rejects_bad_values() -> None:
    with pytest.raises(ValidationError, match="schedule"):
        OptimConfig(schedule="step")
    with pytest.raises(ValidationError, match="betas"):
        OptimConfig(betas=(0.9, 1.0))
    with pytest.raises(ValidationError, match="warmup"):
        OptimConfig(warmup=10)


# --- optimizer -----------------------------------------------------------------------------


def test_weight_decay_groups_hold_matrices_and_embeddings_but_not_norms() -> None:
    model = tiny_model()
    groups = {
        g["name"]: g for g in build_optimizer(model, OptimConfig(weight_decay=0.3)).param_groups
    }
    decayed = {id(p) for p in groups["decay"]["params"]}
    skipped = {id(p) for p in groups["no_decay"]["params"]}
    for name, param in model.named_parameters():
        expected = decayed if param.ndim >= 2 else skipped
        assert id(param) in expected, name
    assert id(model.tok_embeddings.weight) in decayed
    assert groups["decay"]["weight_decay"] == 0.3
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert len(decayed) + len(skipped) == len(list(model.parameters()))


def test_embeddings_can_be_left_undecayed_and_a_tied_matrix_appears_once() -> None:
    model = tiny_model(tie_embeddings=True)
    groups = {g["name"]: g["params"] for g in parameter_groups(model, OptimConfig())}
    assert sum(p is model.output.weight for p in groups["decay"]) == 1
    groups = {
        g["name"]: g["params"] for g in parameter_groups(model, OptimConfig(decay_embeddings=False))
    }
    assert any(p is model.tok_embeddings.weight for p in groups["no_decay"])
    assert all(p is not model.tok_embeddings.weight for p in groups["decay"])


def test_optimizer_uses_the_configured_hyperparameters() -> None:
    cfg = OptimConfig(lr=1e-2, betas=(0.8, 0.9), eps=1e-6)
    optimizer = build_optimizer(tiny_model(), cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    for group in optimizer.param_groups:
        assert (group["lr"], group["betas"], group["eps"]) == (1e-2, (0.8, 0.9), 1e-6)
    set_lr(optimizer, 0.125)
    assert all(group["lr"] == 0.125 for group in optimizer.param_groups)


def test_decay_is_decoupled_and_spares_norm_gains() -> None:
    """With zero gradients Adam's update is 0, so one step only applies p -= lr * wd * p."""
    model = tiny_model()
    optimizer = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=0.5))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    for name, param in model.named_parameters():
        factor = 1 - 0.1 * 0.5 if param.ndim >= 2 else 1.0
        torch.testing.assert_close(param, before[name] * factor, msg=name)


def test_a_few_adamw_steps_memorise_a_small_batch() -> None:
    torch.manual_seed(0)
    model = tiny_model()
    cfg = OptimConfig(lr=1e-2, warmup_steps=3, weight_decay=0.1)
    optimizer = build_optimizer(model, cfg)
    batch = torch.randint(0, 11, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(40):
        set_lr(optimizer, lr_at(step, 40, cfg))
        loss = model(batch[:, :-1], batch[:, 1:]).loss
        assert loss is not None
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(model, cfg.grad_clip)
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(11), abs=0.1)  # near-uniform at init
    assert losses[-1] < 0.25 * losses[0]


# --- gradient clipping ---------------------------------------------------------------------


def backward_with_large_gradients(model: Llama) -> None:
    batch = torch.randint(0, 11, (2, 12), generator=torch.Generator().manual_seed(1))
    loss = model(batch[:, :-1], batch[:, 1:]).loss
    assert loss is not None
    (1000 * loss).backward()


def global_norm(model: Llama) -> float:
    return math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in model.parameters()))


def test_clipping_scales_gradients_to_max_norm_and_returns_the_pre_clip_norm() -> None:
    model = tiny_model()
    backward_with_large_gradients(model)
    before = global_norm(model)
    assert before > 1.0
    returned = clip_gradients(model, 1.0)
    assert returned.dtype == torch.float32
    assert returned.item() == pytest.approx(before, rel=1e-5)
    assert global_norm(model) <= 1.0 + 1e-5
    assert global_norm(model) == pytest.approx(1.0, rel=1e-4)


def test_clipping_with_max_norm_zero_leaves_gradients_untouched() -> None:
    model = tiny_model()
    backward_with_large_gradients(model)
    grads = [p.grad.clone() for p in model.parameters()]
    returned = clip_gradients(model, 0.0)
    assert returned.item() == pytest.approx(global_norm(model), rel=1e-5)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
