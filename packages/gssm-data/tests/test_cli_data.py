"""`gssm-data generate / info / verify / presets`: options, output, exit codes, messages."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gssm_data import generate as generate_module
from gssm_data.cli import app
from gssm_data.cli import data as data_cli
from gssm_data.generate import GenerateOptions, GenerateResult, available_cpus
from gssm_data.manifest import fingerprint
from gssm_data.presets import load_preset, preset_names
from gssm_data.store import open_store

runner = CliRunner()
SMALL = ["--preset", "debug", "--n", "200", "--n-test", "50", "--seq-len", "17", "--workers", "1"]


@pytest.fixture(autouse=True)
def few_entropy_sequences(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generate_module, "TRAIN_ENTROPY_SEQUENCES", 128)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "debug.zarr"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generate_module, "TRAIN_ENTROPY_SEQUENCES", 128)
        result = runner.invoke(app, ["generate", *SMALL, "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit 1, one line on stderr naming the problem, no traceback."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


class CapturedGenerate:
    """Stands in for `generate`: records the options the command built."""

    def __init__(self) -> None:
        self.options: GenerateOptions | None = None

    def __call__(self, options: GenerateOptions, **_: object) -> GenerateResult:
        self.options = options
        return GenerateResult(options.out, "complete", 1, 1, 0.0)


def test_generate_writes_under_datasets_and_prints_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["generate", *SMALL])
    assert result.exit_code == 0, result.output
    path = Path(result.stdout.strip())
    key = fingerprint(load_preset("debug"), 0, 17, 4096)
    assert path == tmp_path / "datasets" / f"debug-{key}-n200-t50.zarr"
    assert (path / "zarr.json").is_file()


def test_mode_slow_n_1e8_works_as_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    captured = CapturedGenerate()
    monkeypatch.setattr(data_cli, "generate", captured)
    result = runner.invoke(app, ["generate", "--mode", "slow", "--n", "1e8"])
    assert result.exit_code == 0, result.output
    options = captured.options
    assert options is not None
    assert (options.n_train, options.n_test, options.seq_len, options.seed) == (
        10**8, 10_000, 257, 0,
    )  # fmt: skip
    assert [node.mode for node in options.graph.latents] == ["slow"]
    assert options.graph == load_preset("hmm").with_mode("slow")
    assert options.name == "hmm-slow" and options.workers == available_cpus()
    key = fingerprint(options.graph, 0, 257, 4096)
    assert options.out == Path("datasets") / f"hmm-slow-{key}-n1e8-t1e4.zarr"
    assert result.stdout.strip() == str(tmp_path / options.out)


def test_counts_shards_and_flags_reach_the_options(monkeypatch: pytest.MonkeyPatch) -> None:
    captured = CapturedGenerate()
    monkeypatch.setattr(data_cli, "generate", captured)
    args = ["generate", "--preset", "base", "--n", "2.5M", "--n-test", "100_000", "--seed", "7"]
    args += ["--shard", "3/8", "--with-latents", "--workers", "3", "--out", "x.zarr"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    options = captured.options
    assert options is not None
    assert (options.n_train, options.n_test, options.seed) == (2_500_000, 100_000, 7)
    assert (options.shard.index, options.shard.count) == (3, 8)  # type: ignore[union-attr]
    assert options.with_latents and options.workers == 3 and options.out == Path("x.zarr")


def test_target_bits_generates_the_calibrated_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    captured = CapturedGenerate()
    monkeypatch.setattr(data_cli, "generate", captured)
    calls = []
    calibrated = load_preset("hmm").with_alpha(0.3, target="observed")

    def calibrate(graph, *, seed, seq_len, target_bits, target="latent", log=None):
        calls.append((graph, seed, seq_len, target_bits, target))
        return types.SimpleNamespace(
            graph=calibrated, alpha=0.3, achieved_bits=2.01, tolerance_bits=0.02
        )

    module = types.ModuleType("gssm_data.calibrate")
    module.calibrate = calibrate  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gssm_data.calibrate", module)
    args = ["generate", "--target-bits", "2", "--target", "observed", "--seq-len", "65"]
    result = runner.invoke(app, [*args, "--out", "x.zarr"])
    assert result.exit_code == 0, result.output
    assert calls == [(load_preset("hmm"), 0, 65, 2.0, "observed")]
    assert captured.options is not None and captured.options.graph == calibrated
    assert captured.options.name == "hmm-2bits"
    assert "2.0100 bits/token" in result.stderr


def test_info_json_has_the_manifest_fields(store: Path) -> None:
    result = runner.invoke(app, ["info", str(store), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["complete"] is True
    assert (info["seq_len"], info["vocab_size"], info["seed"]) == (17, 8, 0)
    assert info["splits"]["train"]["n"] == 200 and info["splits"]["test"]["n"] == 50
    assert info["graph"]["nodes"][1]["name"] == "X" and len(info["fingerprint"]) == 16
    assert info["splits"]["test"]["entropy"]["n_sequences"] == 50
    assert (info["format_version"], info["kernel_draw"]) == (2, "gamma-inverse-cdf")


def test_info_table_shows_fingerprint_and_entropy(store: Path) -> None:
    result = runner.invoke(app, ["info", str(store)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    info = json.loads(runner.invoke(app, ["info", str(store), "--json"]).stdout)
    assert info["fingerprint"] in result.stdout
    assert f"{info['splits']['test']['entropy']['bits_per_token']:.4f}" in result.stdout
    assert "exact" in result.stdout
    assert "gamma-inverse-cdf" in result.stdout


def test_info_shows_progress_of_an_interrupted_store(tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    result = runner.invoke(
        app, ["generate", *SMALL, "--n", "9000", "--shard", "0/2", "--out", str(out)]
    )
    assert result.exit_code == 0 and result.stdout == ""  # a shard that did not publish
    shown = runner.invoke(app, ["info", str(out)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "no (2/4 blocks written)" in shown.stdout


def test_verify_passes_a_sound_store(store: Path) -> None:
    result = runner.invoke(app, ["verify", str(store)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"ok: {store}")


def test_verify_fails_a_corrupted_store_with_one_line(store: Path, tmp_path: Path) -> None:
    import shutil

    copy = Path(shutil.copytree(store, tmp_path / "copy.zarr"))
    (copy / "train" / "tokens" / "c" / "0" / "0").write_bytes(b"junk")
    result = runner.invoke(app, ["verify", str(copy)])
    assert_one_line_error(result, "is damaged: block 0 of train: unreadable")


def test_verify_fails_an_incomplete_store(tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    runner.invoke(app, ["generate", *SMALL, "--shard", "0/2", "--out", str(out)])
    assert_one_line_error(runner.invoke(app, ["verify", str(out)]), "resume")


def test_presets_lists_every_preset() -> None:
    result = runner.invoke(app, ["presets"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in preset_names():
        assert name in result.stdout
    assert load_preset("hmm").description[:30] in result.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--preset", "debug", "--graph", "g.yaml"], "not both"),
        (["--graph", "missing.yaml"], "graph file missing.yaml not found"),
        (["--n", "lots"], "--n 'lots' is not a count"),
        (["--n-test", "1.5"], "--n-test '1.5' is not a whole number"),
        (["--shard", "4/4"], "--shard '4/4'"),
        (["--shard", "0/2", "--force"], "--force cannot be combined with --shard"),
        (["--mode", "fast"], "--mode 'fast'"),
        (["--seq-len", "1"], "--seq-len must be at least 2"),
        (["--target-bits", "2", "--target", "both"], "--target 'both'"),
    ],
)
def test_user_errors_are_one_line_and_exit_1(
    args: list[str], fragment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(runner.invoke(app, ["generate", *args]), fragment)


def test_an_existing_store_with_other_settings_needs_force(store: Path) -> None:
    result = runner.invoke(app, ["generate", *SMALL, "--n", "300", "--out", str(store)])
    assert_one_line_error(result, "already exists with other settings", "--force")


def test_the_console_script_prints_one_line_and_exits_1(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "gssm-data"
    for args, fragment in (
        (["generate", "--preset", "nope"], "unknown preset"),
        (["info", str(tmp_path / "none.zarr")], "no store at"),
    ):
        done = subprocess.run([script, *args], capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1 and fragment in done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.parametrize("value", ["nan", "0", "-1"])
def test_a_bad_entropy_standard_error_is_a_one_line_error(tmp_path: Path, value: str) -> None:
    out = tmp_path / "x.zarr"
    result = runner.invoke(
        app, ["generate", *SMALL, "--out", str(out), "--entropy-stderr-bits", value, "-q"]
    )
    assert_one_line_error(result, "--entropy-stderr-bits")
    assert not out.exists()


def test_the_same_spec_measured_to_a_standard_error_gives_the_same_manifest(
    tmp_path: Path,
) -> None:
    manifests = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.zarr"
        args = ["generate", *SMALL, "--n-test", "400", "--out", str(out), "-q"]
        result = runner.invoke(app, [*args, "--entropy-stderr-bits", "0.01"])
        assert result.exit_code == 0, result.output
        manifests.append(open_store(out).manifest.model_dump(exclude={"created_at"}))
    assert manifests[0] == manifests[1]
    test = manifests[0]["splits"]["test"]["entropy"]
    assert test["target_stderr_bits"] == 0.01 and test["n_sequences"] <= 400


def test_a_user_error_reaching_main_is_printed_as_text_not_markup(monkeypatch, capsys):
    """`[slurm]` in an error is part of the message (rich would swallow it as a tag)."""
    import gssm_data.cli as cli
    from gssm_data.errors import GssmDataError

    def refuse() -> None:
        raise GssmDataError("submitting needs submitit: pip install 'gssm-data[slurm]'")

    monkeypatch.setattr(cli, "app", refuse)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "pip install 'gssm-data[slurm]'" in err
    assert len(err.strip().splitlines()) == 1
