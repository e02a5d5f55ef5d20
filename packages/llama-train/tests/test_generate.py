"""`llama-train generate`: samples scored under the true process, checked independently;
prompt files; reproducibility; one-line errors."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from gssm_data.entropy import sequence_entropy
from gssm_data.graph import parse_graph
from gssm_data.kernels import draw_kernels
from gssm_data.store import open_store
from llama_train.cli import app
from llama_train.core.data import DataSpec
from llama_train.errors import LlamaTrainError
from llama_train.recipe.generate import generate_run, read_prompts, true_nll

runner = CliRunner()
SEQ_LEN = 12  # the sequence length of the shared tiny run (conftest)


def brute_force_nll(graph, tables, tokens: np.ndarray) -> np.ndarray:
    """-log p(x_t | x_<t) by summing over every latent path (graph Z1 -> Z2 -> X only).

    p(x_1..x_t) = sum over paths of prod_s P(z1_s | z1_{s-1}) P(z2_s | z2_{s-1}, z1_s)
    P(x_s | z2_s), every node in state 0 at s = 0.
    """
    z1, z2, x = tables["Z1"], tables["Z2"], tables["X"]
    states = [(a, b) for a in range(z1.shape[0]) for b in range(z2.shape[0])]
    prefix = [1.0]
    for t in range(1, len(tokens)):
        total = 0.0
        for path in itertools.product(states, repeat=t):
            p, previous = 1.0, (0, 0)
            for s, (a, b) in enumerate(path, start=1):
                p *= z1[previous[0], a] * z2[previous[1], a, b] * x[b, tokens[s]]
                previous = (a, b)
            total += p
        prefix.append(total)
    return -np.log(np.array(prefix[1:]) / np.array(prefix[:-1]))


def test_true_nll_equals_a_brute_force_sum_over_latent_paths():
    graph = parse_graph(
        {
            "nodes": [
                {"name": "Z1", "states": 2, "alpha": 0.5},
                {"name": "Z2", "states": 2, "alpha": 0.5, "parents": ["Z1"]},
                {"name": "X", "states": 3, "alpha": 0.5, "parents": ["Z2"], "observed": True},
            ]
        }
    )
    spec = DataSpec(source="online", vocab_size=3, seq_len=6, graph=graph, seed=7)
    tables = draw_kernels(graph, 7)
    sequences = [np.array([0, 2, 1, 1, 0]), np.array([0, 1]), np.array([0, 0, 2, 2, 1])]
    scored = true_nll(spec, sequences, test_rows=False)
    for sequence, nats in zip(sequences, scored, strict=True):
        np.testing.assert_allclose(nats, brute_force_nll(graph, tables, sequence), rtol=1e-10)


@pytest.fixture(scope="module")
def run_dir(tiny_run) -> Path:
    """The session's finished 2-step run (conftest), on sequences of SEQ_LEN tokens."""
    return tiny_run.run_dir


@pytest.mark.integration
def test_samples_are_scored_against_the_store_s_graph_and_entropy_curve(run_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\n0\n\n0 3 5 1\n")
    result = generate_run(run_dir, n=5, max_new_tokens=6, prompts_file=prompts, seed=1)
    store = open_store(resolve_config_path(run_dir))
    curve = np.array(store.entropy("test").per_position)
    assert [s.prompt_length for s in result.samples] == [1, 4, 1, 4, 1]
    for sample in result.samples:
        tokens = np.array(sample.tokens)
        assert len(tokens) == sample.prompt_length + 6
        nats = sequence_entropy(store.graph, store.conditionals(), tokens[None])[0]
        start = sample.prompt_length - 1
        assert sample.true_nll == pytest.approx(nats[start:].mean(), rel=1e-12)
        assert sample.data_entropy == pytest.approx(curve[start : start + 6].mean(), rel=1e-12)
    assert result.true_nll == pytest.approx(np.mean([s.true_nll for s in result.samples]))
    assert result.samples[1].tokens[:4] == [0, 3, 5, 1]


def resolve_config_path(run_dir: Path) -> Path:
    from llama_train.recipe.train_config import read_run_config

    return read_run_config(run_dir).data.path


@pytest.mark.integration
def test_samples_depend_on_the_seed_not_on_the_batch_size(run_dir):
    small = generate_run(run_dir, n=6, max_new_tokens=5, seed=3, batch_size=4)
    large = generate_run(run_dir, n=6, max_new_tokens=5, seed=3, batch_size=64)
    assert [s.tokens for s in small.samples] == [s.tokens for s in large.samples]
    other = generate_run(run_dir, n=6, max_new_tokens=5, seed=4)
    assert [s.tokens for s in other.samples] != [s.tokens for s in small.samples]


@pytest.mark.integration
def test_from_test_continues_the_test_sequences_up_to_the_data_s_length(run_dir):
    result = generate_run(run_dir, n=3, from_test=4, temperature=0)
    test_rows = np.asarray(open_store(resolve_config_path(run_dir)).tokens("test")[:3])
    for row, sample in zip(test_rows, result.samples, strict=True):
        assert sample.tokens[:4] == row[:4].tolist()
        assert len(sample.tokens) == SEQ_LEN  # default: as long as the data's sequences
    assert result.data_entropy is not None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0 1 x\n", r"line 1: '0 1 x' is not a list of integer token ids"),
        ("0 1\n0 9\n", r"line 2: token 9 is outside the vocabulary 0..7"),
        ("0 -1\n", r"token -1 is outside the vocabulary"),
        ("3 1\n", r"line 1: a prompt starts with the start token 0"),
        ("# nothing\n\n", r"holds no prompt"),
        ("0 100000000000000000000000\n", r"token 100000000000000000000000 is outside"),
        ("0 " + "9" * 40 + "\n", r"token 999999999999\.\.\. \(40 digits\) is outside"),
        ("0 1e23\n", r"'0 1e23' is not a list of integer token ids"),
    ],
)
def test_bad_prompt_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "p.txt"
    path.write_text(text)
    with pytest.raises(LlamaTrainError, match=message):
        read_prompts(path, vocab_size=8)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--max-new-tokens", "40"], r"needs 40 positions; the model has model.max_seq_len=12"),
        (["--temperature", "nan"], "temperature must be a finite number >= 0"),
        (["--prompts", "missing.txt"], "prompt file missing.txt not found"),
        (["--prompts", "/dev/zero"], "prompt file /dev/zero is not a regular file"),
        (["--prompts", "."], "prompt file . is a directory, not a prompt file"),
        (["--seed", "-1"], "--seed must be >= 0, got -1"),
        (["--from-test", "3", "--n", "99"], "the test split has only 16 sequences"),
        (["--device", "tpu"], "--device 'tpu': choose auto, cpu or cuda"),
    ],
)
def test_cli_user_errors_are_one_line_and_exit_1(run_dir, arguments, message):
    result = runner.invoke(app, ["generate", str(run_dir), *arguments])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in " ".join(result.output.split()), result.output


