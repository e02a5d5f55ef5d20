"""Evaluation: model loss and exact entropy of the same sequences, checked independently."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gssm_data.entropy import rows_entropy, write_split_entropy
from gssm_data.generate import GenerateOptions, generate
from gssm_data.presets import load_preset
from gssm_data.store import open_store
from llama_train.core.data import DataConfig, resolve_data
from llama_train.core.evaluate import EvalResult, EvalSet, evaluate
from llama_train.core.model import Llama, ModelConfig
from llama_train.errors import LlamaTrainError
from llama_train.recipe.evaluate_run import evaluate_run
from llama_train.recipe.train import train
from llama_train.recipe.train_config import resolve_config

SEQ_LEN, N_TEST, SEED = 17, 48, 3


def _store(out: Path, preset: str = "debug", seq_len: int = SEQ_LEN) -> Path:
    generate(
        GenerateOptions(
            graph=load_preset(preset),
            name=preset,
            out=out,
            n_train=64,
            n_test=N_TEST,
            seq_len=seq_len,
            seed=SEED,
        )
    )
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Debug preset, default block size (so the online test stream is this store's test split)."""
    return _store(tmp_path_factory.mktemp("stores") / "debug.zarr")


@pytest.fixture(scope="module")
def model() -> Llama:
    config = ModelConfig(dim=16, n_layers=1, n_heads=2, vocab_size=8, max_seq_len=SEQ_LEN)
    return Llama(config, seed=1)


def _independent_loss(model: Llama, tokens: np.ndarray) -> np.ndarray:
    """Per-token loss (rows, L-1) by log-softmax in float64, one sequence at a time."""
    rows = []
    with torch.no_grad():
        for sequence in torch.from_numpy(tokens.astype(np.int64)):
            logits = model(sequence[None, :-1]).logits[0].double()  # (L-1, V)
            log_probs = F.log_softmax(logits, dim=-1)
            rows.append(-log_probs.gather(1, sequence[1:, None])[:, 0].numpy())
    return np.stack(rows)


