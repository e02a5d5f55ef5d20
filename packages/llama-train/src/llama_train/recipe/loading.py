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

from llama_train.core.budget import check_model_fits
from llama_train.core.checkpoint import CheckpointManager, CorruptCheckpointWarning
from llama_train.core.model import Llama, ModelConfig
from llama_train.core.rope import RopeScaling
from llama_train.core.weights import WEIGHTS_FILE, read_weights
from llama_train.errors import LlamaTrainError
from llama_train.recipe.train_config import TrainConfig, read_run_config
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


def check_weights_fit(weights: StoredWeights) -> None:
    """Refuse weights whose names or shapes are not those of their stored architecture.

    Export converts tensors without building a model, so a file whose header
    claims one architecture and whose tensors have another would otherwise be
    split along the wrong sizes (or not at all) and written as if sound. The
    expected shapes come from a model built on the meta device (no memory).
    """
    # Shapes do not depend on the rotary scaling, whose frequencies need real numbers.
    plain = weights.model_config.model_copy(update={"rope_scaling": RopeScaling()})
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Llama(plain).state_dict().items()}
    stored = {name: tuple(tensor.shape) for name, tensor in weights.state.items()}
    missing = sorted(expected.keys() - stored.keys())
    unexpected = sorted(stored.keys() - expected.keys())
    wrong = [name for name in expected if name in stored and stored[name] != expected[name]]
    if missing:
        problem = f"{missing[0]} is missing ({len(missing)} missing in all)"
    elif unexpected:
        problem = f"{unexpected[0]} is not a parameter of this architecture"
    elif wrong:
        name = wrong[0]
        problem = (
            f"{name} has shape {list(stored[name])}, the architecture needs {list(expected[name])}"
        )
    else:
        return
    raise LlamaTrainError(f"{weights.path} does not fit its own architecture: {problem}")


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
