"""`llama-train eval --rope-scaling`: excess loss by position on longer sequences, same process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from gssm_data.entropy import sequence_entropy
from gssm_data.extend import extend
from gssm_data.generate import GenerateOptions, generate
from gssm_data.presets import load_preset
from gssm_data.store import open_store
from llama_train.cli import app
from llama_train.core.checkpoint import CheckpointManager
from llama_train.core.model import Llama, ModelConfig
from llama_train.core.rope import ROPE_METHODS, RopeScaling
from llama_train.errors import LlamaTrainError
from llama_train.recipe.evaluate_run import evaluate_run
from llama_train.recipe.extrapolate import extrapolate_run, parse_methods
from llama_train.recipe.train import train
from llama_train.recipe.train_config import resolve_config

SEQ_LEN, LONG, N_TEST, N_LONG, SEED = 17, 129, 24, 12, 3  # LONG - 1 = 8 x (SEQ_LEN - 1)
runner = CliRunner()


def _store(out: Path, *, preset: str = "debug", seed: int = SEED, seq_len: int = SEQ_LEN) -> Path:
    generate(
        GenerateOptions(
            graph=load_preset(preset),
            name=preset,
            out=out,
            n_train=64,
            n_test=N_TEST,
            seq_len=seq_len,
            seed=seed,
            block_size=16,
        )
    )
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("extrapolate")


@pytest.fixture(scope="module")
def run_dir(folder: Path) -> Path:
    store = _store(folder / "debug.zarr")
    config = resolve_config(
        None,
        [
            f"data.path={store}",
            "data.batch_size=8",
            "model.dim=16",
            "model.n_layers=1",
            "model.n_heads=2",
            "train.steps=12",
            "optim.lr=1e-2",
            "optim.warmup_steps=5",
            f"run.dir={folder / 'run'}",
        ],
    )
    train(config, progress=False)
    return folder / "run"


@pytest.fixture(scope="module")
def long_store(folder: Path) -> Path:
    return extend(folder / "debug.zarr", seq_len=LONG, n_test=N_LONG).path


def _eval(*arguments: str):
    return runner.invoke(app, ["eval", *arguments])


@pytest.mark.integration
def test_every_method_end_to_end_json_table_and_plot(run_dir, long_store, folder):
    plot = folder / "extrapolation.png"
    data_option = ["--data", str(long_store)]
    result = _eval(
        str(run_dir), *data_option, "--rope-scaling", "all", "--json", "--plot", str(plot)
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [curve["method"] for curve in data["curves"]] == list(ROPE_METHODS)
    assert [curve["factor"] for curve in data["curves"]] == [1.0, 8.0, 8.0, 8.0, 8.0]
    assert (data["train_seq_len"], data["seq_len"], data["n_sequences"]) == (SEQ_LEN, LONG, N_LONG)
    assert data["ranges"] == [[1 + 16 * k, 16 * (k + 1)] for k in range(8)]
    for curve in data["curves"]:
        assert len(curve["excess_per_position"]) == LONG - 1
        assert np.all(np.isfinite(curve["excess_per_position"]))
    assert plot.is_file() and plot.stat().st_size > 10_000
    table = _eval(str(run_dir), *data_option, "--rope-scaling", "yarn")
    assert table.exit_code == 0, table.output
    assert "1-16 (trained)" in table.stdout and "113-128" in table.stdout, table.stdout
    assert "yarn x8" in table.stdout and (run_dir / "extrapolation.png").is_file()


@pytest.mark.integration
def test_the_entropy_is_the_exact_entropy_of_the_long_sequences(run_dir, long_store):
    result = extrapolate_run(run_dir, long_store, ["none"])
    store = open_store(long_store)
    tokens = np.asarray(store.tokens("test")[:])
    nats = sequence_entropy(store.graph, store.conditionals(), tokens)
    np.testing.assert_allclose(result.entropy_per_position, nats.mean(axis=0), rtol=1e-12)


@pytest.mark.integration
def test_model_loss_per_position_matches_an_independent_computation(run_dir, long_store):
    """Rebuild the model by hand with linear x8 tables; log-softmax in float64, row by row."""
    result = extrapolate_run(run_dir, long_store, ["linear"])
    step, state = CheckpointManager(run_dir / "checkpoints", keep=None).load_latest()
    config = ModelConfig.model_validate(state["model_config"]).model_copy(
        update={"max_seq_len": LONG, "rope_scaling": RopeScaling(method="linear", factor=8.0)}
    )
    model = Llama(config)
    model.load_state_dict(state["model"])
    model.eval()
    tokens = torch.from_numpy(np.asarray(open_store(long_store).tokens("test")[:]).astype(np.int64))
    with torch.no_grad():
        losses = [
            -F.log_softmax(model(row[None, :-1]).logits[0].double(), -1)
            .gather(-1, row[1:, None])
            .squeeze(-1)
            for row in tokens
        ]
    expected = torch.stack(losses).mean(0).numpy()
    assert result.step == step
    np.testing.assert_allclose(result.curves[0].loss_per_position, expected, rtol=1e-5)


@pytest.mark.integration
def test_without_scaling_the_trained_positions_score_as_on_the_runs_own_store(run_dir, long_store):
    """The long rows begin with the parent's test rows and the model is causal, so with
    method none the first SEQ_LEN - 1 positions give the plain evaluation's curve."""
    long = extrapolate_run(run_dir, long_store, ["none"])
    plain = evaluate_run(run_dir, max_sequences=N_LONG)
    np.testing.assert_allclose(
        long.curves[0].loss_per_position[: SEQ_LEN - 1], plain.loss_per_position, rtol=1e-5
    )
    np.testing.assert_allclose(
        long.entropy_per_position[: SEQ_LEN - 1], plain.entropy_per_position, rtol=1e-9
    )