def test_a_prompt_file_is_read_with_bounded_memory(tmp_path, monkeypatch):
    """A file over the limit is refused by its size, before a byte of it is read."""
    import llama_train.recipe.generate as generate_module

    monkeypatch.setattr(generate_module, "MAX_PROMPT_BYTES", 100)
    big = tmp_path / "big.txt"
    big.write_text("0 1 2 3\n" * 20)  # 160 bytes
    with pytest.raises(LlamaTrainError, match="larger than the 100-byte limit for a prompt file"):
        read_prompts(big, vocab_size=8)
    (tmp_path / "bad.txt").write_bytes(b"0 1\n\xff\n")
    with pytest.raises(LlamaTrainError, match="not UTF-8 text"):
        read_prompts(tmp_path / "bad.txt", vocab_size=8)


@pytest.mark.integration
def test_cli_prints_the_table_json_and_writes_samples_in_the_prompt_format(run_dir, tmp_path):
    out = tmp_path / "samples.txt"
    shown = runner.invoke(app, ["generate", str(run_dir), "--n", "3", "--out", str(out)])
    assert shown.exit_code == 0, shown.output
    assert "true NLL of the samples" in shown.output and "entropy" in shown.output
    as_json = runner.invoke(app, ["generate", str(run_dir), "--n", "3", "--json"])
    data = json.loads(as_json.output)
    assert data["n"] == 3 and len(data["samples"]) == 3
    assert set(data["summary"]) >= {"true_nll", "data_entropy", "model_nll", "true_nll_bits"}
    written = read_prompts(out, vocab_size=8)  # samples are valid prompts
    assert [row.tolist() for row in written.rows] == [s["tokens"] for s in data["samples"]]


def test_a_transition_graph_scores_test_continuations_under_each_row_s_kernel(tmp_path):
    """Scoring the stored test rows themselves must give the store's own exact figures."""
    from gssm_data.entropy import rows_entropy
    from gssm_data.generate import GenerateOptions, generate
    from gssm_data.presets import load_preset
    from llama_train.core.data import DataConfig, resolve_data

    out = tmp_path / "transition.zarr"
    graph = load_preset("debug").with_mode("transition")
    options = GenerateOptions(
        graph=graph, name="debug", out=out, n_train=8, n_test=70, seq_len=6, block_size=32
    )
    generate(options)
    spec = resolve_data(DataConfig(path=out))
    rows = list(np.asarray(spec.store.tokens("test")[:70]).astype(np.int64))
    scored = true_nll(spec, rows, test_rows=True)
    np.testing.assert_allclose(np.stack(scored), rows_entropy(spec.store, "test", 0, 70))
    with pytest.raises(LlamaTrainError, match="use --from-test K"):
        true_nll(spec, rows, test_rows=False)


