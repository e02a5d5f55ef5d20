"""The training config: the recipe's sections, composed with the core's, and linked to the data.

`TrainConfig` only composes: `data` (:class:`~llama_train.core.data.DataConfig`),
`model` (:class:`~llama_train.core.model.ModelConfig`), `optim`
(:class:`~llama_train.core.optim.OptimConfig`), `distributed`
(:class:`~llama_train.core.distributed.DistributedConfig`), `checkpoint`,
`eval` and `logging` live beside the code they configure; the sections that
belong to the training recipe itself (`train`, `run`) are defined here. Every
section forbids unknown keys, so a typo is an error rather than a silently
ignored setting. The launcher's sections (`slurm`, `sweep`) are not part of it:
they belong to `llama-train submit` (:class:`~llama_train.launch.submit_config.SubmitConfig`).

Precedence (:mod:`llama_train.core.config_files`), lowest first: field
defaults < the YAML file < command-line overrides. Then the data section is
opened (:func:`link_to_data`): the store's manifest (or the online graph)
supplies `model.vocab_size` and `model.max_seq_len` when the config leaves them
out, and must agree with them when it sets them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gssm_data.common.humanize import Count
from llama_train.core import config_files
from llama_train.core.checkpoint import CheckpointConfig
from llama_train.core.data import DataConfig, resolve_data
from llama_train.core.distributed import DistributedConfig
from llama_train.core.evaluate import EvalConfig
from llama_train.core.metrics import LoggingConfig
from llama_train.core.model import ModelConfig
from llama_train.core.optim import OptimConfig
from llama_train.core.plain_text import PlainPath, PlainStr
from llama_train.core.profiler import ProfileConfig
from llama_train.errors import LlamaTrainError
from llama_train.rundir import CONFIG_FILENAME, atomic_write

# Sections of `llama-train submit`'s config that a training config does not take.
LAUNCHER_SECTIONS = ("slurm", "sweep")
# Micro-batches per optimizer step: preemption (SIGTERM, SIGUSR1) is acted on between
# steps, so a step of a billion micro-batches would never see it.
MAX_GRAD_ACCUM = 1024

# Keys whose default changed when they were added: what a run directory's config.yaml
# written before the key existed meant (its file lists every key of its time, so a
# missing one is older than the key). The wsd schedule decayed linearly then.
LEGACY_DEFAULTS: dict[str, Any] = {"optim.decay_shape": "linear"}


class TrainSection(BaseModel):
    """How long and how the loop runs (the `train` section)."""

    model_config = ConfigDict(extra="forbid")

    steps: Count = Field(1000, description="optimizer steps (each of grad_accum micro-batches)")
    grad_accum: int = Field(
        1,
        ge=1,
        description="micro-batches per optimizer step; global batch = "
        "data.batch_size x grad_accum x world size. At most 1024: a preemption signal "
        "is acted on between optimizer steps, so one step must stay short; raise "
        "data.batch_size or the ranks instead",
    )
    amp: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="autocast dtype; auto = bf16 on CUDA, fp32 on CPU (CPU bf16 is slow); "
        "fp16 uses a gradient scaler and needs CUDA",
    )
    compile: bool = Field(
        False, description="wrap the model (a stack: its members' losses) in torch.compile"
    )
    compile_cache: PlainPath | None = Field(
        None,
        description="directory of torch.compile's on-disk cache, shared by runs of one "
        "shape so that the shape compiles once (`study run` sets <study dir>/compile-cache); "
        "None = $TORCHINDUCTOR_CACHE_DIR, else torch's /tmp/torchinductor_<user>",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda if available")
    threads: int | None = Field(
        None,
        gt=0,
        description="CPU threads of PyTorch ops; None = the idle CPUs this process may use "
        "(affinity, cgroup quota, 1-minute load; OMP_NUM_THREADS wins) less one per "
        "data.num_workers, one per rank when several run. PyTorch's one-per-core default is "
        "many times slower on a busy machine",
    )
    log_every: int = Field(10, gt=0, description="steps between metrics lines (mean over them)")
    progress: bool = Field(
        True,
        description="show progress (rank 0 only): a bar on a terminal, else a line every "
        "progress_every seconds (Slurm logs, CI)",
    )
    progress_every: float = Field(
        30.0, gt=0, allow_inf_nan=False, description="seconds between progress lines off a terminal"
    )
    branches: list[Count] = Field(
        default_factory=list,
        description="cooldown branches (optim.schedule wsd): the predicted tokens of each, "
        "shorter than the run; each forks from this run's stable phase where its own decay "
        "starts and is a run directory of its own under <run.dir>/branches/ "
        "(llama_train.recipe.branches)",
    )

    @field_validator("branches")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("a branch is listed twice")
        return sorted(value)

    @field_validator("grad_accum")
    @classmethod
    def _bounded_step(cls, value: int) -> int:
        if value > MAX_GRAD_ACCUM:
            raise ValueError(
                f"at most {MAX_GRAD_ACCUM} micro-batches per optimizer step (a preemption "
                "signal is acted on between steps, so a step must stay short); raise "
                "data.batch_size or the number of ranks instead"
            )
        return value


class RunConfig(BaseModel):
    """Identity of the run (the `run` section): its name, directory and seed."""

    model_config = ConfigDict(extra="forbid")

    name: PlainStr = Field("run", min_length=1, description="defaults to the config file's stem")
    dir: PlainPath | None = Field(None, description="run directory; None = runs/<name>")
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
    distributed: DistributedConfig = DistributedConfig()
    profile: ProfileConfig = ProfileConfig()

    @model_validator(mode="after")
    def _branches_need_wsd(self) -> TrainConfig:
        if self.train.branches and self.optim.schedule != "wsd":
            raise ValueError(
                f"train.branches fork cooldowns from a stable lr: set optim.schedule=wsd "
                f"(it is {self.optim.schedule})"
            )
        return self

    @property
    def run_dir(self) -> Path:
        """The run directory (always set once validated)."""
        assert self.run.dir is not None
        return self.run.dir


# ---------------------------------------------------------------------------
# Reading


def known_keys() -> list[str]:
    """Every dotted key of TrainConfig (sections and leaves), for messages and docs."""
    return config_files.known_keys(TrainConfig)


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of `raw` with each `key.sub=value` set; unknown keys name close matches."""
    return config_files.apply_overrides(raw, overrides, TrainConfig)


