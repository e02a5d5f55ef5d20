"""The training configuration: each module's section, composed and linked to the data.

`TrainConfig` only composes: `data` (:class:`~llama_train.data.DataConfig`),
`model` (:class:`~llama_train.model.ModelConfig`), `optim`
(:class:`~llama_train.optim.OptimConfig`) and `distributed`
(:class:`~llama_train.distributed.DistributedConfig`) live beside the code they configure;
the sections that belong to the training recipe itself (`train`, `eval`,
`checkpoint`, `logging`, `run`) are defined here. Every section forbids
unknown keys, so a typo is an error rather than a silently ignored setting.

Precedence, lowest first: field defaults < the YAML file < command-line
overrides (`key.sub=value`, the value parsed as YAML, so `optim.lr=3e-4`,
`train.compile=true` and `optim.betas=[0.9,0.95]` all work). Then the data
section is opened (:func:`link_to_data`): the store's manifest (or the online
graph) supplies `model.vocab_size` and `model.max_seq_len` when the config
leaves them out, and must agree with them when it sets them.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llama_train.data import DataConfig, resolve_data
from llama_train.distributed import DistributedConfig  # issue 5, helper "dist"
from llama_train.errors import LlamaTrainError
from llama_train.model import ModelConfig
from llama_train.optim import OptimConfig
from llama_train.slurm import SlurmConfig  # issue 5, helper "slurm": the `slurm` section
from llama_train.sweep import SweepGrid  # issue 5, helper "slurm": the `sweep` section

CONFIG_FILENAME = "config.yaml"


class TrainSection(BaseModel):
    """How long and how the loop runs (the `train` section)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(1000, gt=0, description="optimizer steps (each of grad_accum micro-batches)")
    grad_accum: int = Field(
        1,
        ge=1,
        description="micro-batches per optimizer step; global batch = "
        "data.batch_size x grad_accum x world size",
    )
    amp: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="autocast dtype; auto = bf16 on CUDA, fp32 on CPU (CPU bf16 is slow); "
        "fp16 uses a gradient scaler and needs CUDA",
    )
    compile: bool = Field(False, description="wrap the model in torch.compile for training")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda if available")
    threads: int | None = Field(
        None,
        gt=0,
        description="CPU threads of PyTorch ops; None = PyTorch's default (one per "
        "core). On a shared machine fewer threads than cores can be much faster",
    )
    log_every: int = Field(10, gt=0, description="steps between metrics lines (mean over them)")
    progress: bool = Field(True, description="show a progress bar (rank 0 only)")


class EvalConfig(BaseModel):
    """Evaluation against the exact entropy (the `eval` section)."""

    model_config = ConfigDict(extra="forbid")

    every: int = Field(500, gt=0, description="steps between evaluations (also at the end)")
    max_sequences: int | None = Field(
        None, gt=0, description="first sequences of the split to use; None = the whole split"
    )
    split: str = Field("test", description="store split to evaluate on")
    batch_size: int | None = Field(
        None, gt=0, description="sequences per forward pass; None = data.batch_size"
    )


class CheckpointConfig(BaseModel):
    """When checkpoints are written and how many are kept (the `checkpoint` section)."""

    model_config = ConfigDict(extra="forbid")

    every: int = Field(500, gt=0, description="steps between checkpoints (also at the end)")
    keep: int = Field(2, ge=1, description="most recent checkpoints kept on disk")


class WandbConfig(BaseModel):
    """Weights & Biases logging (`logging.wandb`); metrics.jsonl is written regardless."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["offline", "online", "disabled"] | None = Field(
        None, description="None = offline when a project is set, else disabled"
    )
    project: str | None = None
    entity: str | None = None

    @property
    def effective_mode(self) -> Literal["offline", "online", "disabled"]:
        """The mode actually used: an unset mode logs offline only when a project is named."""
        if self.mode is not None:
            return self.mode
        return "offline" if self.project else "disabled"


class LoggingConfig(BaseModel):
    """Where metrics go besides metrics.jsonl (the `logging` section)."""

    model_config = ConfigDict(extra="forbid")

    wandb: WandbConfig = WandbConfig()


class RunConfig(BaseModel):
    """Identity of the run (the `run` section): its name, directory and seed."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("run", min_length=1, description="defaults to the config file's stem")
    dir: Path | None = Field(None, description="run directory; None = runs/<name>")
    seed: int = Field(0, ge=0, description="model initialisation and data order")

    @model_validator(mode="after")
    def _default_dir(self) -> RunConfig:
        if self.dir is None:
            self.dir = Path("runs") / self.name
        return self


