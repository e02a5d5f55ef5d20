"""No value reaches the sbatch script submitit writes with a control character in it.

A newline inside a quoted `#SBATCH` value ends the directive and starts a shell
command; the submit commands refuse such values in one line naming the option,
before writing the script, the options or queueing anything. Slurm is the
stand-in of conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from gssm_data.cli import app
from gssm_data.errors import GssmDataError
from gssm_data.preflight import check_script_value
from gssm_data.slurm import SlurmSettings, submit_scaling

runner = CliRunner()
BASE = ["submit", "--tasks", "2", "--preset", "debug", "--n", "1000", "--n-test", "100"]


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--partition", "cpu\n#SBATCH --wrap=touch pwned"),
        ("--partition", "cpu\rtouch pwned"),
        ("--mem", "8G\necho pwned"),
        ("--account", "lab\x00x"),
        ("--time", "1:00:00\n"),
        ("--account", "lab\u2028x"),
        ("--out", "store\n.zarr"),
    ],
)
def test_submit_refuses_control_characters_and_writes_nothing(
    option: str, value: str, tmp_path: Path, fake_slurm, monkeypatch: pytest.MonkeyPatch
) -> None:
    slurm = fake_slurm()
    monkeypatch.chdir(tmp_path)
    if option == "--out":
        value = str(tmp_path / value)
    result = runner.invoke(app, [*BASE, option, value])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and option in lines[0] and "control character" in lines[0]
    assert "Traceback" not in result.output
    assert slurm.calls() == [], "sbatch was called"
    assert not list(tmp_path.rglob("*.slurm")) and not list(tmp_path.rglob("*.pkl"))


def test_a_graph_file_name_with_a_newline_never_reaches_the_job_name(
    tmp_path: Path, fake_slurm, monkeypatch: pytest.MonkeyPatch
) -> None:
    slurm = fake_slurm()
    monkeypatch.chdir(tmp_path)
    graph = tmp_path / "g\nrm -rf x.yaml"
    graph.write_text(
        "nodes:\n  - {name: Z, states: 2, alpha: 0.5}\n"
        "  - {name: X, states: 3, alpha: 0.5, parents: [Z], observed: true}\n"
    )
    result = runner.invoke(
        app, ["submit", "--graph", str(graph), "--n", "100", "--out", str(tmp_path / "ok.zarr")]
    )
    assert result.exit_code == 1, result.output
    assert "job name" in result.stderr and "control character" in result.stderr
    assert slurm.calls() == []


def test_every_kind_of_control_character_is_refused_and_printable_text_is_kept() -> None:
    for bad in ["a\nb", "a\rb", "a\x00b", "a\tb", "a\x1bb", "a\x7fb", "a\x85b", "a\u2029b"]:
        with pytest.raises(GssmDataError, match=r"--partition .* control character"):
            check_script_value("--partition", bad)
    for good in ["gpu", "my-lab_01", "1-00:00:00", "/scratch/ü/data.zarr", "a b"]:
        assert check_script_value("--partition", good) == good


def test_more_sbatch_options_and_the_recipe_job_are_checked(tmp_path: Path, fake_slurm) -> None:
    slurm = fake_slurm()
    with pytest.raises(GssmDataError, match="sbatch option"):
        SlurmSettings(additional={"qos": "high\necho pwned"}).executor_parameters(job_name="x")
    recipe = tmp_path / "r.yaml"
    for path, scale, option in [
        (recipe, "small\nx", "--scale"),
        (tmp_path / "r\n.yaml", "small", "recipe name"),
    ]:
        with pytest.raises(GssmDataError, match=option):
            submit_scaling(path, scale=scale, out_dir=tmp_path, tasks=2, settings=SlurmSettings())
    assert slurm.calls() == []


def test_a_clean_submission_still_writes_its_script(
    tmp_path: Path, fake_slurm, monkeypatch: pytest.MonkeyPatch
) -> None:
    slurm = fake_slurm()
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "s.zarr"
    result = runner.invoke(app, [*BASE, "--partition", "cpu", "--mem", "8G", "--out", str(out)])
    assert result.exit_code == 0, result.output
    [call] = slurm.calls()
    assert "#SBATCH --partition=cpu" in call["script"] and "#SBATCH --mem=8G" in call["script"]