def validate(raw: Mapping[str, Any]) -> TrainConfig:
    """Validate a raw mapping as a TrainConfig; errors become one line per field."""
    return config_files.validate(raw, TrainConfig)


def raw_config(
    path: str | Path | None, overrides: Iterable[str] = (), model: type[BaseModel] | None = None
) -> dict[str, Any]:
    """Defaults < YAML file (`path`, optional) < `overrides`, keys checked against `model`.

    `model` is TrainConfig unless a launcher extends it. `run.name` defaults to
    the YAML file's stem. A training config that names a launcher's section is
    refused in one line that says which command takes it.
    """
    model = model or TrainConfig
    if model is TrainConfig:
        _refuse_launcher_sections(path, overrides)
    raw = config_files.merge_sources(path, overrides, model)
    run_raw = raw.setdefault("run", {})
    if isinstance(run_raw, dict) and path is not None:
        run_raw.setdefault("name", Path(path).stem)
    return raw


def _refuse_launcher_sections(path: str | Path | None, overrides: Iterable[str]) -> None:
    """`run` trains one config: a grid would silently train only its base point."""
    raw = config_files.load_yaml(path) if path is not None else {}
    named: dict[str, list[str]] = {
        section: list(config_files.flatten_keys(raw[section]))
        if isinstance(raw[section], Mapping)
        else []
        for section in LAUNCHER_SECTIONS
        if section in raw
    }
    for text in overrides:
        section, _, key = text.partition("=")[0].strip().partition(".")
        if section in LAUNCHER_SECTIONS:
            named.setdefault(section, []).append(key)
    if "sweep" in named:
        keys = ", ".join(sorted({key for key in named["sweep"] if key})) or "(empty)"
        raise LlamaTrainError(
            f"this config has a sweep over {keys}: `llama-train submit CONFIG` runs every point "
            "(add --local to run them here); `run` trains a single configuration"
        )
    if "slurm" in named:
        raise LlamaTrainError(
            "this config has a `slurm` section, which belongs to `llama-train submit CONFIG` "
            "(add --local to run the job here); `run` trains a config without one"
        )


