"""`llama-train wandb-sync`: run directories replayed into wandb, offline, without duplicates."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from llama_train.analysis.wandb_sync import history, run_id_for, sync_run
from llama_train.cli import app

runner = CliRunner()


def _line(step: int, **values: Any) -> str:
    return json.dumps({"step": step, **values}) + "\n"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A sweep point's run directory as training leaves it, resumed once at step 2."""
    run = tmp_path / "sweep" / "optim.lr=0.001"
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text(
        yaml.safe_dump({"run": {"name": "sweep/optim.lr=0.001"}, "optim": {"lr": 0.001}})
    )
    (run / "metrics.jsonl").write_text(
        _line(1, loss=3.0, hostname="a")
        + _line(2, loss=2.5)
        + _line(3, loss=9.9)  # a first session's step 3, replayed after the resume
        + _line(3, loss=2.2)
        + _line(4, loss=2.0, tokens_per_s=100.0)
        + _line(4, **{"eval/loss": 2.1, "eval/excess": 0.3})
    )
    (run / "profile.csv").write_text(
        "step,wall_s,tokens_per_s,mfu,hostname\n2,0.5,80,,a\n4,0.25,120,,a\n"
    )
    (run / "summary.json").write_text(
        json.dumps(
            {"step": 4, "test_loss": 2.1, "parameters_total": 4400, "store_fingerprint": "abc123"}
        )
    )
    (run / "eval" / "step_000004.json").write_text("{}")
    return run


