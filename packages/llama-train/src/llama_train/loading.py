"""Load a trained model from a run directory without unpickling anything.

`load_model` is how evaluation, export, probing and generation get a model:
it picks a checkpoint by reading ``meta.json`` (JSON) and checking every
file's sha256, then builds the model from ``model.safetensors`` (the
architecture in its header, the weights as raw arrays). Neither read can run
code, so a run directory received from someone else is safe to evaluate or
export. Resuming training is the only path that reads the DCP payload, through
the restricted reader of :mod:`llama_train.core.dcp_reader`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from llama_train.config import TrainConfig, read_run_config
from llama_train.core.budget import check_model_fits
from llama_train.core.checkpoint import CheckpointManager, CorruptCheckpointWarning
from llama_train.core.model import Llama, ModelConfig
from llama_train.core.weights import WEIGHTS_FILE, read_weights
from llama_train.errors import LlamaTrainError
from llama_train.rundir import CHECKPOINT_DIR


class OlderCheckpointError(LlamaTrainError):
    """A checkpoint written before checkpoints carried safetensors weights."""


@dataclass(frozen=True)
class StoredWeights:
    """One checkpoint's weights as read from its safetensors file."""

    step: int
    path: Path
    model_config: ModelConfig
    state: dict[str, torch.Tensor]


def read_checkpoint_weights(run_dir: str | Path, checkpoint: int | None = None) -> StoredWeights:
    """The weights of checkpoint `checkpoint` (default: the newest sound one) of a run.

    A checkpoint whose files fail their checksums is skipped with a warning
    when none was asked for; one written before checkpoints carried
    safetensors weights is refused with what to do.
    """
    run_dir = Path(run_dir)
    manager = CheckpointManager(run_dir / CHECKPOINT_DIR, keep=None)
    if checkpoint is not None:
        return _read(manager, checkpoint)
    steps = manager.steps()
    if not steps:
        raise LlamaTrainError(f"{run_dir} has no checkpoint yet; train it first")
    problems = []
    for step in reversed(steps):
        try:
            return _read(manager, step)
        except OlderCheckpointError:
            raise  # not damage: an older one would be just as old
        except LlamaTrainError as error:
            problems.append(str(error))
            warnings.warn(
                f"{error}; trying the previous one", CorruptCheckpointWarning, stacklevel=2
            )
    raise LlamaTrainError(f"no usable checkpoint in {run_dir}: {'; '.join(problems)}")


def _read(manager: CheckpointManager, step: int) -> StoredWeights:
    meta = manager.verified_meta(step)
    folder = manager.folder(step)
    if WEIGHTS_FILE not in meta.get("files", {}):
        raise OlderCheckpointError(
            f"checkpoint {folder} has no {WEIGHTS_FILE} (written by an older llama-train); "
            "resume the run once with this version to write one, or use another checkpoint"
        )
    state, raw_config = read_weights(folder / WEIGHTS_FILE)
    try:
        model_config = ModelConfig.model_validate(raw_config)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise LlamaTrainError(
            f"{folder / WEIGHTS_FILE}: stored architecture is invalid ({where}: {first['msg']})"
        ) from None
    return StoredWeights(step, folder / WEIGHTS_FILE, model_config, state)


def build_model(weights: StoredWeights, device: str | torch.device = "cpu") -> Llama:
    """A Llama of the stored architecture holding the stored weights (eval mode)."""
    check_model_fits(weights.model_config, device=torch.device(device))
    model = Llama(weights.model_config)
    try:
        model.load_state_dict(weights.state)
    except RuntimeError as error:
        raise LlamaTrainError(
            f"{weights.path} does not fit its own architecture: {str(error).splitlines()[0]}"
        ) from None
    return model.to(device).eval()


def load_model(
    run_dir: str | Path, checkpoint: int | None = None, *, device: str | torch.device = "cpu"
) -> tuple[Llama, TrainConfig]:
    """The model of a run's checkpoint (the newest sound one by default) and the run's config.

    The returned config is the run's `config.yaml` with its `model` section
    replaced by the architecture stored with the weights (the two agree unless
    the file was edited). Never unpickles anything; see the module docstring.
    """
    config = read_run_config(run_dir)
    weights = read_checkpoint_weights(run_dir, checkpoint)
    model = build_model(weights, device)
    return model, config.model_copy(update={"model": weights.model_config})
