"""Claims about start-up: a short run's process does not pay for what it does not use.

The trainer's AdamW (llama_train.core.adamw) is PyTorch's, bit for bit, without the
torch._dynamo import; `--help` and `--version` load no torch; summary.json says how
much CPU the process spent before its first step.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from llama_train.config import resolve_config
from llama_train.core import adamw
from llama_train.core.adamw import AdamW
from llama_train.core.model import Llama, ModelConfig
from llama_train.core.optim import OptimConfig, build_optimizer, clip_gradients, parameter_groups
from llama_train.train import train

SMALL_MODEL = {"dim": 16, "n_layers": 2, "n_heads": 2, "vocab_size": 11, "max_seq_len": 12}


def _model() -> Llama:
    torch.manual_seed(0)
    return Llama(ModelConfig(**SMALL_MODEL))


def _steps(model: Llama, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        tokens = torch.randint(0, 11, (4, 12), generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
        clip_gradients(model, 1.0)
        optimizer.step()


def test_the_trainers_adamw_is_torchs_bit_for_bit_with_or_without_dynamo_loaded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = OptimConfig(lr=3e-2, weight_decay=0.1)
    ours, reference = _model(), _model()
    optimizer = build_optimizer(ours, cfg)
    # The same groups and hyper-parameters, through torch.optim.AdamW itself.
    torch_optimizer = torch.optim.AdamW(
        parameter_groups(reference, cfg), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps
    )
    assert isinstance(optimizer, AdamW) and isinstance(optimizer, torch.optim.AdamW)
    # Steps 0-3 as in a process that never imported torch._dynamo (whatever this one
    # did before), steps 4-7 with it loaded: torch's decorated methods.
    with monkeypatch.context() as patch:
        patch.setattr(adamw, "_dynamo_loaded", lambda: False)
        _steps(ours, optimizer, range(4))
    _steps(reference, torch_optimizer, range(4))
    importlib.import_module("torch._dynamo")
    _steps(ours, optimizer, range(4, 8))
    _steps(reference, torch_optimizer, range(4, 8))
    for mine, theirs in zip(ours.parameters(), reference.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    state, torch_state = optimizer.state_dict(), torch_optimizer.state_dict()
    for index, moments in torch_state["state"].items():
        for key, value in moments.items():
            assert torch.equal(state["state"][index][key], value), (index, key)
    # A checkpoint of one loads into the other and continues identically.
    reloaded = torch.optim.AdamW(parameter_groups(ours, cfg), lr=cfg.lr)
    reloaded.load_state_dict(state)
    assert reloaded.state_dict()["param_groups"] == state["param_groups"]


def _fresh_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_building_and_stepping_adamw_in_a_fresh_process_does_not_import_dynamo() -> None:
    done = _fresh_python(
        f"""
        import sys, torch
        from llama_train.core.model import Llama, ModelConfig
        from llama_train.core.optim import OptimConfig, build_optimizer
        model = Llama(ModelConfig(**{SMALL_MODEL!r}))
        optimizer = build_optimizer(model, OptimConfig())
        model(torch.zeros(2, 8, dtype=torch.long)).logits.sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        optimizer.load_state_dict(optimizer.state_dict())
        print("torch._dynamo" in sys.modules)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize(
    "argv",
    [["llama_train.cli", "--help"], ["llama_train.cli", "--version"], ["gssm_data.cli", "--help"]],
)
def test_help_and_version_do_not_import_torch(argv: list[str]) -> None:
    module, option = argv
    done = _fresh_python(
        f"""
        import sys
        sys.argv = ["prog", {option!r}]
        from {module} import main
        try:
            main()
        except SystemExit:
            pass
        print("torch" in sys.modules, file=sys.stderr)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "printed nothing"
    assert done.stderr.strip().splitlines()[-1] == "False"


def test_the_summary_reports_the_cpu_spent_before_the_first_step(
    make_debug_store, tmp_path: Path
) -> None:
    store = make_debug_store(n_train=64, n_test=16, seq_len=17)
    config = resolve_config(
        None,
        [
            f"data.path={store}",
            f"run.dir={tmp_path / 'run'}",
            "data.batch_size=8",
            "model.dim=16",
            "model.n_layers=1",
            "model.n_heads=2",
            "train.steps=3",
            "train.progress=false",
        ],
    )
    before = time.process_time()
    summary = train(config)
    after = time.process_time()
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["startup_cpu_seconds"] == summary["startup_cpu_seconds"]
    # This process's CPU clock at the first step: after the call began, before it ended.
    assert before <= summary["startup_cpu_seconds"] <= after
