"""Everything about running as one of several processes, in one module.

- Where this process sits: :func:`rank_info` is the only reader of the
  launcher's environment. torchrun sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``;
  Slurm's ``srun`` sets ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` and
  ``SLURM_LOCALID``. torchrun wins when both are present (torchrun started
  inside a Slurm allocation). ``SLURM_NTASKS`` alone is not trusted: a batch
  script sees the job's task count while running as one process, and treating
  it as rank 0 of N would hang the first collective.
- The process group: :func:`process_group` initialises it (gloo on CPU, NCCL
  on GPU, plus a gloo group for small host-side agreements) and always destroys
  it; nothing else calls ``init_process_group``.
- The model's parallel layout (:class:`DistributedConfig`, the `distributed`
  config section): :func:`parallelize` wraps a model in DDP (replicated, one
  gradient all-reduce per optimizer step) or FSDP2 (``fully_shard`` per block,
  then the root; mixed precision from ``train.amp``); :func:`gradient_sync`
  skips communication on all but the last accumulation micro-step.
- Agreement: :func:`together` runs a block on every rank and, when any rank
  raises, makes every rank stop (the first failing rank with its own error,
  the others with :class:`OtherRankFailed`), so one rank's user error never
  leaves the others waiting in a collective.
- Preemption: :class:`PreemptionWatch` turns SIGUSR1/SIGTERM (Slurm's warning
  signals) into a flag, and ``poll()`` makes all ranks agree on the step at
  which to stop.
- Device and precision: :func:`resolve_device` (``train.device``) and
  :func:`resolve_amp` (``train.amp``), and :func:`autocast` for the forward passes
  of training and evaluation alike.

Helpers that communicate degrade to local no-ops in a single process, so the
same code runs with and without a process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from llama_train.errors import LlamaTrainError

Launcher = Literal["single", "torchrun", "slurm"]
Strategy = Literal["ddp", "fsdp"]

_TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_SLURM = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID")

# SIGUSR1: what `sbatch --signal=USR1@120` sends before the time limit; SIGTERM: what
# Slurm sends on preemption or scancel (and torchrun forwards when it is stopped).
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# Exit code of `llama-train run` when the run was preempted (SIGUSR1/SIGTERM) and
# checkpointed: not a failure, the same command resumes. Slurm wrappers requeue on it.
PREEMPTED_EXIT_CODE = 3
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


class DistributedConfig(BaseModel):
    """How several processes share the training (the `distributed` section).

    Ignored by a single process unless `strategy` is fsdp (then a one-process
    group is started so the same sharded code path runs).
    """

    model_config = ConfigDict(extra="forbid")

    strategy: Strategy = Field(
        "ddp",
        description="ddp = every rank holds the whole model, gradients are averaged once per "
        "step; fsdp = FSDP2, parameters, gradients and optimizer state sharded across ranks "
        "(for models that do not fit one device)",
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="collective backend; auto = nccl on CUDA, gloo on the CPU"
    )
    timeout_s: float = Field(
        600,
        gt=0,
        description="seconds a collective waits for the other ranks before the run fails "
        "(a rank that died or hangs); raise it when a checkpoint takes longer to write",
    )


# ---------------------------------------------------------------------------
# Where this process sits


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the job; world_size 1 means a plain single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: Launcher = "single"

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, writes metrics and saves what is not sharded."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether a process group is needed (more than one process)."""
        return self.world_size > 1


