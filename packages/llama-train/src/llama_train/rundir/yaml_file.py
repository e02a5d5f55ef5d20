"""YAML mappings from a user's file: the run's `config.yaml` and every config a user passes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gssm_data import GssmDataError
from gssm_data.common.yamlfile import load_yaml_file
from llama_train.errors import LlamaTrainError


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from a user's file; anything wrong is a one-line user error.

    gssm_data.common.yamlfile does the reading: a regular file of at most 1 MB (never a
    directory or /dev/zero), UTF-8, nesting at most 64 deep, finite numbers,
    plain data only, and `1e4` / `3e-4` read as floats, as overrides read them.
    The run's own `config.yaml` and every config a user passes are read this way.
    """
    try:
        data = load_yaml_file(path, what="config file")
    except GssmDataError as error:
        raise LlamaTrainError(str(error)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LlamaTrainError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data
