"""Memory estimates checked before a model or a batch is allocated.

A typo such as ``model.n_layers=100000`` or ``data.batch_size=1e9`` would
otherwise allocate until the machine swaps or the kernel kills the process, or
end in a MemoryError traceback. The estimates here are simple closed forms,
deliberately on the low side (they leave out the attention matrix, allocator
slack and the framework itself), so a refusal is always a configuration that
cannot run, never a borderline one; the message gives the figures so the user
sees by how much.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gssm_data.common.resources import available_memory_bytes
from llama_train.core.model import ModelConfig
from llama_train.errors import LlamaTrainError
from llama_train.scaling.compute import parameter_count

# fp32 weights, fp32 gradients and AdamW's two fp32 moments.
TRAIN_BYTES_PER_PARAMETER = 16
# Saved for backward per token and layer, in units of the residual width D and the
# SwiGLU width F: norms, q/k/v, rotated q/k, attention output and projections (~10 D);
# gate/up, silu(gate) and their product (~4 F). Logits: output, float copy, gradient.
_ACTIVATIONS_PER_D = 10
_ACTIVATIONS_PER_F = 4
_LOGIT_COPIES = 3


def activation_bytes(
    config: ModelConfig, batch_size: int, seq_len: int, *, bytes_per_value: int, backward: bool
) -> int:
    """Activations of one forward pass (kept for backward when `backward`) over a batch."""
    assert config.vocab_size is not None
    tokens = batch_size * seq_len
    if backward:
        per_token = config.n_layers * (
            _ACTIVATIONS_PER_D * config.dim + _ACTIVATIONS_PER_F * config.hidden_dim
        )
        per_token += _LOGIT_COPIES * config.vocab_size
    else:  # one layer's temporaries at a time, and the logits
        per_token = 4 * config.dim + 3 * config.hidden_dim + 2 * config.vocab_size
    return tokens * per_token * bytes_per_value


@dataclass(frozen=True)
class Memory:
    """Bytes free for this process on a device, and what to call the device in messages."""

    available: int | None  # None: unknown, nothing is refused
    where: str


def available_memory(device: torch.device, processes_sharing: int = 1) -> Memory:
    """Free memory of `device`: the GPU's, or the machine's available RAM shared by processes."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return Memory(free, f"{_size(free)} free on {device}")
    available = available_memory_bytes()
    if available is None:
        return Memory(None, "the machine")
    share = available // max(processes_sharing, 1)
    shared = f" shared by {processes_sharing} processes" if processes_sharing > 1 else ""
    return Memory(share, f"{_size(available)} of available RAM{shared}")


def check_training_fits(
    config: ModelConfig,
    *,
    batch_size: int,
    eval_batch_size: int,
    seq_len: int,
    device: torch.device,
    shards: int = 1,
    processes_sharing: int = 1,
    half_precision: bool = False,
) -> None:
    """Refuse, with the estimate, a model and batch that cannot fit this device.

    `shards` divides the parameter memory (FSDP); `processes_sharing` is how
    many ranks share the CPU's RAM.
    """
    memory = available_memory(device, processes_sharing)
    if memory.available is None:
        return
    parameters = parameter_count(config)
    state = parameters * TRAIN_BYTES_PER_PARAMETER // max(shards, 1)
    width = 2 if half_precision else 4
    train = activation_bytes(config, batch_size, seq_len, bytes_per_value=width, backward=True)
    evaluation = activation_bytes(
        config, eval_batch_size, seq_len, bytes_per_value=width, backward=False
    )
    activations = max(train, evaluation)
    needed = state + activations
    if needed > memory.available:
        raise LlamaTrainError(
            f"this run needs about {_size(needed)} ({_count(parameters)} parameters: "
            f"{_size(state)} of weights, gradients and AdamW state; {_size(activations)} "
            f"of activations for {max(batch_size, eval_batch_size):,} sequences of {seq_len} "
            f"tokens), more than the {memory.where}; lower model.dim, model.n_layers or "
            "data.batch_size (eval.batch_size)"
        )


def check_model_fits(config: ModelConfig, *, device: torch.device) -> None:
    """Refuse to build a model whose weights alone exceed the device's free memory."""
    memory = available_memory(device)
    if memory.available is None:
        return
    parameters = parameter_count(config)
    needed = 2 * 4 * parameters  # the model and the state dict it is loaded from
    if needed > memory.available:
        raise LlamaTrainError(
            f"this model has {_count(parameters)} parameters and needs about {_size(needed)} to "
            f"load, more than the {memory.where}"
        )


def _size(n_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n_bytes) < 1000 or unit == "PB":
            return f"{n_bytes:.3g} {unit}" if unit != "B" else f"{int(n_bytes)} B"
        n_bytes /= 1000
    raise AssertionError("unreachable")


def _count(n: int) -> str:
    return f"{n:,}" if n < 1e9 else f"{n:.3g}"


def stack_capacity(
    config: ModelConfig,
    *,
    batch_size: int,
    eval_batch_size: int,
    seq_len: int,
    device: torch.device,
    half_precision: bool = False,
) -> int:
    """How many members of this model a stack (`core.stack`) may hold on this device.

    Each member costs what a single run's training costs (weights, gradients, AdamW
    moments, activations of its batch) plus its single-model copy with its moments
    (12 bytes a parameter), which it evaluates and checkpoints from; evaluation runs
    one member at a time. At least 1: a single member that does not fit is refused
    by `check_training_fits` with its figures. Unknown memory: no limit.
    """
    memory = available_memory(device)
    if memory.available is None:
        return 1 << 30
    width = 2 if half_precision else 4
    parameters = parameter_count(config)
    per_member = parameters * (TRAIN_BYTES_PER_PARAMETER + 12) + activation_bytes(
        config, batch_size, seq_len, bytes_per_value=width, backward=True
    )
    evaluation = activation_bytes(
        config, eval_batch_size, seq_len, bytes_per_value=width, backward=False
    )
    return max(1, (memory.available - evaluation) // per_member)