def rank_info(environ: Mapping[str, str] | None = None) -> RankInfo:
    """Read the rank layout from torchrun's or Slurm's variables (os.environ by default)."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        rank, world, local = (_read_int(env, name) for name in _TORCHRUN)
        return _checked(rank, world, local, "torchrun")
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        rank, world, local = (_read_int(env, name) for name in _SLURM)
        return _checked(rank, world, local, "slurm")
    return RankInfo()


def _read_int(env: Mapping[str, str], name: str) -> int:
    if name not in env:
        raise LlamaTrainError(
            f"environment variable {name} is missing; launch with torchrun or srun, "
            "or unset RANK/WORLD_SIZE for a single process"
        )
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise LlamaTrainError(f"environment variable {name}={value!r} is not an integer") from None


def _checked(rank: int, world: int, local: int, launcher: Launcher) -> RankInfo:
    if world < 1 or not 0 <= rank < world or local < 0:
        raise LlamaTrainError(
            f"inconsistent {launcher} environment: rank {rank}, world size {world}, "
            f"local rank {local} (need 0 <= rank < world size)"
        )
    return RankInfo(rank=rank, world_size=world, local_rank=local, launcher=launcher)


# ---------------------------------------------------------------------------
# The process group


class _Groups:
    """The groups of the running job (module state, like torch.distributed's own default group).

    `host` carries small CPU-side agreements (errors, preemption, objects): the
    default group under gloo, a separate gloo group under NCCL, so that none of
    them waits for the GPU.
    """

    host: dist.ProcessGroup | None = None


def resolve_backend(backend: str, device: torch.device) -> str:
    """`auto` is NCCL for CUDA devices and gloo otherwise; NCCL without CUDA is a user error."""
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise LlamaTrainError(
            "distributed.backend=nccl needs CUDA devices; use auto or gloo for CPU training"
        )
    return backend


def needs_process_group(ranks: RankInfo, config: DistributedConfig) -> bool:
    """Several processes always; one process only for FSDP (which shards over a mesh)."""
    return ranks.distributed or config.strategy == "fsdp"


def is_initialized() -> bool:
    """Whether a process group is up in this process."""
    return dist.is_available() and dist.is_initialized()


def host_group() -> dist.ProcessGroup | None:
    """The gloo group for host-side coordination (None: the default group, itself gloo)."""
    return _Groups.host


def world_size() -> int:
    """Processes in the running group (1 without one)."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank in the running group (0 without one)."""
    return dist.get_rank() if is_initialized() else 0


@contextlib.contextmanager
def process_group(
    ranks: RankInfo, device: torch.device, config: DistributedConfig
) -> Iterator[None]:
    """Initialise the process group this run needs (if any) and destroy it on the way out.

    The address comes from the launcher's environment (MASTER_ADDR and
    MASTER_PORT, set by torchrun); a single process (FSDP on one device) uses
    an in-process store. The group is destroyed even when the run raises:
    left to the interpreter's exit, NCCL may hang and torch warns of a leak.
    """
    if not needs_process_group(ranks, config):
        yield
        return
    if is_initialized():
        raise LlamaTrainError("a process group is already initialised in this process")
    backend = resolve_backend(config.backend, device)
    timeout = timedelta(seconds=config.timeout_s)
    options: dict[str, Any] = {}
    if not ranks.distributed:
        options["store"] = dist.HashStore()
    elif "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise LlamaTrainError(
            f"rank {ranks.rank} of {ranks.world_size} ({ranks.launcher}) has no MASTER_ADDR/"
            "MASTER_PORT to meet the other ranks; launch with torchrun or llama-train run --nproc"
        )
    dist.init_process_group(
        backend=backend,
        rank=ranks.rank,
        world_size=ranks.world_size,
        timeout=timeout,
        device_id=device if device.type == "cuda" else None,
        **options,
    )
    try:
        _Groups.host = (
            None if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
        )
        yield
    finally:
        _Groups.host = None
        dist.destroy_process_group()


# ---------------------------------------------------------------------------
# Small collectives (no-ops in a single process)


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce `tensor` in place over all ranks (sum, max or min) and return it.

    CPU tensors go through the host (gloo) group, device tensors through the
    default group, so host figures never force a GPU synchronisation.
    """
    if world_size() > 1:
        group = _Groups.host if tensor.device.type == "cpu" else None
        dist.all_reduce(tensor, op=_REDUCE_OPS[op], group=group)
    return tensor


_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank `src`'s `value` on every rank (picklable objects; small ones: it goes via the host)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src, group=_Groups.host)
    return box[0]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank (a one-element list without a group)."""
    if world_size() == 1:
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value, group=_Groups.host)
    return values