def _independent_log_probs(logits: np.ndarray, temperature: float, top_k: int | None):
    """log q'(token | prefix) (..., V) of a sampler, from the model's raw logits, in numpy:
    divided by the temperature, all but the k largest set to -inf, log-normalised."""
    scaled = logits.astype(np.float64) / temperature
    if top_k is not None:
        kth = np.sort(scaled, axis=-1)[..., -top_k][..., None]
        scaled = np.where(scaled >= kth, scaled, -np.inf)
    top = scaled.max(axis=-1, keepdims=True)
    return scaled - top - np.log(np.exp(scaled - top).sum(axis=-1, keepdims=True))


def _full_logits(run_dir: Path, sequences: np.ndarray) -> np.ndarray:
    """The model's logits for whole sequences in one forward pass (no cache, no sampler)."""
    import torch

    from llama_train.recipe.loading import load_model

    model, _ = load_model(run_dir)
    with torch.no_grad():
        return model(torch.from_numpy(sequences)).logits.double().numpy()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("temperature", "top_k"), [(1.0, None), (0.6, None), (0.8, 3), (0.0, None)]
)
def test_each_sample_is_scored_under_the_law_that_drew_it(run_dir, temperature, top_k):
    result = generate_run(
        run_dir, n=6, max_new_tokens=5, temperature=temperature, top_k=top_k, seed=2
    )
    tokens = np.array([s.tokens for s in result.samples])  # (6, 6): prompt 0 + 5 new
    logits = _full_logits(run_dir, tokens)[:, :-1]  # predictions of tokens 1..5
    chosen = tokens[:, 1:, None]
    model = -np.take_along_axis(_independent_log_probs(logits, 1.0, None), chosen, -1)[..., 0]
    for sample, row in zip(result.samples, model, strict=True):
        assert sample.model_nll == pytest.approx(row.mean(), abs=1e-5)
    if temperature == 0:  # a point mass: each token had probability 1 under the sampler
        assert all(s.sampler_nll == 0 for s in result.samples)
        assert result.summary()["sampler_kl"] == pytest.approx(result.true_nll, rel=1e-12)
        return
    law = _independent_log_probs(logits, temperature, top_k)
    sampler = -np.take_along_axis(law, chosen, -1)[..., 0]
    for sample, row in zip(result.samples, sampler, strict=True):
        assert sample.sampler_nll == pytest.approx(row.mean(), abs=1e-5)


@pytest.mark.integration
@pytest.mark.parametrize(("temperature", "top_k"), [(0.5, 2), (0.05, None), (1.0, 3)])
def test_the_printed_kl_is_the_exact_kl_of_the_sampler_from_the_process(
    run_dir, temperature, top_k
):
    """Against KL(q' || p) summed exactly over all 8^3 continuations of the prompt 0.

    q'(x) is the product of the sampler's per-step laws (numpy, from whole-sequence
    logits), p(x) the process's likelihood (forward algorithm, checked against a
    brute-force sum above). The figure printed before, true NLL - model NLL at
    temperature 1, has another expectation, far outside the estimate's error here.
    """
    new = 3
    continuations = np.array(list(itertools.product(range(8), repeat=new)))
    sequences = np.concatenate([np.zeros((len(continuations), 1), np.int64), continuations], 1)
    logits = _full_logits(run_dir, sequences)[:, :-1]

    def log_law(temperature: float, top_k: int | None) -> np.ndarray:
        log_probs = _independent_log_probs(logits, temperature, top_k)
        return np.take_along_axis(log_probs, sequences[:, 1:, None], -1)[..., 0].sum(axis=1)

    log_q, log_model = log_law(temperature, top_k), log_law(1.0, None)
    store = open_store(resolve_config_path(run_dir))
    log_p = -sequence_entropy(store.graph, store.conditionals(), sequences).sum(axis=1)
    q = np.exp(log_q)
    drawn = q > 0
    assert q.sum() == pytest.approx(1.0, abs=1e-9)
    exact = float(np.sum(q[drawn] * (log_q[drawn] - log_p[drawn]))) / new
    temperature_one = float(np.sum(q[drawn] * (log_model[drawn] - log_p[drawn]))) / new

    result = generate_run(
        run_dir, n=2000, max_new_tokens=new, temperature=temperature, top_k=top_k, seed=5
    )
    figures = result.summary()
    stderr = figures["sampler_kl_stderr"]
    assert 0 < stderr < 0.05
    assert abs(figures["sampler_kl"] - exact) < 4 * stderr, (figures["sampler_kl"], exact)
    assert abs(temperature_one - exact) > 10 * stderr  # so the check above can fail


def test_a_log_file_gets_progress_lines_not_a_bar(run_dir, monkeypatch):
    """Off a terminal (a Slurm log), progress is timestamped lines on stderr; stdout stays JSON."""
    monkeypatch.setenv("GSSM_PROGRESS_EVERY", "1e-9")  # a line at every update
    result = runner.invoke(app, ["generate", str(run_dir), "--n", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n"] == 3
    lines = result.stderr.splitlines()
    assert lines and all("generating" in line for line in lines), lines
    assert lines[-1].split()[-2] == "3/3"  # the last line says where it ended
    assert "\r" not in result.stderr and "\x1b" not in result.stderr