class FakeRun:
    """Records what wandb-sync sends (the wandb API boundary)."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.id = settings["id"]
        self.step = 0
        self.logged: list[tuple[int, dict]] = []
        self.summary: dict[str, Any] = {}
        self.saved: list[str] = []

    def log(self, values: dict, step: int) -> None:
        self.logged.append((step, values))

    def save(self, path: str, base_path: str, policy: str) -> None:
        self.saved.append(str(Path(path).relative_to(base_path)))

    def finish(self) -> None:
        pass


@pytest.fixture
def fake_wandb(monkeypatch: pytest.MonkeyPatch) -> list[FakeRun]:
    import wandb

    runs: list[FakeRun] = []

    def init(**settings: Any) -> FakeRun:
        runs.append(FakeRun(**settings))
        return runs[-1]

    monkeypatch.setattr(wandb, "init", init)
    return runs


def test_history_merges_steps_keeps_the_latest_segment_and_sorts(run_dir: Path) -> None:
    lines = history(run_dir)
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert lines[2]["loss"] == 2.2  # the resumed session's value
    assert lines[3] == {
        "step": 4,
        "loss": 2.0,
        "tokens_per_s": 100.0,
        "eval/loss": 2.1,
        "eval/excess": 0.3,
        "profile/wall_s": 0.25,
        "profile/tokens_per_s": 120.0,
    }
    assert "hostname" not in lines[0]


def test_sync_sends_each_step_once_under_a_fixed_id_and_a_point_name(
    run_dir: Path, fake_wandb: list[FakeRun]
) -> None:
    first = sync_run(run_dir, mode="offline")
    [run] = fake_wandb
    expected_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]
    assert first.run_id == run.id == expected_id == run_id_for(run_dir)
    assert run.settings["resume"] == "allow" and run.settings["mode"] == "offline"
    assert (run.settings["name"], run.settings["group"]) == ("optim.lr=0.001", "sweep")
    assert run.settings["config"]["parameters_total"] == 4400
    assert run.settings["config"]["store_fingerprint"] == "abc123"
    assert run.settings["config"]["optim"] == {"lr": 0.001}
    assert [step for step, _ in run.logged] == [1, 2, 3, 4]
    assert run.summary["test_loss"] == 2.1
    assert sorted(run.saved) == sorted(
        ["config.yaml", "summary.json", "profile.csv", "eval/step_000004.json"]
    )

    again = sync_run(run_dir, mode="offline")
    assert again.steps_sent == 0 and fake_wandb[1].logged == []
    assert fake_wandb[1].id == expected_id

    with (run_dir / "metrics.jsonl").open("a") as file:  # the run went on
        file.write(_line(5, loss=1.9))
    later = sync_run(run_dir, mode="offline")
    assert [step for step, _ in fake_wandb[2].logged] == [5] and later.last_step == 5
    sync_run(run_dir, mode="online")  # another target: everything once
    assert [step for step, _ in fake_wandb[3].logged] == [1, 2, 3, 4, 5]


def test_a_live_runs_id_is_reused(run_dir: Path, fake_wandb: list[FakeRun]) -> None:
    (run_dir / "wandb_run_id").write_text("live1234\n")
    assert sync_run(run_dir).run_id == "live1234" == fake_wandb[0].id


def test_the_command_syncs_a_sweep_folder_with_real_offline_wandb(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-home").mkdir()
    result = runner.invoke(app, ["wandb-sync", str(run_dir.parent)])
    assert result.exit_code == 0, result.output
    run_id = run_id_for(run_dir)
    assert f"wandb run {run_id} (optim.lr=0.001): 4 new steps (last step 4), 4 files" in (
        result.stdout.replace("\n", " ")
    )
    [offline] = (tmp_path / "wandb-home" / "wandb").glob(f"offline-run-*-{run_id}")
    assert (offline / "files" / "summary.json").is_file()
    assert (offline / "files" / "eval" / "step_000004.json").is_file()
    again = runner.invoke(app, ["wandb-sync", str(run_dir.parent)])
    assert again.exit_code == 0 and "0 new steps" in again.stdout


def test_a_folder_without_runs_is_one_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["wandb-sync", str(tmp_path)])
    assert result.exit_code == 1
    assert "no run directory" in result.stderr and "Traceback" not in result.output


def test_live_logging_names_a_sweep_point_by_its_overrides_with_its_facts(
    make_debug_store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gssm_data.store import open_store
    from llama_train.core import metrics
    from llama_train.recipe.train import train
    from llama_train.recipe.train_config import resolve_config

    store = make_debug_store(n_train=64, n_test=16, seq_len=9)
    started: dict[str, Any] = {}

    class Live(FakeRun):
        def log_artifact(self, artifact: Any) -> None:
            pass

    def start(run_dir, mode, project, entity, name, config, group=None):
        started.update(name=name, group=group, config=config)
        return Live(id="live")

    monkeypatch.setattr(metrics, "_start_wandb", start)
    config = resolve_config(
        None,
        [
            f"data.path={store}",
            f"run.dir={tmp_path / 'run'}",
            "run.name=lr-sweep/optim.lr=0.003",
            "logging.wandb.project=tests",
            "model.dim=16",
            "model.n_layers=1",
            "model.n_heads=2",
            "train.steps=2",
        ],
    )
    summary = train(config, progress=False)
    assert (started["name"], started["group"]) == ("optim.lr=0.003", "lr-sweep")
    counts = started["config"]["parameters"]
    assert counts["parameters_total"] == summary["parameters_total"] == summary["parameters"] > 0
    assert counts["parameters_non_embedding"] == summary["parameters_non_embedding"]
    assert started["config"]["data_fingerprint"] == open_store(store).manifest.fingerprint
    assert summary["store_fingerprint"] == started["config"]["data_fingerprint"]


def test_a_run_started_with_overrides_is_named_by_them() -> None:
    from llama_train.core.run_identity import command_line_name
    from llama_train.rundir import wandb_name_and_group

    overrides = ["optim.lr=1e-3", "run.dir=runs/x", "logging.wandb.project=p", "model.dim=64"]
    assert command_line_name("demo", overrides) == "demo optim.lr=1e-3 model.dim=64"
    assert command_line_name("demo", ["run.dir=runs/x"]) is None
    assert wandb_name_and_group("demo", "demo optim.lr=1e-3") == ("demo optim.lr=1e-3", None)
    assert wandb_name_and_group("lr/optim.lr=0.1", None) == ("optim.lr=0.1", "lr")
    assert wandb_name_and_group("lr/optim.lr=0.1", "mine") == ("mine", "lr")


def test_the_run_command_records_the_wandb_name_and_sync_uses_it(
    make_debug_store, tmp_path: Path, fake_wandb: list[FakeRun]
) -> None:
    store = make_debug_store(n_train=64, n_test=16, seq_len=9)
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"path": str(store), "batch_size": 8},
                "model": {"dim": 16, "n_layers": 1, "n_heads": 2},
                "train": {"steps": 2, "progress": False},
            }
        )
    )
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["run", str(config), "optim.lr=0.003", f"run.dir={run_dir}"])
    assert result.exit_code == 0, result.output
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["logging"]["wandb"]["name"] == "tiny optim.lr=0.003"
    sync_run(run_dir)
    assert fake_wandb[-1].settings["name"] == "tiny optim.lr=0.003"
