"""Many models of one shape trained in one process: a stack of M members.

A scaling study trains hundreds of tiny models that differ only in learning rate,
seed, weight decay and schedule. One such model leaves a CPU core waiting on
per-op overhead and a GPU nearly idle; a stack runs M of them through the same
ops. Every weight of `Llama` gets a leading member axis; linear layers become
batched matmuls (`torch.bmm`), the embedding one gather over the M tables laid end
to end, and attention folds the member axis into SDPA's batch dimension (vmap's
SDPA backward rules are incomplete, pytorch/pytorch#117016). Members never mix:
member m's loss depends only on member m's weights, so the gradient of the sum of
the members' losses is each member's own gradient.

Exactness (the contract, `tests/test_stack.py`): member m equals `Llama` built
with its seed and trained alone, bit for bit on CPU (torch 2.13, float32):

- Initialisation: the stack is built from the single models' weights
  (:meth:`StackedLlama.from_models`), and :meth:`StackedLlama.copy_member_to` writes
  a member back into a `Llama` for checkpoints, evaluation and export.
- Forward and backward: each batched matmul is the single model's gemm per member
  (:class:`_BatchedLinear` computes the weight gradient as `F.linear`'s backward
  does, grad^T @ x); the embedding gather, RMSNorm, rotary, SDPA and SwiGLU work row
  by row; the loss is one log-softmax and then each member's own `nll_loss` mean,
  the reduction the single run's `F.cross_entropy` performs.
- Clipping (:func:`clip_member_gradients`): per member, the kernels and parameter
  order of `clip_grad_norm_`, including its reciprocal-times-max_norm coefficient.
- :class:`StackedAdamW` is `torch.optim.AdamW`'s single-tensor algorithm (what the
  single run gets on CPU: no foreach, no fused kernel) with each op run once over the
  stack and per-member factors rounded to float32 exactly as the single run's Python
  scalars are.

A reduction over the member axis (one norm over the stack, one mean of all losses)
would sum in another order and differ in the last bit, which grows to ~1e-3 in the
loss over a few hundred steps; each such place above is per member for that reason.
On a GPU (cuBLAS batched kernels, bf16 autocast) expect equality to float tolerance,
and so for a compiled stack (:meth:`StackedLlama.compile_losses`) against compiled single
runs: inductor fuses and orders the stack's ops as it sees fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama_train.core.attention import attend, plan_attention
from llama_train.core.model import Llama, ModelConfig, apply_rotary, repeat_kv, rms_norm
from llama_train.core.optim import OptimConfig, parameter_groups
from llama_train.errors import LlamaTrainError


def _key(name: str) -> str:
    """A Llama parameter name as a ParameterDict key (dots are not allowed there)."""
    return name.replace(".", "/")


def check_stackable(config: ModelConfig) -> None:
    """Refuse a model a stack cannot reproduce exactly (one clear line)."""
    if config.dropout > 0:
        raise LlamaTrainError(
            f"model.dropout={config.dropout}: a stack draws dropout masks for all members "
            "at once, so members would not equal their single runs; train with dropout 0 "
            "or without stacking (--no-stack)"
        )
    if config.attention == "flex":
        raise LlamaTrainError(
            "model.attention=flex has no backward pass on CPU and is not used by stacks; "
            "use auto or sdpa"
        )


class StackedLlama(nn.Module):
    """M `Llama` models of one config as one module; every weight is (M, *single shape).

    forward(tokens, targets) -> per-member mean cross-entropy (M,). tokens and
    targets are (M, B, T), or (B, T) when every member reads the same batch.
    """

    def __init__(self, config: ModelConfig, members: int) -> None:
        super().__init__()
        if members < 1:
            raise LlamaTrainError(f"a stack needs at least one member, got {members}")
        check_stackable(config)
        template = Llama(config)  # the names, shapes and rotary tables of one member
        self.config = config
        self.members = members
        self.names = [name for name, _ in template.named_parameters()]  # a tied matrix once
        self.weights = nn.ParameterDict(
            {
                _key(name): nn.Parameter(param.detach().unsqueeze(0).repeat_interleave(members, 0))
                for name, param in template.named_parameters()
            }
        )
        self.chunk: int | None = None  # members per forward/backward group; None = all
        self._compiled: Callable[[dict[str, Tensor], Tensor, Tensor], Tensor] | None = None
        self.register_buffer("rope_cos", template.rope_cos, persistent=False)
        self.register_buffer("rope_sin", template.rope_sin, persistent=False)

    @classmethod
    def from_models(cls, models: Sequence[Llama]) -> StackedLlama:
        """The stack of these models' current weights (member m = models[m])."""
        stack = cls(models[0].config, len(models))
        for m, model in enumerate(models):
            stack.copy_member_from(m, model)
        return stack

    def weight(self, name: str) -> nn.Parameter:
        """The stacked parameter of a `Llama` parameter name, (M, *its shape)."""
        return self.weights[_key(name)]

    @torch.no_grad()
    def copy_member_from(self, member: int, model: Llama) -> None:
        """Set member `member`'s weights to those of a single model of the same config."""
        for name, param in model.named_parameters():
            self.weight(name)[member].copy_(param)

    @torch.no_grad()
    def copy_member_to(self, member: int, model: Llama) -> None:
        """Write member `member`'s weights into a single model (checkpoints, eval, export)."""
        for name, param in model.named_parameters():
            param.copy_(self.weight(name)[member])

    def num_parameters(self) -> int:
        """Parameters of one member (a tied matrix counts once)."""
        return sum(p[0].numel() for p in self.weights.values())

    def compile_losses(self, backend: str = "inductor") -> None:
        """Compile the members' losses, forward and backward (`train.compile`).

        What is compiled is one pass over a group of members (:attr:`chunk`), so a
        group of another size (the last, shorter one) compiles once more; the
        optimizer and clipping stay eager, as in a compiled single run, where only
        the model is compiled. Shapes are static: a stack's shapes never change.
        Compiled members equal compiled single runs to float tolerance, not bit for
        bit: inductor fuses the batched ops otherwise than the single model's.

        Dynamo keeps at most `recompile_limit` (8) graphs of one function and runs it
        eager after that, silently but for a warning; a study's worker trains stack
        after stack, of every shape, in one process, and would reach it. So compiling
        a stack first drops what this process compiled before (`torch.compiler.reset`),
        which belongs to stacks and runs that are done; the on-disk cache keeps it
        (`core.compile_cache`), so a shape seen before loads rather than compiles.
        """
        torch.compiler.reset()
        self._compiled = torch.compile(self._losses, dynamic=False, backend=backend)

    def forward(self, tokens: Tensor, targets: Tensor) -> Tensor:
        weights = {name: self.weight(name) for name in self.names}
        return self._member_losses(weights, tokens, targets)

    def _member_losses(self, weights: dict[str, Tensor], tokens: Tensor, targets: Tensor) -> Tensor:
        losses = self._losses if self._compiled is None else self._compiled
        return losses(weights, tokens, targets)

    def backward_losses(self, tokens: Tensor, targets: Tensor, scale: float = 1.0) -> Tensor:
        """Forward and backward of (scale * losses).sum(), `chunk` members at a time.

        Gradients accumulate into the stacked parameters' .grad as autograd would;
        returns the unscaled losses (M,), detached. Members never mix, so running them
        in groups changes no member's arithmetic; it keeps a group's activations in
        the CPU's cache (see :func:`chunk_members`).
        """
        M = self.members
        size = self.chunk or M
        if size >= M:
            losses = self(tokens, targets)
            (losses * scale).sum().backward()
            return losses.detach()
        pieces = []
        for start in range(0, M, size):
            stop = min(start + size, M)
            leaves = {
                name: self.weight(name).detach()[start:stop].requires_grad_() for name in self.names
            }
            rows = slice(start, stop)
            part = self._member_losses(
                leaves,
                tokens if tokens.ndim == 2 else tokens[rows],
                targets if targets.ndim == 2 else targets[rows],
            )
            (part * scale).sum().backward()
            for name, leaf in leaves.items():
                param = self.weight(name)
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                assert leaf.grad is not None
                param.grad[rows] += leaf.grad
            pieces.append(part.detach())
        return torch.cat(pieces)

    def _losses(self, weights: dict[str, Tensor], tokens: Tensor, targets: Tensor) -> Tensor:
        """Per-member mean cross-entropy of the members whose weights are given."""
        cfg = self.config
        embeddings = weights["tok_embeddings.weight"]  # (M, V, D)
        M, V = embeddings.shape[:2]
        if tokens.ndim == 2:  # one batch for all members
            tokens = tokens.expand(M, *tokens.shape)
            targets = targets.expand(M, *targets.shape)
        T = tokens.size(-1)
        plan = plan_attention(
            cfg.attention,
            start=0,
            queries=T,
            pad=None,
            device=tokens.device,
            needs_grad=torch.is_grad_enabled(),
            dropout=False,
        )
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        offsets = torch.arange(M, device=tokens.device).view(M, 1, 1) * V
        x = F.embedding(tokens + offsets, embeddings.flatten(0, 1))  # (M, B, T, D)
        for layer in range(cfg.n_layers):
            x = self._block(weights, f"layers.{layer}.", x, cos, sin, plan)
        x = rms_norm(x, _gain(weights["norm.weight"]), cfg.norm_eps)
        head = "tok_embeddings.weight" if cfg.tie_embeddings else "output.weight"
        logits = _linear(x, weights[head])  # (M, B, T, V)
        # F.cross_entropy is log_softmax then nll_loss; the softmax runs over rows, so once
        # for the stack, and nll_loss's mean once per member, in the single run's order.
        log_probs = F.log_softmax(logits.float(), dim=-1)
        return torch.stack(
            [F.nll_loss(log_probs[m].flatten(0, 1), targets[m].flatten()) for m in range(M)]
        )

    def _block(
        self,
        weights: dict[str, Tensor],
        prefix: str,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        plan: object,
    ) -> Tensor:
        cfg = self.config
        M, B, T, _ = x.shape
        H, K, hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        h = rms_norm(x, _gain(weights[prefix + "attn_norm.weight"]), cfg.norm_eps)
        q, k, v = _linear(h, weights[prefix + "attn.qkv.weight"]).split(
            [H * hd, K * hd, K * hd], dim=-1
        )
        # Members folded into the batch: (M * B, T, heads, hd), as one model sees (B, T, ...).
        q = apply_rotary(q.reshape(M * B, T, H, hd), cos, sin).transpose(1, 2)
        k = apply_rotary(k.reshape(M * B, T, K, hd), cos, sin).transpose(1, 2)
        v = v.reshape(M * B, T, K, hd).transpose(1, 2)
        k, v = repeat_kv(k, H // K), repeat_kv(v, H // K)
        y = attend(q, k, v, plan, 0.0)  # type: ignore[arg-type]  # (M * B, H, T, hd)
        y = y.transpose(1, 2).reshape(M, B, T, H * hd)
        x = x + _linear(y, weights[prefix + "attn.out.weight"])
        h = rms_norm(x, _gain(weights[prefix + "mlp_norm.weight"]), cfg.norm_eps)
        gate, up = _linear(h, weights[prefix + "mlp.gate_up.weight"]).chunk(2, dim=-1)
        return x + _linear(F.silu(gate) * up, weights[prefix + "mlp.down.weight"])


def _gain(weight: Tensor) -> Tensor:
    return weight[:, None, None, :]  # (M, D) as (M, 1, 1, D) against (M, B, T, D)


# Largest activation of one group of members on a CPU. Measured on the 2-core development
# CPU (K = 16, batch 16 x 256, best of 3, alternating): at width 16 groups of 1, 2 and 4
# members (2, 4 and 8 MB) ran at 1.01x, 0.80x and 0.71x the speed of 16 single models, at
# width 32 (4, 8 and 16 MB) at 0.98x, 0.98x and 0.87x: the bigger the group's working set,
# the more of it falls out of the cache. So the study's shapes go one member at a time and
# only members with small activations (short or narrow batches) share a pass.
CPU_CHUNK_BYTES = 2**20


def chunk_members(config: ModelConfig, tokens: int, device: torch.device) -> int | None:
    """Members per chunk for `tokens` (batch x length) per member: None (all) on a GPU."""
    if device.type != "cpu":
        return None
    widest = max(2 * config.hidden_dim, config.vocab_size or 0, 3 * config.dim)
    return max(1, CPU_CHUNK_BYTES // (tokens * widest * 4))


def _linear(x: Tensor, weight: Tensor) -> Tensor:
    """Per-member x @ weight.T: x (M, ..., in), weight (M, out, in) -> (M, ..., out)."""
    M = x.size(0)
    flat = x.reshape(M, -1, x.size(-1))
    if torch.is_autocast_enabled(x.device.type):  # autocast casts inside bmm's own backward
        y = torch.bmm(flat, weight.transpose(1, 2))
    else:
        y = _BatchedLinear.apply(flat, weight)
    return y.view(*x.shape[:-1], weight.size(1))


class _BatchedLinear(torch.autograd.Function):
    """bmm(x, weight^T) whose weight gradient is grad^T @ x, as `F.linear`'s.

    Autograd's bmm would compute the weight gradient as (x^T @ grad)^T, a gemm with
    other operand layouts than the single model's mm backward (grad^T @ x), which
    can round differently; this keeps each member's gradients bit-equal.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return torch.bmm(x, weight.transpose(1, 2))

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors  # type: ignore[attr-defined]
        needs_x, needs_weight = ctx.needs_input_grad  # type: ignore[attr-defined]
        grad_x = torch.bmm(grad, weight) if needs_x else None
        grad_weight = torch.bmm(grad.transpose(1, 2), x) if needs_weight else None
        return grad_x, grad_weight


# ---------------------------------------------------------------------------
# Optimizer


def _per_member(values: Sequence[float], device: torch.device) -> Tensor:
    """Python floats (one per member) as a float32 (M,) tensor on `device`.

    float64 -> float32 is the rounding PyTorch applies to a Python scalar in a
    float32 kernel, so each member sees the factor its single run sees.
    """
    return torch.tensor(values, dtype=torch.float64).to(device, torch.float32)


def _against(factor: Tensor, like: Tensor) -> Tensor:
    """(M,) as (M, 1, ..., 1), broadcasting over one member's slice of `like`."""
    return factor.view((factor.size(0),) + (1,) * (like.ndim - 1))


class StackedAdamW:
    """AdamW with every hyperparameter per member, and members that can stop.

    Bit-equal, member by member, to `torch.optim.AdamW`'s single-tensor algorithm
    (what the single run gets on CPU) with each member's own parameter groups
    (`optim.parameter_groups`: decay on matrices, none on gains, embeddings as
    `decay_embeddings` says), betas, eps and learning rate. A stopped member
    (:meth:`stop`) has its weights and moments zeroed and its learning rate held
    at 0, so it no longer changes and no non-finite value of it is ever computed
    with; the other members are unaffected (nothing is shared between members).
    """

    def __init__(self, stack: StackedLlama, configs: Sequence[OptimConfig]) -> None:
        if len(configs) != stack.members:
            raise LlamaTrainError(f"{len(configs)} optimizer configs for {stack.members} members")
        self.stack = stack
        self.configs = list(configs)
        self.active = [True] * stack.members
        self.steps = [0] * stack.members
        self.state: dict[str, dict[str, Tensor]] = {}
        # Which parameters each member decays: the single run's own grouping rule.
        template = Llama(stack.config)
        decays: dict[str, list[float]] = {name: [] for name in stack.names}
        names = {id(p): name for name, p in template.named_parameters()}
        for cfg in self.configs:
            for group in parameter_groups(template, cfg):
                for param in group["params"]:
                    decays[names[id(param)]].append(group["weight_decay"])
        self.decays = decays

    def zero_grad(self) -> None:
        for param in self.stack.weights.values():
            param.grad = None

    def stop(self, member: int) -> None:
        """Take a member out of training (it diverged): zero its weights, gradients and
        moments. Zero weights keep its later losses and gradients finite."""
        self.active[member] = False
        with torch.no_grad():
            for key, param in self.stack.weights.items():
                param[member].zero_()
                if param.grad is not None:
                    param.grad[member].zero_()
                for moment in self.state.get(key, {}).values():
                    moment[member].zero_()

    @torch.no_grad()
    def step(self, lrs: Sequence[float]) -> None:
        """One AdamW step; lrs[m] is member m's learning rate (0 for a stopped member)."""
        lrs = [lr if active else 0.0 for lr, active in zip(lrs, self.active, strict=True)]
        self.steps = [s + 1 for s in self.steps]
        beta1 = [cfg.betas[0] for cfg in self.configs]
        beta2 = [cfg.betas[1] for cfg in self.configs]
        # The single run's Python-float arithmetic, member by member (torch.optim.adam).
        step_size = [-lr / (1 - b1**s) for lr, b1, s in zip(lrs, beta1, self.steps, strict=True)]
        bc2_sqrt = [(1 - b2**s) ** 0.5 for b2, s in zip(beta2, self.steps, strict=True)]
        device = self.stack.rope_cos.device
        # The per-member factors of this step, made once (one host-to-device copy each).
        factors = {
            "keep1": _per_member([1 - b for b in beta1], device),
            "beta2": _per_member(beta2, device),
            "keep2": _per_member([1 - b for b in beta2], device),
            "bc2_sqrt": _per_member(bc2_sqrt, device),
            "eps": _per_member([cfg.eps for cfg in self.configs], device),
            "step_size": _per_member(step_size, device),
        }
        for name in self.stack.names:
            key = _key(name)
            param = self.stack.weights[key]
            if param.grad is None:
                continue
            grad = param.grad
            state = self.state.get(key)
            if state is None:
                state = self.state[key] = {
                    "exp_avg": torch.zeros_like(param),
                    "exp_avg_sq": torch.zeros_like(param),
                }
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            f = {k: _against(v, param) for k, v in factors.items()}
            decay = [1 - lr * wd for lr, wd in zip(lrs, self.decays[name], strict=True)]
            param.mul_(_against(_per_member(decay, device), param))  # exactly 1 where wd = 0
            exp_avg.lerp_(grad, f["keep1"])
            exp_avg_sq.mul_(f["beta2"])
            # addcmul_(g, g, value=c) computes self + (c * g) * g: the same roundings.
            exp_avg_sq.addcmul_(grad * f["keep2"], grad)
            denom = (exp_avg_sq.sqrt() / f["bc2_sqrt"]).add_(f["eps"])
            # addcdiv_(a, d, value=s) computes self + (s * a) / d: the same roundings.
            param.addcdiv_(exp_avg * f["step_size"], denom)

    def state_dict(self, member: int) -> dict[str, dict[str, Tensor | float]]:
        """Member `member`'s moments and step, keyed by `Llama` parameter name."""
        return {
            name: {
                "step": float(self.steps[member]),
                "exp_avg": self.state[_key(name)]["exp_avg"][member].clone(),
                "exp_avg_sq": self.state[_key(name)]["exp_avg_sq"][member].clone(),
            }
            for name in self.stack.names
            if _key(name) in self.state
        }

    @torch.no_grad()
    def load_member_state(self, member: int, state: dict[str, dict[str, Tensor | float]]) -> None:
        """Set member `member`'s moments and step from :meth:`state_dict`'s layout."""
        for name, entry in state.items():
            key = _key(name)
            param = self.stack.weights[key]
            moments = self.state.setdefault(
                key,
                {"exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)},
            )
            moments["exp_avg"][member].copy_(entry["exp_avg"])
            moments["exp_avg_sq"][member].copy_(entry["exp_avg_sq"])
            self.steps[member] = int(float(entry["step"]))


def clip_member_gradients(stack: StackedLlama, max_norms: Sequence[float]) -> Tensor:
    """Per member: scale its gradients so their global L2 norm is at most max_norms[m].

    Returns the pre-clip norms (M,) float32. As `optim.clip_gradients` (torch's
    clip_grad_norm_): the norm of the per-tensor norms, coefficient max_norm /
    (norm + 1e-6) clamped at 1; 0 disables clipping but still measures.
    """
    # In the single model's parameter order: the norm of norms sums in that order.
    weights = [stack.weight(name) for name in stack.names]
    grads = [p.grad for p in weights if p.grad is not None]
    M = stack.members
    # One member at a time, with the kernels clip_grad_norm_ uses (_foreach_norm per
    # tensor, then the norm of those norms): a norm over an axis of the stack reduces
    # in another order, and its last bit can differ.
    total = torch.stack(
        [
            torch.linalg.vector_norm(torch.stack(torch._foreach_norm([g[m] for g in grads], 2)))
            for m in range(M)
        ]
    )  # (M,)
    limits = [norm if norm > 0 else math.inf for norm in max_norms]
    limit = torch.tensor(limits, dtype=torch.float32, device=total.device)
    # torch writes max_norm / (norm + 1e-6) with a Python float on the left, which
    # Tensor.__rtruediv__ computes as a reciprocal times max_norm.
    coef = ((total + 1e-6).reciprocal() * limit).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view((M,) + (1,) * (g.ndim - 1)).to(g.dtype))
    return total.float()
