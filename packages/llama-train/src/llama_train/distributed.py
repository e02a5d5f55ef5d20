"""Where this process sits in the job: rank, world size and local rank.

The only module that reads the launcher's environment. torchrun sets
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; Slurm's ``srun`` sets ``SLURM_PROCID``,
``SLURM_STEP_NUM_TASKS`` and ``SLURM_LOCALID``. torchrun wins when both are
present (torchrun started inside a Slurm allocation). ``SLURM_NTASKS`` alone is
not trusted: a batch script sees the job's task count while running as one
process, and treating it as rank 0 of N would hang the first collective.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from llama_train.errors import LlamaTrainError

Launcher = Literal["single", "torchrun", "slurm"]

_TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_SLURM = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID")


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
