"""Model weights as safetensors: the part of a checkpoint anyone may open safely.

Every checkpoint holds, beside the DCP payload that resumes training, the full
model weights in ``model.safetensors`` (written by rank 0, inside the
checkpoint's temporary folder, so it is published atomically and checksummed
with the rest). Its header carries the model's architecture as JSON. The
safetensors format is a JSON header and raw little-endian arrays: reading it
cannot execute code, whoever wrote the file, which is why evaluation, export
and every other read-only use of a run directory go through this file and
never through the pickled DCP metadata.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llama_train.errors import LlamaTrainError

WEIGHTS_FILE = "model.safetensors"
_CONFIG_KEY = "model_config"
_FORMAT_KEY = "llama_train_weights"
_FORMAT_VERSION = "1"


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU, on rank 0 (collective; other ranks get {}).

    Gathers FSDP shards; a plain or DDP model is simply copied. Keys are
    parameter names, as `Llama.state_dict()` has them.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def write_weights(
    path: Path, state: Mapping[str, torch.Tensor], model_config: Mapping[str, Any]
) -> None:
    """Write `state` and the architecture to `path` (safetensors) and make it durable.

    Tied matrices (the embedding shared with the output projection) are stored
    under both names as separate copies: safetensors refuses shared storage,
    and a reader then needs no knowledge of which names are tied.
    """
    tensors = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in state.items()}
    metadata = {
        _FORMAT_KEY: _FORMAT_VERSION,
        _CONFIG_KEY: json.dumps(dict(model_config), sort_keys=True),
    }
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as error:  # an I/O failure (a full disk) is an OSError here
        code = re.search(r"\(os error (\d+)\)", str(error))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
    with open(path, "rb") as file:
        os.fsync(file.fileno())
    give_usual_permissions(path)


def give_usual_permissions(path: Path) -> None:
    """The mode an ordinary new file gets (0666 less the umask); safetensors writes 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights and the architecture (a ModelConfig dict) stored in `path`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise LlamaTrainError(f"{path} is not a readable weights file: {error}") from None
    if metadata.get(_FORMAT_KEY) != _FORMAT_VERSION or _CONFIG_KEY not in metadata:
        raise LlamaTrainError(f"{path} was not written by llama-train (no model architecture)")
    try:
        model_config = json.loads(metadata[_CONFIG_KEY])
    except ValueError:
        raise LlamaTrainError(f"{path}: the stored model architecture is not JSON") from None
    if not isinstance(model_config, dict):
        raise LlamaTrainError(f"{path}: the stored model architecture is not a mapping")
    return state, model_config