def test_loss_entropy_and_excess_match_an_independent_computation(store, model):
    spec = resolve_data(DataConfig(path=store))
    result = evaluate(model, EvalSet(spec), step=7, batch_size=5, device=torch.device("cpu"))
    tokens = np.asarray(open_store(store).tokens("test")[:])
    losses = _independent_loss(model, tokens)
    entropy = rows_entropy(open_store(store), "test")  # forward algorithm, computed afresh
    assert result.n_sequences == N_TEST and result.step == 7
    assert result.loss == pytest.approx(losses.mean(), rel=1e-6)
    assert result.entropy == pytest.approx(entropy.mean(), rel=1e-9)
    assert result.excess == pytest.approx(losses.mean() - entropy.mean(), rel=1e-5)
    assert result.excess_bits == pytest.approx(result.excess / math.log(2))
    np.testing.assert_allclose(result.loss_per_position, losses.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(result.entropy_per_position, entropy.mean(axis=0), rtol=1e-9)
    assert result.entropy_method == "exact (manifest)"


def test_a_prefix_of_the_split_is_scored_against_the_entropy_of_that_prefix(store, model):
    spec = resolve_data(DataConfig(path=store))
    eval_set = EvalSet(spec, max_sequences=10)
    result = evaluate(model, eval_set, step=0, batch_size=4, device=torch.device("cpu"))
    tokens = np.asarray(open_store(store).tokens("test")[:10])
    assert result.n_sequences == 10
    assert result.loss == pytest.approx(_independent_loss(model, tokens).mean(), rel=1e-6)
    assert result.entropy == pytest.approx(rows_entropy(open_store(store), "test", 0, 10).mean())
    assert result.entropy_method == "exact (forward algorithm)"


def test_the_stored_per_token_entropy_is_used_when_present(store, model, tmp_path):
    copy = shutil.copytree(store, tmp_path / "with-entropy.zarr")
    write_split_entropy(open_store(copy, mode="r+"), "test", quiet=True)
    eval_set = EvalSet(resolve_data(DataConfig(path=copy)), max_sequences=20)
    curve, method = eval_set.entropy_per_position()
    assert method == "exact (stored per token)"
    expected = rows_entropy(open_store(store), "test", 0, 20).mean(axis=0)
    np.testing.assert_allclose(curve, expected, rtol=1e-6)  # stored as float32


def test_ranks_split_the_sequences_with_no_overlap_and_no_gap(store):
    spec = resolve_data(DataConfig(path=store))
    whole = EvalSet(spec)
    parts = [EvalSet(spec, rank=rank, world_size=3) for rank in range(3)]
    rows = np.concatenate([batch for part in parts for batch in part.batches(7)])
    np.testing.assert_array_equal(rows, np.concatenate(list(whole.batches(100))))
    sums = sum(part._entropy_sums()[0] for part in parts)
    np.testing.assert_allclose(sums, whole._entropy_sums()[0], rtol=1e-12)


def test_online_evaluation_reads_the_test_split_a_store_of_the_same_graph_holds(store, model):
    online = resolve_data(DataConfig(source="online", preset="debug", seed=SEED, seq_len=SEQ_LEN))
    eval_set = EvalSet(online, max_sequences=N_TEST)
    rows = np.concatenate(list(eval_set.batches(16)))
    np.testing.assert_array_equal(rows, open_store(store).tokens("test")[:])
    online_result = evaluate(model, eval_set, step=0, batch_size=16, device=torch.device("cpu"))
    stored = evaluate(
        model,
        EvalSet(resolve_data(DataConfig(path=store))),
        step=0,
        batch_size=16,
        device=torch.device("cpu"),
    )
    assert online_result.entropy == pytest.approx(stored.entropy, rel=1e-9)
    assert online_result.loss == pytest.approx(stored.loss, rel=1e-9)


def test_an_unknown_split_is_a_user_error(store):
    with pytest.raises(LlamaTrainError, match=r"eval.split='valid'.*train, test"):
        EvalSet(resolve_data(DataConfig(path=store)), split="valid")


def test_a_result_round_trips_through_its_dict():
    result = EvalResult(1, "test", 2, 1.5, 1.25, "exact", [2.0, 1.0], [1.5, 1.0])
    assert EvalResult.from_dict(result.to_dict()) == result
    assert result.metrics()["eval/excess"] == pytest.approx(0.25)


@pytest.fixture(scope="module")
def trained_run(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    config = resolve_config(
        None,
        [
            f"data.path={store}",
            "data.batch_size=8",
            "model.dim=16",
            "model.n_layers=1",
            "model.n_heads=2",
            "train.steps=4",
            "checkpoint.every=2",
            "checkpoint.keep=3",
            f"run.dir={run_dir}",
        ],
    )
    train(config, progress=False)
    return run_dir


@pytest.mark.integration
def test_a_saved_checkpoint_evaluates_to_the_runs_own_figures(trained_run):
    import json

    summary = json.loads((trained_run / "summary.json").read_text())
    result = evaluate_run(trained_run)
    assert result.step == 4
    assert result.loss == pytest.approx(summary["test_loss"], rel=1e-9)
    assert result.entropy == pytest.approx(summary["test_entropy"], rel=1e-12)
    earlier = evaluate_run(trained_run, checkpoint=2, max_sequences=8)
    assert (earlier.step, earlier.n_sequences) == (2, 8)


@pytest.mark.integration
def test_evaluating_on_another_compatible_store_works_and_an_incompatible_one_is_refused(
    trained_run, tmp_path
):
    shorter = _store(tmp_path / "short.zarr", seq_len=9)
    assert evaluate_run(trained_run, data=shorter).n_sequences == N_TEST
    other_vocab = _store(tmp_path / "hmm.zarr", preset="hmm", seq_len=9)
    with pytest.raises(LlamaTrainError, match=r"vocab_size 8 .* has 32 tokens"):
        evaluate_run(trained_run, data=other_vocab)
    with pytest.raises(LlamaTrainError, match=r"no checkpoint of step 3"):
        evaluate_run(trained_run, checkpoint=3)
