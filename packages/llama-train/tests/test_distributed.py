"""Running as one of several processes, checked inside one process.

Rank layout from the launcher's environment; the `distributed` section; the
process group's lifetime; agreement on errors; the preemption flag; FSDP2 and
DCP checkpoints on a group of one; the command line's `--nproc` and exit
code 3. The same machinery across real processes is tests/test_torchrun.py.
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from typer.testing import CliRunner

from llama_train.cli import app
from llama_train.core import distributed
from llama_train.core.checkpoint import CheckpointManager, CorruptCheckpointWarning, DcpPayload
from llama_train.core.distributed import (
    PREEMPTED_EXIT_CODE,
    DistributedConfig,
    PreemptionWatch,
    RankInfo,
    process_group,
    rank_info,
    resolve_backend,
    together,
)
from llama_train.errors import LlamaTrainError
from llama_train.launch import torchrun
from llama_train.recipe.evaluate_run import evaluate_run
from llama_train.recipe.train import Preempted, Trainer, train
from llama_train.recipe.train_config import resolve_config
from llama_train.rundir import CHECKPOINT_DIR, read_metrics

runner = CliRunner()
TINY = ["model.dim=16", "model.n_layers=2", "model.n_heads=2", "data.batch_size=8"]
CURVE_KEYS = ("step", "loss", "grad_norm", "lr", "tokens", "epoch", "eval/loss")


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


# ---------------------------------------------------------------------------
# The distributed section and the process group


@pytest.fixture(scope="module")
def store(make_debug_store) -> Path:
    """Debug preset, 256 train sequences in chunks of 64, 32 test sequences of 17 tokens."""
    return make_debug_store(n_train=256, n_test=32, seq_len=17)


def _config(store: Path, run_dir: Path, *overrides: str):
    return resolve_config(
        None,
        [
            f"data.path={store}",
            f"run.dir={run_dir}",
            *TINY,
            "optim.schedule=constant",  # the lr does not depend on train.steps
            "train.log_every=1",
            "train.progress=false",
            "train.device=cpu",  # gloo, and bit-exact comparisons
            *overrides,
        ],
    )


def _curve(run_dir: Path) -> list[dict]:
    return [{k: r[k] for k in CURVE_KEYS if k in r} for r in read_metrics(run_dir)]


def test_the_distributed_section_defaults_to_ddp_on_the_backend_that_fits_the_device(
    store, tmp_path
):
    config = _config(store, tmp_path)
    assert config.distributed == DistributedConfig(strategy="ddp", backend="auto", timeout_s=600)
    assert resolve_backend("auto", torch.device("cpu")) == "gloo"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "nccl"
    with pytest.raises(LlamaTrainError, match="backend=nccl needs CUDA"):
        resolve_backend("nccl", torch.device("cpu"))
    with pytest.raises(LlamaTrainError, match=r"distributed.strategy"):
        _config(store, tmp_path, "distributed.strategy=zero3")
    with pytest.raises(LlamaTrainError, match=r"did you mean 'distributed.strategy'"):
        _config(store, tmp_path, "distributed.stratgy=fsdp")


def test_a_single_ddp_process_starts_no_process_group():
    with process_group(RankInfo(), torch.device("cpu"), DistributedConfig()):
        assert not dist.is_initialized()
        assert distributed.world_size() == 1 and distributed.rank() == 0


def test_one_fsdp_process_gets_a_group_of_one_that_is_destroyed_even_after_an_error():
    with (
        pytest.raises(RuntimeError, match="inside"),
        process_group(RankInfo(), torch.device("cpu"), DistributedConfig(strategy="fsdp")),
    ):
        assert dist.is_initialized() and dist.get_world_size() == 1
        assert dist.get_backend() == "gloo"
        raise RuntimeError("inside")
    assert not dist.is_initialized()


def test_several_ranks_without_a_rendezvous_address_is_a_user_error(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    ranks = RankInfo(rank=1, world_size=2, local_rank=1, launcher="slurm")
    with (
        pytest.raises(LlamaTrainError, match=r"rank 1 of 2 \(slurm\) has no MASTER_ADDR"),
        process_group(ranks, torch.device("cpu"), DistributedConfig()),
    ):
        pass


def test_together_in_one_process_is_a_plain_block():
    with together("doing nothing"):
        pass
    error = LlamaTrainError("the store is gone")
    with pytest.raises(LlamaTrainError) as caught, together("opening the store"):
        raise error
    assert caught.value is error  # the block's own error, untouched


def test_another_ranks_failure_is_silent_on_the_command_line():
    # The failing rank prints its error; the others exit 1 without a copy of it.
    assert distributed.OtherRankFailed("rank 1 failed while x").reported_elsewhere


# ---------------------------------------------------------------------------
# Preemption


def test_a_preemption_signal_only_sets_a_flag_that_poll_reports():
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        with PreemptionWatch() as watch:
            assert not watch.poll()
            os.kill(os.getpid(), signal.SIGUSR1)  # a real signal; the process lives on
            assert watch.requested and watch.received == signal.SIGUSR1 and watch.poll()
        # Signalled: the signals are ignored from now on, so the exit is not cut short.
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_the_watch_restores_the_previous_handlers_when_no_signal_came():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    with PreemptionWatch() as watch:
        assert signal.getsignal(signal.SIGTERM) == watch._handle
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_a_signal_mid_run_checkpoints_the_next_step_and_the_rerun_matches(
    store, tmp_path, monkeypatch
):
    reference = _config(store, tmp_path / "whole", "train.steps=8", "eval.every=4")
    train(reference)
    original = Trainer.train_step

    def signalled_during_step_4(self, batches):
        if self.state.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batches)

    config = _config(store, tmp_path / "preempted", "train.steps=8", "eval.every=4")
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    monkeypatch.setattr(Trainer, "train_step", signalled_during_step_4)
    try:
        with pytest.raises(Preempted) as caught:
            train(config)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    monkeypatch.setattr(Trainer, "train_step", original)
    assert caught.value.step == 4 and not isinstance(caught.value, LlamaTrainError)
    assert caught.value.checkpoint == config.run_dir / CHECKPOINT_DIR / "step_000004"
    assert CheckpointManager(config.run_dir / CHECKPOINT_DIR).steps() == [4]
    train(config)
    assert _curve(config.run_dir) == _curve(reference.run_dir)


def test_a_signal_before_the_first_step_saves_nothing_and_raises(store, tmp_path, monkeypatch):
    monkeypatch.setattr(PreemptionWatch, "requested", property(lambda self: True))
    config = _config(store, tmp_path / "run", "train.steps=3")
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        with pytest.raises(Preempted) as caught:
            train(config)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert caught.value.step == 0 and caught.value.checkpoint is None
    assert "nothing to save yet" in str(caught.value)
    assert not (config.run_dir / CHECKPOINT_DIR).exists()


# ---------------------------------------------------------------------------
# FSDP2 and DCP checkpoints (a group of one; several ranks: tests/test_torchrun.py)


def test_fsdp_on_one_process_trains_like_the_plain_model_and_resumes_plain(store, tmp_path):
    plain = _config(store, tmp_path / "plain", "train.steps=6", "eval.every=3")
    train(plain)
    sharded = _config(
        store, tmp_path / "fsdp", "train.steps=3", "eval.every=3", "distributed.strategy=fsdp"
    )
    summary = train(sharded)
    folder = sharded.run_dir / CHECKPOINT_DIR / "step_000003"
    assert sorted(p.name for p in (folder / "dcp").iterdir()) == [".metadata", "__0_0.distcp"]
    # The sharded checkpoint evaluates in a plain process (full tensors rebuilt from DCP).
    assert evaluate_run(sharded.run_dir).loss == pytest.approx(summary["test_loss"], rel=1e-6)
    train(_config(store, sharded.run_dir, "train.steps=6", "eval.every=3"))  # resumed plain
    got, expected = _curve(sharded.run_dir), _curve(plain.run_dir)
    assert [line.keys() for line in got] == [line.keys() for line in expected]
    for line, reference in zip(got, expected, strict=True):
        for key, value in reference.items():
            assert math.isclose(line[key], value, rel_tol=1e-5, abs_tol=1e-7), (key, line)


def _model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_a_dcp_checkpoint_loads_back_exactly_in_place_and_as_full_tensors(tmp_path):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optimizer = _model_and_optimizer()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    manager = CheckpointManager(tmp_path, payload=DcpPayload())
    manager.save(7, {"model": model_state, "optimizer": optimizer_state, "step": 7})
    full = CheckpointManager(tmp_path).load(7)  # any manager reads the format it names
    assert full["step"] == 7
    for name, tensor in model.state_dict().items():
        assert torch.equal(full["model"][name], tensor)
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    other_optimizer = torch.optim.AdamW(other.parameters(), lr=0.1)
    templates = dict(
        zip(("model", "optimizer"), get_state_dict(other, other_optimizer), strict=True)
    )
    step, state = manager.load_latest(into=templates)
    assert step == 7 and state["model"] is templates["model"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(other.state_dict()[name], tensor)  # filled in place
    saved = optimizer_state["state"]["0.weight"]
    loaded = state["optimizer"]["state"]["0.weight"]
    assert torch.equal(saved["exp_avg_sq"], loaded["exp_avg_sq"])
    assert float(saved["step"]) == float(loaded["step"]) == 1.0


def test_a_damaged_dcp_shard_fails_its_checksum_and_the_previous_checkpoint_is_used(tmp_path):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optimizer = _model_and_optimizer()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    manager = CheckpointManager(tmp_path, keep=3, payload=DcpPayload())
    for step in (1, 2):
        manager.save(step, {"model": model_state, "optimizer": optimizer_state})
    shard = tmp_path / "step_000002" / "dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.warns(CorruptCheckpointWarning, match="dcp/__0_0.distcp fails its checksum"):
        assert manager.load_latest()[0] == 1


def test_a_single_process_torch_checkpoint_cannot_be_resumed_in_place(tmp_path):
    manager = CheckpointManager(tmp_path)  # the torch.save format of one process
    manager.save(1, {"model": {"w": torch.ones(2)}, "optimizer": {}})
    with pytest.raises(LlamaTrainError, match="cannot be resumed in place"):
        manager.load(1, into={"model": {}, "optimizer": {}})
    assert torch.equal(manager.load(1)["model"]["w"], torch.ones(2))  # still evaluates


# ---------------------------------------------------------------------------
# The command line: --nproc and the preemption exit code


def _write_config(store: Path, tmp_path: Path, **extra) -> Path:
    import yaml

    path = tmp_path / "tiny.yaml"
    body = {"data": {"path": str(store), "batch_size": 8}, "model": {"dim": 16, "n_heads": 2}}
    path.write_text(yaml.safe_dump({**body, **extra}))
    return path


def test_run_exits_3_and_names_the_checkpoint_when_preempted(store, tmp_path, monkeypatch):
    import llama_train.recipe.train as recipe

    def preempted(config, *, progress=None):
        raise Preempted(5, Path("runs/x/checkpoints/step_000005"))

    monkeypatch.setattr(recipe, "train", preempted)
    result = runner.invoke(app, ["run", str(_write_config(store, tmp_path))])
    assert result.exit_code == PREEMPTED_EXIT_CODE == 3
    assert result.output.strip() == (
        "preempted at step 5: checkpoint runs/x/checkpoints/step_000005; "
        "run the same command again to resume"
    )


def test_run_nproc_checks_the_config_once_before_starting_any_process(store, tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(torchrun, "launch_torchrun", lambda n, args: started.append(n) or 0)
    bad = runner.invoke(app, ["run", "--nproc", "2", str(_write_config(store, tmp_path)), "x.y=1"])
    assert bad.exit_code == 1 and "unknown config key 'x.y'" in bad.output and started == []
    config = str(_write_config(store, tmp_path))
    good = runner.invoke(app, ["run", "--nproc", "2", config, "optim.lr=1e-3"])
    assert good.exit_code == 0 and started == [2]


def test_run_nproc_inside_a_launched_job_is_refused(store, tmp_path, monkeypatch):
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    result = runner.invoke(app, ["run", "--nproc", "2", str(_write_config(store, tmp_path))])
    assert result.exit_code == 1 and "leave --nproc out" in result.output


@pytest.mark.parametrize(
    ("exit_codes", "expected"),
    [
        ({0: 3, 1: 3}, 3),
        ({1: 3}, 3),
        ({0: 3, 1: -15}, 3),  # torchrun's SIGTERM to a rank still exiting after rank 0 did
        ({0: 3, 1: 1}, 1),
        ({0: -9}, 1),
        ({1: 2}, 2),
    ],
)
def test_the_launcher_exits_3_when_a_rank_was_preempted_and_none_failed_otherwise(
    monkeypatch, exit_codes, expected
):
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def failing(args):
        assert args.standalone and args.nproc_per_node == "2"
        assert args.training_script == "llama_train" and args.module
        failures = {
            rank: ProcessFailure(rank, 100 + rank, code, "") for rank, code in exit_codes.items()
        }
        raise ChildFailedError("llama_train", failures)

    monkeypatch.setattr(torch.distributed.run, "run", failing)
    for name in ("TORCHELASTIC_SIGNALS_TO_HANDLE", "OMP_NUM_THREADS"):  # set by the launcher
        monkeypatch.setenv(name, os.environ.get(name, "1"))
    before = signal.getsignal(signal.SIGTERM)
    assert torchrun.launch_torchrun(2, ["run", "config.yaml"]) == expected
    assert signal.getsignal(signal.SIGTERM) == before
