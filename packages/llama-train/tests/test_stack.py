"""The stack's contract: member m of a stack trains exactly as its model trained alone.

Every comparison is against the single run's own pieces (`Llama` built with the
member's seed, `optim.build_optimizer`'s torch AdamW, `optim.clip_gradients`,
`optim.lr_at`), run one model at a time. On this CPU the two agree bit for bit;
`core/stack.py` says which op makes that hold.
"""

from __future__ import annotations

import math

import pytest
import torch

from llama_train.core.model import Llama, ModelConfig
from llama_train.core.optim import OptimConfig, build_optimizer, clip_gradients, lr_at, set_lr
from llama_train.core.stack import StackedAdamW, StackedLlama, clip_member_gradients
from llama_train.errors import LlamaTrainError

VOCAB, SEQ = 11, 33
CONFIG = ModelConfig(dim=16, n_layers=1, n_heads=2, vocab_size=VOCAB, max_seq_len=SEQ)

# Members differ in everything a member may vary: lr, seed, clipping (on, tight,
# off), weight decay, betas, eps, warmup, schedule, embedding decay.
MEMBERS = [
    (0, OptimConfig(lr=1e-2, warmup_steps=5)),
    (
        1,
        OptimConfig(lr=3e-3, grad_clip=0.05, weight_decay=0.0, warmup_steps=3, schedule="wsd"),
    ),
    (
        7,
        OptimConfig(lr=2e-2, betas=(0.8, 0.99), eps=1e-6, decay_embeddings=False, grad_clip=0.0),
    ),
]


def _batches(steps: int, members: int, shared: bool, seed: int = 0) -> list[torch.Tensor]:
    """(B, SEQ) batches for all members, or (members, B, SEQ) with one stream each."""
    generator = torch.Generator().manual_seed(seed)
    shape = (4, SEQ) if shared else (members, 4, SEQ)
    return [torch.randint(0, VOCAB, shape, generator=generator) for _ in range(steps)]


