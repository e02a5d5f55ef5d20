"""`llama-train probe`: linear probes of the hidden state against the exact Bayes filter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gssm_data.generate import GenerateOptions, generate
from gssm_data.presets import load_preset
from llama_train.cli import app
from llama_train.cli.probe import probe_table
from llama_train.core import linear_probe
from llama_train.recipe.probe import ProbeOptions, parse_layers, probe_rows, probe_run
from llama_train.recipe.train import train
from llama_train.recipe.train_config import resolve_config

SEQ_LEN = 17


def _store(out: Path, *, with_latents: bool) -> Path:
    generate(
        GenerateOptions(
            graph=load_preset("debug"),  # one latent Z1 (4 states), 8 tokens
            name="debug",
            out=out,
            n_train=512,
            n_test=96,
            seq_len=SEQ_LEN,
            seed=1,  # a store where the latent is far from predictable by position alone
            block_size=128,
            with_latents=with_latents,
        )
    )
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("stores")
    return {
        "latents": _store(folder / "latents.zarr", with_latents=True),
        "plain": _store(folder / "plain.zarr", with_latents=False),
    }


@pytest.fixture(scope="module")
def run_dir(stores: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "tiny"
    config = resolve_config(
        None,
        [
            f"data.path={stores['latents']}",
            "data.batch_size=16",
            "model.dim=16",
            "model.n_layers=1",
            "model.n_heads=2",
            "optim.lr=3e-3",
            "optim.warmup_steps=10",
            "train.steps=120",
            "train.threads=1",
            "eval.every=120",
            "eval.max_sequences=16",
            "checkpoint.every=120",
            f"run.dir={run}",
        ],
    )
    train(config, progress=False)
    return run


def test_rows_are_split_by_whole_sequences() -> None:
    positions = np.array([1, 4, 7, 9])
    rows = probe_rows(24, positions, folds=3, seed=5)
    train_sequences = set(rows.sequence[rows.is_train].tolist())
    test_sequences = set(rows.sequence[~rows.is_train].tolist())
    assert not train_sequences & test_sequences
    assert train_sequences | test_sequences == set(range(24))
    assert len(test_sequences) == rows.test_sequences == 6
    # Every position of a sequence is on one side, and in one fold.
    for sequence in range(24):
        mine = rows.sequence == sequence
        assert len(set(rows.is_train[mine].tolist())) == 1
        assert sorted(rows.position[mine].tolist()) == positions.tolist()
    train_rows = np.flatnonzero(rows.is_train)
    for sequence in train_sequences:
        assert len(set(rows.fold[rows.sequence[train_rows] == sequence].tolist())) == 1
    assert set(rows.fold.tolist()) == {0, 1, 2}
    # The shuffled control reads other training rows, at the same position.
    assert rows.is_train[rows.donor].all()
    np.testing.assert_array_equal(rows.position[rows.donor], rows.position[train_rows])
    assert (rows.sequence[rows.donor] != rows.sequence[train_rows]).mean() > 0.5
    again = probe_rows(24, positions, folds=3, seed=5)
    np.testing.assert_array_equal(again.is_train, rows.is_train)


def test_softmax_probe_recovers_a_linear_rule_and_cv_prefers_little_penalty() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(600, 5, generator=generator)
    labels = (x @ torch.randn(5, 3, generator=generator)).argmax(dim=1)
    targets = torch.nn.functional.one_hot(labels, 3).float()
    folds = np.arange(600) % 3
    penalty, scores = linear_probe.cross_validate(x, targets, folds)
    assert penalty == min(scores, key=scores.get)
    assert penalty < max(linear_probe.PENALTIES)
    probe = linear_probe.fit(x[:400], targets[:400], penalty)
    assert linear_probe.accuracy(probe.log_probs(x[400:]), labels[400:]) > 0.9
    # R^2 and KL of a perfect prediction, against independent formulas.
    beliefs = torch.softmax(torch.randn(50, 3, generator=generator), dim=1)
    assert linear_probe.r_squared(beliefs, beliefs) == 1.0
    assert linear_probe.kl_divergence(beliefs.log(), beliefs) == pytest.approx(0.0, abs=1e-6)
    uniform = torch.full_like(beliefs, 1 / 3).log()
    expected_kl = float((beliefs * (beliefs.log() + np.log(3))).sum(dim=1).mean())
    assert linear_probe.kl_divergence(uniform, beliefs) == pytest.approx(expected_kl, rel=1e-5)


@pytest.fixture(scope="module")
def report(run_dir: Path) -> dict:
    return probe_run(run_dir, ProbeOptions(sequences=48, positions=6, device="cpu"))


@pytest.mark.integration
def test_probe_of_a_trained_model_beats_shuffled_labels_and_stays_under_the_bayes_filter(
    report: dict,
) -> None:
    node = report["nodes"]["Z1"]
    assert [layer["layer"] for layer in node["layers"]] == [
        "embedding",
        "block 1",
        "final norm",
        "all layers (concatenated)",
    ]
    bayes = node["bayes"]["accuracy"]
    assert node["position_baseline"]["accuracy"] < bayes
    for layer in node["layers"]:
        trained = layer["trained"]
        assert trained["accuracy"] > trained["shuffled_accuracy"] + 0.1
        assert trained["r2"] > trained["shuffled_r2"] + 0.1
        # The Bayes filter is the best possible classifier (up to sampling noise).
        assert trained["accuracy"] <= bayes + 0.03
        assert trained["cross_entropy"] >= node["bayes"]["cross_entropy"] - 0.05
    assert Path(report["plot"]).stat().st_size > 0
    saved = json.loads(Path(report["report"]).read_text())
    assert saved["nodes"]["Z1"]["bayes"] == node["bayes"]
    assert saved["train_sequences"] + saved["test_sequences"] == 48


@pytest.mark.integration
def test_the_bayes_ceiling_is_the_posteriors_own_accuracy(report: dict, stores) -> None:
    """Independently: argmax of p(z_t | x_<=t) against the stored latents, same rows."""
    from gssm_data.posterior import split_posterior
    from gssm_data.store import open_store

    store = open_store(stores["latents"])
    positions = np.array(report["position_list"])
    rows = probe_rows(48, positions, folds=3, seed=0)
    test = sorted(set(rows.sequence[~rows.is_train].tolist()))
    posterior = split_posterior(store, "test", 0, 48, device="cpu").marginals["Z1"]
    truth = np.asarray(store.latents("test", "Z1")[:48])
    hits = posterior[test][:, positions].argmax(axis=-1) == truth[test][:, positions]
    assert report["nodes"]["Z1"]["bayes"]["accuracy"] == pytest.approx(hits.mean())


@pytest.mark.integration
def test_the_table_shows_every_layer_with_the_ceiling_and_floor(report: dict) -> None:
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(probe_table(report, "Z1", report["nodes"]["Z1"]))
    text = console.export_text()
    assert "Bayes filter" in text and "position only" in text
    accuracy = report["nodes"]["Z1"]["layers"][1]["trained"]["accuracy"]
    assert f"{accuracy:.3f}" in text


def _cli(*arguments: str) -> object:
    return CliRunner().invoke(app, ["probe", *arguments, "--device", "cpu"])


@pytest.mark.integration
def test_cli_prints_the_report_as_json(run_dir: Path) -> None:
    result = _cli(str(run_dir), "--sequences", "24", "--positions", "4", "--layers", "1", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [layer["layer"] for layer in report["nodes"]["Z1"]["layers"]] == ["block 1"]
    assert report["positions"] == 4 and report["sequences"] == 24


@pytest.mark.integration
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--node", "Z9"], "'Z9' is not a latent node"),
        (["--node", "X"], "'X' is not a latent node"),
        (["--layers", "0,3"], "--layers '0,3': give `all` or indices 0 .. 2"),
        (["--layers", "one"], "--layers 'one'"),
        (["--sequences", "4"], "too few to probe with 3 folds"),
    ],
)
def test_bad_options_are_one_line_errors(run_dir: Path, arguments: list[str], message: str):
    result = _cli(str(run_dir), *arguments)
    assert result.exit_code == 1
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.integration
def test_a_store_without_latents_is_a_one_line_error(run_dir: Path, stores) -> None:
    result = _cli(str(run_dir), "--data", str(stores["plain"]))
    assert result.exit_code == 1
    assert "has no latents to probe for" in result.output
    assert "--with-latents" in result.output


def test_layer_lists() -> None:
    assert parse_layers("all", 2) == [0, 1, 2, 3]
    assert parse_layers("3, 0,0", 2) == [0, 3]


@pytest.mark.integration
def test_probe_uses_training_s_threads_and_announces_every_fit_before_it_starts(
    run_dir: Path, monkeypatch
) -> None:
    """The run sets train.threads=1: every fit runs on one thread, whatever the caller
    had, and the caller's setting is back afterwards. The announced plan lists exactly
    the fits that are made (rows, features, states), and comes before the first one."""
    from llama_train.recipe import probe as probe_module

    events: list[tuple] = []
    real_fit, real_plan = linear_probe.fit, probe_module.planned_fits

    def fit(features, targets, penalty, **kwargs):
        events.append(("fit", torch.get_num_threads(), tuple(features.shape), targets.shape[1]))
        return real_fit(features, targets, penalty, **kwargs)

    planned: list = []

    def plan(*args):
        planned.extend(real_plan(*args))
        return planned

    monkeypatch.setattr(linear_probe, "fit", fit)
    monkeypatch.setattr(probe_module, "planned_fits", plan)
    torch.set_num_threads(2)
    probe_run(
        run_dir,
        ProbeOptions(sequences=24, positions=4, layers="1", device="cpu"),
        announce=lambda line: events.append(("announce", line)),
    )
    assert torch.get_num_threads() == 2
    assert events[0][0] == "announce" and [e[0] for e in events[1:]] == ["fit"] * len(planned)
    line = events[0][1]
    assert f"({len(planned)} fits)" in line and "1 thread " in line and "about" in line
    assert {e[1] for e in events[1:]} == {1}
    made = sorted((e[2][0], e[2][1], e[3]) for e in events[1:])
    assert made == sorted((f.rows, f.features, f.states) for f in planned)


def test_the_time_estimate_scales_the_timed_evaluation_by_rows_and_iterations(monkeypatch):
    from llama_train.recipe.probe import FitSize, estimate_seconds

    monkeypatch.setattr(linear_probe, "evaluation_seconds", lambda rows, d, c, device: rows * d)
    fits = [FitSize(100, 16, 4), FitSize(50, 16, 4), FitSize(100, 32, 4)]
    iterations = linear_probe.MAX_ITERATIONS * linear_probe.EVALUATIONS_PER_ITERATION
    expected = iterations * (100 * 16 + 50 * 16 + 100 * 32)
    assert estimate_seconds(fits, torch.device("cpu")) == pytest.approx(expected)


@pytest.mark.integration
def test_the_cli_says_how_long_probing_takes_and_refuses_absurd_threads(run_dir: Path) -> None:
    result = _cli(str(run_dir), "--sequences", "24", "--positions", "4", "--layers", "1")
    assert result.exit_code == 0, result.output
    assert "fits) on cpu with" in result.stderr and "at the current load" in result.stderr
    refused = _cli(str(run_dir), "--threads", "100000")
    assert refused.exit_code == 1 and len(refused.output.strip().splitlines()) == 1
    assert "--threads must be 1.." in refused.output