class OtherRankFailed(LlamaTrainError):
    """Another rank raised inside a :func:`together` block; it reports its own error.

    The command line exits 1 without a message for it (`reported_elsewhere`):
    the failing rank prints the error once, instead of every rank a copy.
    """

    reported_elsewhere = True


@contextlib.contextmanager
def together(what: str) -> Iterator[None]:
    """Run a block on every rank; if any rank raises, every rank raises.

    The lowest failing rank re-raises its own exception, every other rank
    raises OtherRankFailed naming it: nobody goes on to a collective the
    failing rank will never join. Costs one small all-reduce; the block must
    not itself contain collectives that a failing rank could skip.
    """
    error: Exception | None = None
    try:
        yield
    except Exception as caught:
        error = caught
    if world_size() == 1:
        if error is not None:
            raise error
        return
    flag = torch.tensor([rank() if error is not None else world_size()], dtype=torch.int64)
    first = int(all_reduce(flag, "min").item())
    if error is not None and first == rank():
        raise error
    if first < world_size():
        raise OtherRankFailed(f"rank {first} failed while {what}") from None


# ---------------------------------------------------------------------------
# The parallel model


def parallelize(
    model: nn.Module,
    *,
    strategy: Strategy,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    compile: bool,
) -> nn.Module:
    """Place and wrap `model` for this job; returns the module the training loop calls.

    No group (one process, ddp): the model itself, compiled when asked.
    ddp: ``DistributedDataParallel`` around the (compiled) model; it checks at
    construction that every rank built the same parameters; buffers (the
    rotary tables, constants) are not synced before each forward.
    fsdp: ``fully_shard`` on each block, then on the root (embedding, final
    norm, output), so one block's parameters are gathered at a time;
    `amp_dtype` becomes the policy's parameter dtype with float32 gradient
    reduction. Blocks are compiled in place (names unchanged). The model is
    sharded in place: `model` itself is the sharded module afterwards, and
    its (DTensor) parameters are those the optimizer must be built on.
    Parameters may sit on the CPU: fully_shard moves each shard to `device`.
    """
    if strategy == "fsdp":
        return _fully_shard(model, device=device, amp_dtype=amp_dtype, compile=compile)
    model.to(device)
    step_model = torch.compile(model) if compile else model
    if world_size() == 1:
        return step_model
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # The rotary tables are the only buffers: constants, equal on every rank, so they
    # need no sync before each forward (the option's name changed in torch 2.13).
    no_buffer_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        else {"broadcast_buffers": False}
    )
    return DistributedDataParallel(
        step_model, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync
    )


def _fully_shard(
    model: nn.Module, *, device: torch.device, amp_dtype: torch.dtype | None, compile: bool
) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not is_initialized():
        raise LlamaTrainError(
            "distributed.strategy=fsdp needs a process group; train through "
            "llama_train.recipe.train.train() or the llama-train command"
        )
    if amp_dtype == torch.float16:
        raise LlamaTrainError(
            "train.amp=fp16 is not supported with distributed.strategy=fsdp (its gradient "
            "scaler does not see sharded gradients); use bf16"
        )
    mesh = init_device_mesh(device.type, (world_size(),))
    policy = (
        MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)
        if amp_dtype is not None
        else MixedPrecisionPolicy()
    )
    blocks = getattr(model, "layers", None)
    assert isinstance(blocks, nn.ModuleList), "FSDP wraps the model's `layers` block by block"
    for block in blocks:
        if compile:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