@pytest.mark.integration
def test_factor_one_gives_every_method_the_same_curve(run_dir, long_store):
    result = extrapolate_run(run_dir, long_store, ["none", "ntk", "llama3"], factor=1.0)
    for curve in result.curves[1:]:
        assert curve.loss_per_position == result.curves[0].loss_per_position


def _one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.integration
def test_a_store_of_another_process_is_refused_in_one_line(run_dir, folder):
    other_seed = _store(folder / "seed4.zarr", seed=SEED + 1, seq_len=LONG)
    _one_line_error(
        _eval(str(run_dir), "--data", str(other_seed), "--rope-scaling", "none"),
        "not drawn from the process",
        "other seed",
        "gssm-data extend",
    )
    other_vocab = _store(folder / "hmm.zarr", preset="hmm", seq_len=LONG)
    _one_line_error(
        _eval(str(run_dir), "--data", str(other_vocab), "--rope-scaling", "none"),
        "vocab_size 32",
        "trained on 8 tokens",
    )


@pytest.mark.integration
def test_option_errors_are_one_line(run_dir, long_store, folder):
    run, data = str(run_dir), str(long_store)
    _one_line_error(_eval(run, "--data", data), "longer than the model's context", "--rope-scaling")
    _one_line_error(_eval(run, "--rope-scaling", "yarn"), "needs --data", "gssm-data extend")
    _one_line_error(_eval(run, "--data", data, "--rope-scaling", "rope"), "choose from")
    _one_line_error(_eval(run, "--data", data, "--factor", "2"), "go with --rope-scaling")
    for factor in ("nan", "inf", "0.5"):
        _one_line_error(
            _eval(run, "--data", data, "--rope-scaling", "yarn", "--factor", factor), "--factor"
        )
    _one_line_error(
        _eval(run, "--data", str(folder / "missing.zarr"), "--rope-scaling", "none"), "no store"
    )


def test_parse_methods_keeps_order_and_drops_repeats():
    assert parse_methods("yarn, none,yarn") == ["yarn", "none"]
    assert parse_methods("ALL") == ["none", "linear", "ntk", "yarn", "llama3"]
    with pytest.raises(LlamaTrainError, match="choose from"):
        parse_methods(",")