def link_to_data(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Fill (or check) `model.vocab_size` and `model.max_seq_len` from the data source.

    The store's manifest (or the online graph) is the authority on the
    vocabulary and the sequence length; a config that states them anyway must
    agree. The model reads `seq_len - 1` tokens (inputs are batch[:, :-1]), so
    `max_seq_len` defaults to `seq_len` and may be larger but not shorter than
    `seq_len - 1`.
    """
    config_files.reject_non_finite(raw)
    result = config_files.deep_copy(raw)
    data_raw = result.get("data")
    if not isinstance(data_raw, Mapping):
        raise LlamaTrainError("invalid config: data: Field required (set data.path to a store)")
    try:
        data_config = DataConfig.model_validate(data_raw)
    except ValidationError as error:
        raise LlamaTrainError(config_files.invalid_config(error, prefix="data")) from None
    spec = resolve_data(data_config)
    model_raw = result.setdefault("model", {})
    if not isinstance(model_raw, dict):
        raise LlamaTrainError("invalid config: model: expected a mapping")
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
    return validate(link_to_data(raw_config(path, overrides)))


def config_to_yaml(config: TrainConfig) -> str:
    """The resolved config as YAML (every field explicit), readable by :func:`resolve_config`."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def write_config(config: TrainConfig, run_dir: Path | None = None) -> Path:
    """Write the resolved config to `<run dir>/config.yaml` atomically; return its path."""
    run_dir = Path(run_dir or config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return atomic_write(run_dir / CONFIG_FILENAME, config_to_yaml(config))


def read_run_config(run_dir: str | Path) -> TrainConfig:
    """The resolved config stored in a run directory (no data link: it was linked at write)."""
    path = Path(run_dir) / CONFIG_FILENAME
    if not path.is_file():
        raise LlamaTrainError(f"{run_dir} is not a run directory (no {CONFIG_FILENAME})")
    raw = config_files.load_yaml(path)
    # Run directories written before the launcher had its own config hold its sections.
    for section in LAUNCHER_SECTIONS:
        raw.pop(section, None)
    return validate(with_legacy_defaults(raw))


def with_legacy_defaults(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A stored config.yaml with the :data:`LEGACY_DEFAULTS` it lacks filled in."""
    result = config_files.deep_copy(raw)
    for dotted, value in LEGACY_DEFAULTS.items():
        section, key = dotted.split(".")
        node = result.get(section)
        if isinstance(node, dict) and key not in node:
            node[key] = value
    return result


def keep_legacy_settings(config: TrainConfig, stored: Mapping[str, Any]) -> TrainConfig:
    """`config`, resuming the run whose config.yaml is `stored`, with the legacy values
    of keys the old file lacks and this config leaves unset (so an old run resumes on
    its own schedule rather than on a newer default)."""
    updates: dict[str, dict[str, Any]] = {}
    for dotted, value in LEGACY_DEFAULTS.items():
        section, key = dotted.split(".")
        old = stored.get(section)
        new_section = getattr(config, section)
        if isinstance(old, Mapping) and key not in old and key not in new_section.model_fields_set:
            updates.setdefault(section, {})[key] = value
    if not updates:
        return config
    sections = {
        section: getattr(config, section).model_copy(update=values)
        for section, values in updates.items()
    }
    return config.model_copy(update=sections)


def config_schema() -> dict[str, Any]:
    """The JSON schema of TrainConfig (what `llama-train config-schema` prints)."""
    return TrainConfig.model_json_schema()
