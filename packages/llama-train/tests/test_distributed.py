"""Rank layout from the launcher's environment: torchrun, Slurm's srun, or neither."""

from __future__ import annotations

import pytest

from llama_train.distributed import RankInfo, rank_info
from llama_train.errors import LlamaTrainError


def test_a_plain_process_is_rank_zero_of_one():
    info = rank_info({})
    assert info == RankInfo(0, 1, 0, "single")
    assert info.is_main and not info.distributed


def test_torchrun_variables_give_rank_world_and_local_rank():
    info = rank_info({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert info == RankInfo(3, 4, 1, "torchrun")
    assert not info.is_main and info.distributed


def test_srun_variables_give_rank_world_and_local_rank():
    env = {
        "SLURM_PROCID": "1",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_ID": "77",
    }
    assert rank_info(env) == RankInfo(1, 2, 1, "slurm")


def test_torchrun_inside_a_slurm_allocation_wins():
    env = {
        "RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "SLURM_PROCID": "0",
        "SLURM_STEP_NUM_TASKS": "1",
        "SLURM_LOCALID": "0",
    }
    assert rank_info(env).launcher == "torchrun" and rank_info(env).world_size == 2


def test_a_slurm_batch_script_without_srun_is_a_single_process():
    # sbatch --ntasks=4 runs the script once: rank 0 of 4 would wait forever for the others.
    assert rank_info({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}) == RankInfo()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "0", "WORLD_SIZE": "2"}, "LOCAL_RANK is missing"),
        ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK='x' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "rank 2, world size 2"),
    ],
)
def test_broken_launcher_variables_are_one_line_user_errors(env, message):
    with pytest.raises(LlamaTrainError, match=message):
        rank_info(env)


def test_rank_info_is_frozen():
    with pytest.raises(AttributeError):
        RankInfo().rank = 1  # type: ignore[misc]