def _train_alone(
    seed: int, cfg: OptimConfig, batches: list[torch.Tensor]
) -> tuple[list[float], list[float], Llama]:
    """One model trained as train.py does on CPU: lr_at, forward, backward, clip, AdamW."""
    model = Llama(CONFIG, seed=seed)
    optimizer = build_optimizer(model, cfg)
    losses, norms = [], []
    for step, batch in enumerate(batches):
        set_lr(optimizer, lr_at(step, len(batches), cfg))
        loss = model(batch[:, :-1], batch[:, 1:]).loss
        loss.backward()
        norms.append(clip_gradients(model, cfg.grad_clip).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, norms, model


def _train_stacked(
    members: list[tuple[int, OptimConfig]],
    batches: list[torch.Tensor],
    poison: dict[int, int] | None = None,
    chunk: int | None = None,
) -> tuple[list[list[float]], list[list[float]], StackedLlama, StackedAdamW]:
    """The members trained as one stack; a member whose loss or norm is not finite stops.

    poison {step: member} sets that member's weights to inf before that step, as a
    divergence would. chunk: members per forward/backward group (None: all at once).
    """
    stack = StackedLlama.from_models([Llama(CONFIG, seed=seed) for seed, _ in members])
    stack.chunk = chunk
    configs = [cfg for _, cfg in members]
    optimizer = StackedAdamW(stack, configs)
    losses: list[list[float]] = [[] for _ in members]
    norms: list[list[float]] = [[] for _ in members]
    for step, batch in enumerate(batches):
        if poison and step in poison:
            with torch.no_grad():
                stack.weight("layers.0.mlp.down.weight")[poison[step]].fill_(math.inf)
        step_losses = stack.backward_losses(batch[..., :-1], batch[..., 1:])
        step_norms = clip_member_gradients(stack, [cfg.grad_clip for cfg in configs])
        for m, (loss, norm) in enumerate(
            zip(step_losses.tolist(), step_norms.tolist(), strict=True)
        ):
            if not optimizer.active[m]:
                continue
            if not (math.isfinite(loss) and math.isfinite(norm)):
                optimizer.stop(m)
                continue
            losses[m].append(loss)
            norms[m].append(norm)
        optimizer.step([lr_at(step, len(batches), cfg) for cfg in configs])
        optimizer.zero_grad()
    return losses, norms, stack, optimizer


def test_stack_starts_from_each_members_own_initialisation() -> None:
    models = [Llama(CONFIG, seed=seed) for seed in (0, 1, 5)]
    stack = StackedLlama(CONFIG, 3)
    for m, model in enumerate(models):
        stack.copy_member_from(m, model)
    for m, model in enumerate(models):
        fresh = Llama(CONFIG, seed=99)
        stack.copy_member_to(m, fresh)
        for (name, a), b in zip(
            model.state_dict().items(), fresh.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), (m, name)
    assert stack.num_parameters() == models[0].num_parameters()


def test_stacked_adamw_is_torch_adamw_member_by_member() -> None:
    """Same weights and gradients in: the same weights and moments out, bit for bit."""
    configs = [cfg for _, cfg in MEMBERS]
    models = [Llama(CONFIG, seed=seed) for seed, _ in MEMBERS]
    stack = StackedLlama.from_models(models)
    stacked = StackedAdamW(stack, configs)
    singles = [build_optimizer(model, cfg) for model, cfg in zip(models, configs, strict=True)]
    generator = torch.Generator().manual_seed(3)
    for step in range(5):
        lrs = [cfg.lr * (step + 1) / 3 for cfg in configs]
        for name in stack.names:
            stack.weight(name).grad = torch.zeros_like(stack.weight(name))
        for m, (model, optimizer) in enumerate(zip(models, singles, strict=True)):
            for name, param in model.named_parameters():
                param.grad = torch.randn(param.shape, generator=generator)
                stack.weight(name).grad[m] = param.grad
            set_lr(optimizer, lrs[m])
            optimizer.step()
        stacked.step(lrs)
        for m, (model, optimizer) in enumerate(zip(models, singles, strict=True)):
            for name, param in model.named_parameters():
                assert torch.equal(stack.weight(name)[m], param), (step, m, name)
                state = optimizer.state[param]
                mine = stacked.state_dict(m)[name]
                assert torch.equal(mine["exp_avg"], state["exp_avg"])
                assert torch.equal(mine["exp_avg_sq"], state["exp_avg_sq"])
                assert mine["step"] == state["step"].item()
        stacked.zero_grad()


@pytest.mark.parametrize(
    ("members", "shared", "chunk"),
    [(MEMBERS[:1], True, None), (MEMBERS, True, None), (MEMBERS, False, None), (MEMBERS, True, 2)],
)
def test_each_member_trains_exactly_as_alone(
    members: list[tuple[int, OptimConfig]], shared: bool, chunk: int | None
) -> None:
    """The contract: 200 steps, losses and gradient norms of every step equal (bit-equal
    on CPU), the final weights too; one batch for all members or one per member; all
    members in one forward/backward pass or in groups."""
    steps = 200
    batches = _batches(steps, len(members), shared)
    losses, norms, stack, _ = _train_stacked(members, batches, chunk=chunk)
    for m, (seed, cfg) in enumerate(members):
        own = [b if shared else b[m] for b in batches]
        alone_losses, alone_norms, model = _train_alone(seed, cfg, own)
        assert losses[m] == alone_losses
        assert norms[m] == alone_norms
        for name, param in model.named_parameters():
            assert torch.equal(stack.weight(name)[m], param), (m, name)
    # The members really differ (a stack that trained one model thrice would pass above
    # only by accident of identical configs).
    assert len({round(trace[-1], 6) for trace in losses}) == len(members)


def test_a_diverged_member_stops_and_the_others_carry_on_unchanged() -> None:
    steps = 60
    batches = _batches(steps, 3, shared=True)
    losses, _, stack, optimizer = _train_stacked(MEMBERS, batches, poison={20: 1})
    assert optimizer.active == [True, False, True]
    assert len(losses[1]) == 20  # the steps before the poisoned one
    assert all(torch.isfinite(p).all() for p in stack.weights.values())
    without, _, alone_stack, _ = _train_stacked([MEMBERS[0], MEMBERS[2]], batches)
    assert losses[0] == without[0] and losses[2] == without[1]
    for name in stack.names:
        assert torch.equal(stack.weight(name)[0], alone_stack.weight(name)[0])
        assert torch.equal(stack.weight(name)[2], alone_stack.weight(name)[1])


def test_a_stack_refuses_what_it_cannot_reproduce() -> None:
    with pytest.raises(LlamaTrainError, match="dropout"):
        StackedLlama(CONFIG.model_copy(update={"dropout": 0.1}), 2)
    with pytest.raises(LlamaTrainError, match="at least one member"):
        StackedLlama(CONFIG, 0)


@pytest.mark.integration
def test_stacks_of_many_shapes_in_one_process_all_compile() -> None:
    """A study's worker trains stacks of every shape one after another: each compiles
    its own graph, also past dynamo's limit of 8 graphs per function, beyond which it
    would silently run eager. (The eager backend: tracing without code generation.)"""
    batch = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    for width in range(8, 8 * 12, 8):
        config = ModelConfig(dim=width, n_layers=1, n_heads=1, vocab_size=VOCAB, max_seq_len=9)
        stack = StackedLlama.from_models([Llama(config, seed=0), Llama(config, seed=1)])
        stack.chunk = 1
        stack.compile_losses(backend="eager")
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        stack.backward_losses(batch[:, :-1], batch[:, 1:])
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > before, width
