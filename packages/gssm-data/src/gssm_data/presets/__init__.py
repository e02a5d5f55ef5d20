"""Named graph presets shipped with the package (one YAML file each)."""

from __future__ import annotations

from importlib import resources

import yaml

from gssm_data.errors import GssmDataError
from gssm_data.graph import GraphSpec, parse_graph


def _preset_files() -> dict[str, resources.abc.Traversable]:
    folder = resources.files(__package__)
    return {
        entry.name.removesuffix(".yaml"): entry
        for entry in folder.iterdir()
        if entry.name.endswith(".yaml")
    }


def preset_names() -> list[str]:
    """Names of the shipped presets, sorted."""
    return sorted(_preset_files())


def load_preset(name: str) -> GraphSpec:
    """The graph of a named preset; an unknown name lists the known ones."""
    files = _preset_files()
    if name not in files:
        raise GssmDataError(f"unknown preset {name!r}; known presets: {', '.join(sorted(files))}")
    return parse_graph(yaml.safe_load(files[name].read_text()), source=f"preset {name}")