class TrainConfig(BaseModel):
    """The whole run, as written to `<run.dir>/config.yaml`."""

    model_config = ConfigDict(extra="forbid")

    data: DataConfig
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainSection = TrainSection()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    run: RunConfig = RunConfig()
    distributed: DistributedConfig = DistributedConfig()  # issue 5, helper "dist"
    # --- issue 5, helper "slurm": `llama-train submit` (llama_train/slurm.py, sweep.py) ---
    slurm: SlurmConfig = SlurmConfig()
    sweep: SweepGrid = Field(
        default_factory=dict,
        description="grid of `llama-train submit`: config key -> list of values, one run per "
        "combination under run.dir (e.g. optim.lr: [1e-4, 3e-4]); `llama-train run` ignores it",
    )
    # --- end of helper "slurm" ---

    @property
    def run_dir(self) -> Path:
        """The run directory (always set once validated)."""
        assert self.run.dir is not None
        return self.run.dir


# ---------------------------------------------------------------------------
# Loading and overrides


class _Loader(yaml.SafeLoader):
    """YAML with 1.2-style numbers: `1e5` and `3e-4` are floats, as people mean them.

    PyYAML follows YAML 1.1, where a float needs a dot (`1.0e5`), so `train.steps=1e4`
    would arrive as the string "1e4" and fail validation as an integer.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)
        |[-+]?(?:[0-9][0-9_]*)\.[0-9_]*
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or bad syntax is a one-line user error."""
    path = Path(path)
    try:
        data = _parse_yaml(path.read_text())
    except FileNotFoundError:
        raise LlamaTrainError(f"config file not found: {path}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise LlamaTrainError(f"{path}: invalid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LlamaTrainError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `key.sub=value` into its key path and YAML-parsed value."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise LlamaTrainError(f"override {text!r} is not of the form key.sub=value")
    parts = key.split(".")
    if any(not part for part in parts):
        raise LlamaTrainError(f"override {text!r}: empty component in key {key!r}")
    try:
        value = _parse_yaml(value_text) if value_text.strip() else None
    except yaml.YAMLError:
        # Not valid YAML (e.g. an unquoted `a: b`): take it as the literal string.
        value = value_text
    return parts, value


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of `raw` with each `key.sub=value` set; unknown keys name close matches."""
    result = _deep_copy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        check_key(parts)
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                prefix = ".".join(parts[: depth + 1])
                raise LlamaTrainError(f"override {text!r}: {prefix} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return result


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: _deep_copy(value) if isinstance(value, Mapping) else value
        for key, value in raw.items()
    }


# ---------------------------------------------------------------------------
# Known keys (for suggestions)


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (also through `X | None`), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        models = [_section_model(arg) for arg in typing.get_args(annotation)]
        models = [model for model in models if model is not None]
        if len(models) == 1:
            return models[0]
    return None


def _is_open_mapping(annotation: Any) -> bool:
    """Whether a field accepts arbitrary sub-keys (a dict, Any, or a union with one)."""
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (dict, Mapping) or annotation is dict:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_open_mapping(arg) for arg in typing.get_args(annotation))
    return False


def known_keys(model: type[BaseModel] | None = None) -> list[str]:
    """Every dotted key of the schema (sections and leaves), for messages and docs."""
    model = model or TrainConfig
    keys: list[str] = []
    for name, field in model.model_fields.items():
        keys.append(name)
        section = _section_model(field.annotation)
        if section is not None:
            keys.extend(f"{name}.{sub}" for sub in known_keys(section))
    return keys


def check_key(parts: list[str], model: type[BaseModel] | None = None) -> None:
    """Raise a user error naming `parts` and close matches when the key is not in the schema."""
    model = model or TrainConfig
    for depth, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            prefix = ".".join(parts[:depth])
            key = ".".join(parts)
            candidates = [f"{prefix}.{name}" if prefix else name for name in fields]
            raise LlamaTrainError(_unknown_key_message(key, candidates, prefix))
        annotation = fields[part].annotation
        section = _section_model(annotation)
        if section is None:
            if depth < len(parts) - 1 and not _is_open_mapping(annotation):
                raise LlamaTrainError(
                    f"unknown config key {'.'.join(parts)!r}: "
                    f"{'.'.join(parts[: depth + 1])} is a value, not a section"
                )
            return
        model = section


def _unknown_key_message(key: str, candidates: list[str], prefix: str) -> str:
    # Siblings first (a typo in the last part), then anywhere (a misspelt section).
    close = difflib.get_close_matches(key, candidates, n=2, cutoff=0.6) or (
        difflib.get_close_matches(key, known_keys(), n=2, cutoff=0.6)
    )
    if close:
        return f"unknown config key {key!r}; did you mean {' or '.join(map(repr, close))}?"
    where = f"section {prefix!r}" if prefix else "the top level"
    names = ", ".join(candidate.rsplit(".", 1)[-1] for candidate in candidates)
    return f"unknown config key {key!r}; {where} has: {names}"


def check_keys(
    raw: Mapping[str, Any], model: type[BaseModel] | None = None, prefix: tuple[str, ...] = ()
) -> None:
    """Check every key of a raw (YAML) mapping against the schema, with suggestions."""
    model = model or TrainConfig
    for key, value in raw.items():
        parts = [*prefix, str(key)]
        check_key(parts)
        field = model.model_fields[str(key)]
        section = _section_model(field.annotation)
        if section is not None and isinstance(value, Mapping):
            check_keys(value, section, tuple(parts))


# ---------------------------------------------------------------------------
# Validation


def format_validation_error(error: ValidationError, prefix: str = "") -> str:
    """One `key: message (got value)` line per problem, keys dotted like overrides."""
    lines = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"] if not _is_type_tag(part))
        if prefix:
            location = f"{prefix}.{location}" if location else prefix
        message = item["msg"].removeprefix("Value error, ")
        value = item.get("input")
        got = ""
        if item["type"] != "missing" and not isinstance(value, dict | list):
            got = f" (got {value!r})"
        lines.append(f"{location}: {message}{got}" if location else f"{message}{got}")
    return "\n".join(dict.fromkeys(lines))


def _is_type_tag(part: object) -> bool:
    # Union members show up in error locations as type names (`int`, `function-after[...]`).
    return isinstance(part, str) and (
        part in {"int", "float", "str", "bool", "none", "list", "dict"} or "[" in part
    )


def validate(raw: Mapping[str, Any]) -> TrainConfig:
    """Validate a raw mapping as a TrainConfig; errors become one line per field."""
    check_keys(raw)
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as error:
        raise LlamaTrainError("invalid config:\n" + format_validation_error(error)) from None


def link_to_data(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Fill (or check) `model.vocab_size` and `model.max_seq_len` from the data source.

    The store's manifest (or the online graph) is the authority on the
    vocabulary and the sequence length; a config that states them anyway must
    agree. The model reads `seq_len - 1` tokens (inputs are batch[:, :-1]), so
    `max_seq_len` defaults to `seq_len` and may be larger but not shorter than
    `seq_len - 1`.
    """
    result = _deep_copy(raw)
    data_raw = result.get("data")
    if not isinstance(data_raw, Mapping):
        raise LlamaTrainError("invalid config:\ndata: Field required (set data.path to a store)")
    try:
        data_config = DataConfig.model_validate(data_raw)
    except ValidationError as error:
        raise LlamaTrainError(
            "invalid config:\n" + format_validation_error(error, prefix="data")
        ) from None
    spec = resolve_data(data_config)
    model_raw = result.setdefault("model", {})
    if not isinstance(model_raw, dict):
        raise LlamaTrainError("invalid config:\nmodel: expected a mapping")
    source = _describe_source(data_config)
    vocab = model_raw.get("vocab_size")
    if vocab is not None and vocab != spec.vocab_size:
        raise LlamaTrainError(
            f"model.vocab_size={vocab} does not match the vocabulary of {source} "
            f"({spec.vocab_size}); remove model.vocab_size to take it from the data"
        )
    context = model_raw.get("max_seq_len")
    if context is not None and context < spec.seq_len - 1:
        raise LlamaTrainError(
            f"model.max_seq_len={context} is shorter than the {spec.seq_len - 1} input tokens "
            f"of {source} (seq_len {spec.seq_len}); remove model.max_seq_len to take it "
            "from the data"
        )
    model_raw["vocab_size"] = spec.vocab_size
    model_raw.setdefault("max_seq_len", spec.seq_len)
    return result


def _describe_source(data_config: DataConfig) -> str:
    path = getattr(data_config, "path", None)
    if getattr(data_config, "source", "zarr") == "zarr" and path is not None:
        return f"the store {path}"
    return "the online data source"


def resolve_config(path: str | Path | None, overrides: Iterable[str] = ()) -> TrainConfig:
    """Defaults < YAML file (`path`, optional) < `overrides`, linked to the data and validated.

    `run.name` defaults to the YAML file's stem and `run.dir` to
    `runs/<run.name>`. Without a file, the overrides alone describe the run
    (at least `data.path=...`).
    """
    raw = load_yaml(path) if path is not None else {}
    check_keys(raw)
    raw = apply_overrides(raw, overrides)
    run_raw = raw.setdefault("run", {})
    if isinstance(run_raw, dict) and path is not None:
        run_raw.setdefault("name", Path(path).stem)
    return validate(link_to_data(raw))


def config_to_yaml(config: TrainConfig) -> str:
    """The resolved config as YAML (every field explicit), readable by :func:`resolve_config`."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def write_config(config: TrainConfig, run_dir: Path | None = None) -> Path:
    """Write the resolved config to `<run dir>/config.yaml` atomically; return its path."""
    run_dir = Path(run_dir or config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / CONFIG_FILENAME
    partial = target.with_suffix(".yaml.partial")
    partial.write_text(config_to_yaml(config))
    os.replace(partial, target)
    return target


def read_run_config(run_dir: str | Path) -> TrainConfig:
    """The resolved config stored in a run directory (no data link: it was linked at write)."""
    path = Path(run_dir) / CONFIG_FILENAME
    if not path.is_file():
        raise LlamaTrainError(f"{run_dir} is not a run directory (no {CONFIG_FILENAME})")
    return validate(load_yaml(path))


def config_schema() -> dict[str, Any]:
    """The JSON schema of TrainConfig (what `llama-train config-schema` prints)."""
    return TrainConfig.model_json_schema()