@contextlib.contextmanager
def gradient_sync(step_model: nn.Module, enabled: bool) -> Iterator[None]:
    """Inside with `enabled` False, backward passes only accumulate local gradients.

    Used around every accumulation micro-step but the last: DDP's ``no_sync``,
    FSDP2's ``set_requires_gradient_sync(False)``; nothing for a plain module.
    """
    if enabled:
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(step_model, DistributedDataParallel):
        with step_model.no_sync():
            yield
    elif isinstance(step_model, FSDPModule):
        step_model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            step_model.set_requires_gradient_sync(True)
    else:
        yield


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a possibly distributed one (a DTensor norm from FSDP's clipping).

    No DTensor exists before torch.distributed.tensor is imported (FSDP imports it), so a
    plain run never pays that import (about 1 s of CPU, sympy included) in its first step.
    """
    tensor_module = sys.modules.get("torch.distributed.tensor")
    if tensor_module is None:
        return tensor
    return tensor.full_tensor() if isinstance(tensor, tensor_module.DTensor) else tensor


# ---------------------------------------------------------------------------
# Preemption


class PreemptionWatch:
    """Turns preemption signals into an agreed stop at a step boundary.

    While active (a context manager, main thread only), SIGUSR1 and SIGTERM
    only set a flag: a signal handler must not save a checkpoint (it may fire
    in the middle of an optimizer step or a collective). The loop calls
    :meth:`poll` at every step boundary on every rank; it returns True on all
    ranks at the same step once any rank has received a signal.

    With several ranks the agreement is an all-reduce (MAX) of the flag on the
    host group, started at one boundary and read at the next, so the loop
    never waits for it: a signal is acted on one or two steps after it
    arrives, on the same step everywhere.

    Forked DataLoader workers inherit the flag-only handler, so Slurm's signal
    to every process of the job does not kill them. Once this process has
    received a signal or agreed to stop, leaving the block sets the signals
    to be ignored rather than restoring the old handlers: the process is on
    its way out, and torchrun stops the remaining ranks with SIGTERM as soon
    as the first one exits, which must not kill one mid-exit (a Python
    handler would not do: the interpreter resets those to the default while
    it shuts down; an ignored signal stays ignored).
    """

    def __init__(self, signals: Sequence[signal.Signals] = PREEMPTION_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received: signal.Signals | None = None
        self.stopping = False  # poll() has returned True: every rank is stopping
        self._previous: dict[signal.Signals, Any] = {}
        self._pending: tuple[Any, torch.Tensor] | None = None

    @property
    def requested(self) -> bool:
        """Whether this process has received a preemption signal."""
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)

    def __enter__(self) -> PreemptionWatch:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._pending = None  # after an error, another rank may never join it: not awaited
        leaving = self.requested or self.stopping
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if leaving else previous)
        self._previous = {}

    def poll(self) -> bool:
        """Whether every rank agrees to stop now. Collective: call it at every step boundary."""
        self.stopping = self._agreed()
        return self.stopping

    def _agreed(self) -> bool:
        if world_size() == 1:
            return self.requested
        agreed = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            agreed = bool(flag.item())
        flag = torch.tensor([int(self.requested)], dtype=torch.int32)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_Groups.host, async_op=True)
        self._pending = (work, flag)
        return agreed

    def settle(self) -> None:
        """Wait for the last agreement started by :meth:`poll` (before the group goes away).

        Call it where every rank has polled the same number of times: at the
        end of the loop, or when all have agreed to stop.
        """
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


# ---------------------------------------------------------------------------
# Device and precision


class DeviceSetting(Protocol):
    """Any section with a `device` choice (the recipe's `train` section)."""

    @property
    def device(self) -> str: ...


def resolve_device(section: DeviceSetting, ranks: RankInfo) -> torch.device:
    """`train.device`: `auto` is CUDA when available (device `local_rank`), else the CPU."""
    wanted = section.device
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda":
        if not torch.cuda.is_available():
            raise LlamaTrainError("train.device=cuda but CUDA is not available; use auto or cpu")
        device = torch.device("cuda", ranks.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return device
    return torch.device("cpu")


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = full precision). `auto`: bf16 on CUDA, fp32 on CPU."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp == "fp16" and device.type != "cuda":
        raise LlamaTrainError(
            "train.amp=fp16 needs CUDA (its gradient scaler is a GPU tool); "
            "use bf16 or fp32 on the CPU"
        )
    return AMP_DTYPES[amp]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device`; nothing when `dtype` is None (full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
