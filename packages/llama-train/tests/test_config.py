"""The training config: composition, overrides, messages, and the link to the store."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llama_train.errors import LlamaTrainError
from llama_train.recipe.train_config import (
    TrainConfig,
    apply_overrides,
    config_schema,
    known_keys,
    read_run_config,
    resolve_config,
    write_config,
)

STABLE_KEYS = [
    "data.path",
    "data.n_train",
    "data.batch_size",
    "model.dim",
    "model.n_layers",
    "model.n_heads",
    "optim.lr",
    "train.steps",
    "eval.every",
    "checkpoint.every",
    "checkpoint.keep",
    "run.dir",
    "run.seed",
    "logging.wandb.mode",
]


@pytest.fixture(scope="module")
def store(make_debug_store) -> Path:
    """A debug-preset store: vocabulary 8, sequences of 17 tokens, 128 train sequences."""
    return make_debug_store(n_train=128, n_test=32, seq_len=17)


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _base(store: Path, tmp_path: Path) -> dict:
    return {
        "data": {"path": str(store), "batch_size": 4},
        "model": {"dim": 16, "n_layers": 1, "n_heads": 2},
        "run": {"dir": str(tmp_path / "run")},
    }


def test_the_stable_key_names_exist_in_the_schema():
    keys = set(known_keys())
    assert [key for key in STABLE_KEYS if key not in keys] == []


def test_overrides_are_parsed_as_yaml_values():
    raw = apply_overrides(
        {"optim": {"lr": 1.0}},
        ["optim.lr=3e-4", "train.compile=true", "optim.betas=[0.9, 0.99]", "run.name=x=y"],
    )
    assert raw["optim"]["betas"] == [0.9, 0.99]
    assert raw["train"]["compile"] is True
    assert raw["run"]["name"] == "x=y"  # only the first '=' splits
    assert raw["optim"]["lr"] == 3e-4  # a float, though PyYAML alone reads "3e-4" as text


def test_precedence_is_defaults_then_yaml_then_command_line(store, tmp_path):
    path = _write(tmp_path / "exp.yaml", _base(store, tmp_path) | {"optim": {"lr": 0.01}})
    from_yaml = resolve_config(path)
    assert from_yaml.optim.lr == 0.01  # YAML beats the default
    assert from_yaml.optim.weight_decay == 0.1  # untouched default
    from_cli = resolve_config(path, ["optim.lr=0.002", "model.n_layers=3"])
    assert (from_cli.optim.lr, from_cli.model.n_layers) == (0.002, 3)


def test_run_name_defaults_to_the_yaml_stem_and_dir_to_runs_name(store, tmp_path):
    raw = _base(store, tmp_path)
    del raw["run"]
    config = resolve_config(_write(tmp_path / "my-experiment.yaml", raw))
    assert config.run.name == "my-experiment"
    assert config.run_dir == Path("runs/my-experiment")


def test_an_unknown_override_names_the_key_and_suggests_the_close_one(store, tmp_path):
    path = _write(tmp_path / "c.yaml", _base(store, tmp_path))
    with pytest.raises(
        LlamaTrainError,
        match=r"unknown config key 'optim.lrr'; did you mean "
        r"'optim.lr'",
    ):
        resolve_config(path, ["optim.lrr=1e-3"])
    with pytest.raises(LlamaTrainError, match=r"'trian.steps'.*'train.steps'"):
        resolve_config(path, ["trian.steps=5"])


def test_an_unknown_yaml_key_is_an_error_with_a_suggestion(store, tmp_path):
    raw = _base(store, tmp_path)
    raw["model"]["n_layer"] = 2
    with pytest.raises(LlamaTrainError, match=r"'model.n_layer'; did you mean 'model.n_layers'"):
        resolve_config(_write(tmp_path / "c.yaml", raw))


def test_a_key_below_a_value_is_refused(store, tmp_path):
    with pytest.raises(LlamaTrainError, match=r"optim.lr is a value, not a section"):
        resolve_config(_write(tmp_path / "c.yaml", _base(store, tmp_path)), ["optim.lr.x=1"])


def test_an_override_without_equals_sign_is_refused(store, tmp_path):
    with pytest.raises(LlamaTrainError, match=r"not of the form key.sub=value"):
        resolve_config(_write(tmp_path / "c.yaml", _base(store, tmp_path)), ["optim.lr"])


def test_validation_errors_are_one_line_per_field_with_the_value(store, tmp_path):
    path = _write(tmp_path / "c.yaml", _base(store, tmp_path))
    with pytest.raises(LlamaTrainError) as caught:
        resolve_config(path, ["train.steps=0", "optim.lr=-1", "train.amp=fp8"])
    lines = str(caught.value).splitlines()
    assert lines[0] == "invalid config:"
    assert len(lines) == 4
    assert any(line.startswith("train.steps: ") and "(got 0)" in line for line in lines)
    assert any(line.startswith("optim.lr: ") and "(got -1)" in line for line in lines)
    assert any(line.startswith("train.amp: ") and "'fp8'" in line for line in lines)


def test_data_errors_are_reported_under_the_data_key(tmp_path):
    path = _write(tmp_path / "c.yaml", {"data": {"batch_size": 0, "path": "x.zarr"}})
    with pytest.raises(LlamaTrainError, match=r"data.batch_size: .*greater than 0"):
        resolve_config(path)


def test_vocabulary_and_context_come_from_the_manifest(store, tmp_path):
    config = resolve_config(_write(tmp_path / "c.yaml", _base(store, tmp_path)))
    assert (config.model.vocab_size, config.model.max_seq_len) == (8, 17)


def test_a_vocabulary_that_disagrees_with_the_store_names_both_values(store, tmp_path):
    path = _write(tmp_path / "c.yaml", _base(store, tmp_path))
    with pytest.raises(
        LlamaTrainError,
        match=r"model.vocab_size=12 .* vocabulary of the store "
        r".*\(8\)",
    ):
        resolve_config(path, ["model.vocab_size=12"])
    assert resolve_config(path, ["model.vocab_size=8"]).model.vocab_size == 8


def test_a_context_shorter_than_the_sequences_names_both_values(store, tmp_path):
    path = _write(tmp_path / "c.yaml", _base(store, tmp_path))
    with pytest.raises(LlamaTrainError, match=r"model.max_seq_len=10 .* 16 input tokens"):
        resolve_config(path, ["model.max_seq_len=10"])
    assert resolve_config(path, ["model.max_seq_len=64"]).model.max_seq_len == 64


def test_a_train_prefix_accepts_scientific_notation_and_refuses_too_many(store, tmp_path):
    path = _write(tmp_path / "c.yaml", _base(store, tmp_path))
    assert resolve_config(path, ["data.n_train=1e2"]).data.n_train == 100
    with pytest.raises(LlamaTrainError, match=r"data.n_train=1000 .* holds 128"):
        resolve_config(path, ["data.n_train=1e3"])


def test_a_missing_store_is_a_user_error(tmp_path):
    path = _write(tmp_path / "c.yaml", {"data": {"path": str(tmp_path / "nothing.zarr")}})
    with pytest.raises(LlamaTrainError, match=r"no store at"):
        resolve_config(path)


def test_a_missing_or_malformed_config_file_is_a_user_error(tmp_path):
    with pytest.raises(LlamaTrainError, match=r"config file .*absent.yaml not found"):
        resolve_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(LlamaTrainError, match=r"is not valid YAML: .* at line 2"):
        resolve_config(bad)


def test_the_written_config_reads_back_identically(store, tmp_path):
    config = resolve_config(_write(tmp_path / "c.yaml", _base(store, tmp_path)), ["optim.lr=0.5"])
    path = write_config(config)
    assert path == config.run_dir / "config.yaml"
    assert read_run_config(config.run_dir) == config
    # The written file is itself a config: resolving it gives the same run.
    assert resolve_config(path) == config


def test_wandb_logs_offline_by_default_only_when_a_project_is_named():
    assert TrainConfig.model_fields["logging"].default.wandb.effective_mode == "disabled"
    from llama_train.core.metrics import WandbConfig

    assert WandbConfig(project="gssm").effective_mode == "offline"
    assert WandbConfig(project="gssm", mode="disabled").effective_mode == "disabled"


def test_the_json_schema_lists_every_section():
    schema = config_schema()
    assert set(schema["properties"]) == {
        "data",
        "model",
        "optim",
        "train",
        "eval",
        "checkpoint",
        "logging",
        "run",
        "distributed",
        "profile",
    }
    assert schema["required"] == ["data"]


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_a_config_ships_for_every_preset_regime_plus_the_demo_and_online():
    from gssm_data.presets import preset_names

    names = {path.stem for path in CONFIGS}
    assert set(preset_names()) | {"demo", "online"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_every_shipped_config_is_valid(path):
    """Keys and values check out; the store each names is filled in as a manifest would."""
    from llama_train.recipe.train_config import validate
    from llama_train.rundir import load_yaml

    raw = load_yaml(path)
    raw.setdefault("model", {}).update(vocab_size=64, max_seq_len=257)
    config = validate(raw)
    assert config.train.steps > 0 and config.eval.every <= config.train.steps


def test_scientific_notation_is_a_number_in_files_and_overrides(store, tmp_path):
    raw = _base(store, tmp_path) | {"train": {"steps": "placeholder"}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw).replace("placeholder", "2e3"))
    assert resolve_config(path).train.steps == 2000
    config = resolve_config(path, ["train.steps=1e4", "optim.lr=3e-4"])
    assert (config.train.steps, config.optim.lr) == (10000, 3e-4)


def test_dotted_keys_set_and_flatten_are_inverse() -> None:
    """Overrides, sweep points and study points set keys one way; configs compare flattened."""
    from llama_train.core.config_files import flatten_keys, set_dotted

    raw: dict = {"optim": None, "model": {"dim": 64}}
    for key, value in {"optim.lr": 3e-4, "model.dim": 128, "train.branches": [0.5]}.items():
        set_dotted(raw, key.split("."), value)
    assert raw == {"optim": {"lr": 3e-4}, "model": {"dim": 128}, "train": {"branches": [0.5]}}
    assert flatten_keys(raw) == {"optim.lr": 3e-4, "model.dim": 128, "train.branches": [0.5]}
    with pytest.raises(LlamaTrainError, match=r"model\.dim is a value, not a section"):
        set_dotted(raw, ["model", "dim", "x"], 1)


def test_counts_are_written_the_way_people_say_them_in_every_count_field() -> None:
    """Steps, sequences, branch tokens and study sizes share one count type (`Count`)."""
    from pydantic import ValidationError

    from gssm_data.common.humanize import format_validation_error
    from llama_train.core.data import DataConfig
    from llama_train.core.evaluate import EvalConfig
    from llama_train.launch.study import StepsRule
    from llama_train.recipe.train_config import TrainSection

    section = TrainSection(steps="1e3", branches=["2.5k", 100])
    assert (section.steps, section.branches) == (1000, [100, 2500])
    assert EvalConfig(max_sequences="16k").max_sequences == 16_000
    assert DataConfig(path="store", n_train="2.5M").n_train == 2_500_000
    assert StepsRule(tokens="1e8").tokens == 100_000_000
    for build, message in (
        (lambda: TrainSection(steps="1.5"), "steps: '1.5' is not a whole number"),
        (lambda: TrainSection(steps=0), "steps: 0 must be at least 1"),
        (lambda: TrainSection(branches=["lots"]), "branches.0: 'lots' is not a count"),
    ):
        with pytest.raises(ValidationError) as raised:
            build()
        assert format_validation_error(raised.value).startswith(message)
