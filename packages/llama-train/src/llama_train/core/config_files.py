"""Configuration files: YAML loading, `key.sub=value` overrides, key checks, validation.

Generic over the pydantic model of the whole config (the recipe's `TrainConfig`,
the launcher's `SubmitConfig`), so every command reads configs the same way.

Precedence, lowest first: field defaults < the YAML file < command-line
overrides (`key.sub=value`, the value parsed as YAML, so `optim.lr=3e-4`,
`train.compile=true` and `optim.betas=[0.9,0.95]` all work). Every key is
checked against the schema before validation, so a typo is an error that names
the closest real keys rather than a silently ignored setting.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from gssm_data.common.humanize import format_validation_error
from gssm_data.common.yamlfile import Loader as YamlLoader
from llama_train.core.plain_text import visible
from llama_train.errors import LlamaTrainError
from llama_train.rundir import load_yaml

Config = TypeVar("Config", bound=BaseModel)

# ---------------------------------------------------------------------------
# Loading and overrides


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=YamlLoader)  # a SafeLoader: plain data only


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
        _check_nesting(value_text, key)
        value = _parse_yaml(value_text) if value_text.strip() else None
    except yaml.YAMLError:
        # Not valid YAML (e.g. an unquoted `a: b`): take it as the literal string.
        value = value_text
    return parts, value


_MAX_NESTING = 64  # as for config files (gssm_data.common.yamlfile)


def _check_nesting(text: str, key: str) -> None:
    """Refuse a deeply nested value from the parser's events, before the recursive composer."""
    depth = 0
    for event in yaml.parse(text, Loader=YamlLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > _MAX_NESTING:
                raise LlamaTrainError(
                    f"override {key}: the value nests deeper than {_MAX_NESTING} levels"
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def apply_overrides(
    raw: Mapping[str, Any], overrides: Iterable[str], model: type[BaseModel]
) -> dict[str, Any]:
    """A copy of `raw` with each `key.sub=value` set; keys not in `model` name close matches."""
    result = deep_copy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        check_key(parts, model)
        try:
            set_dotted(result, parts, value)
        except LlamaTrainError as error:
            raise LlamaTrainError(f"override {text!r}: {error}") from None
    return result


def set_dotted(raw: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set `a.b.c` (given as its parts) in a nested mapping, making missing sections.

    The one way a dotted key reaches a config (overrides, sweep points); a
    section that holds a plain value is an error rather than silently replaced.
    """
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise LlamaTrainError(f"{'.'.join(parts[: depth + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def flatten_keys(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {dotted key: leaf value}, in order: how configs are compared."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_keys(value, name + "."))
        else:
            flat[name] = value
    return flat


def deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a nested mapping whose sections can be changed without touching `raw`."""
    return {
        key: deep_copy(value) if isinstance(value, Mapping) else value for key, value in raw.items()
    }


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


def known_keys(model: type[BaseModel]) -> list[str]:
    """Every dotted key of the schema (sections and leaves), for messages and docs."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        keys.append(name)
        section = _section_model(field.annotation)
        if section is not None:
            keys.extend(f"{name}.{sub}" for sub in known_keys(section))
    return keys


def check_key(parts: list[str], model: type[BaseModel]) -> None:
    """Raise a user error naming `parts` and close matches when the key is not in the schema."""
    root = model
    for depth, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            prefix = ".".join(parts[:depth])
            key = ".".join(parts)
            candidates = [f"{prefix}.{name}" if prefix else name for name in fields]
            raise LlamaTrainError(_unknown_key_message(key, candidates, prefix, root))
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


def _unknown_key_message(
    key: str, candidates: list[str], prefix: str, root: type[BaseModel]
) -> str:
    # Siblings first (a typo in the last part), then anywhere (a misspelt section).
    close = difflib.get_close_matches(key, candidates, n=2, cutoff=0.6) or (
        difflib.get_close_matches(key, known_keys(root), n=2, cutoff=0.6)
    )
    if close:
        return f"unknown config key {key!r}; did you mean {' or '.join(map(repr, close))}?"
    where = f"section {prefix!r}" if prefix else "the top level"
    names = ", ".join(candidate.rsplit(".", 1)[-1] for candidate in candidates)
    return f"unknown config key {key!r}; {where} has: {names}"


def check_keys(
    raw: Mapping[str, Any],
    model: type[BaseModel],
    prefix: tuple[str, ...] = (),
    root: type[BaseModel] | None = None,
) -> None:
    """Check every key of a raw (YAML) mapping against the schema, with suggestions.

    `model` is the section `raw` belongs to, at `prefix` under `root` (the whole schema).
    """
    root = root or model
    for key, value in raw.items():
        parts = [*prefix, str(key)]
        check_key(parts, root)
        field = model.model_fields[str(key)]
        section = _section_model(field.annotation)
        if section is not None and isinstance(value, Mapping):
            check_keys(value, section, tuple(parts), root)


# ---------------------------------------------------------------------------
# Precedence and validation


def merge_sources(
    path: str | Path | None, overrides: Iterable[str], model: type[BaseModel]
) -> dict[str, Any]:
    """The raw config: the YAML file at `path` (optional) with `overrides` applied on top.

    Every key of both is checked against `model` (with suggestions); values are
    validated later, once the caller has filled in what it derives.
    """
    raw = load_yaml(path) if path is not None else {}
    check_keys(raw, model)
    return apply_overrides(raw, overrides, model)


def reject_non_finite(raw: Any, prefix: str = "") -> None:
    """Refuse NaN and infinities anywhere in a raw config (YAML `.nan`, `lr=.inf`, `1e999`).

    No setting means anything with them, and most would fail late or silently
    (a NaN learning rate trains nothing; a NaN in a sweep list names a point).
    """
    if isinstance(raw, Mapping):
        children = [(f"{prefix}.{key}" if prefix else str(key), item) for key, item in raw.items()]
    elif isinstance(raw, list | tuple):
        children = [(f"{prefix}[{index}]", value) for index, value in enumerate(raw)]
    else:
        return
    for where, value in children:
        if isinstance(value, float) and not math.isfinite(value):
            raise LlamaTrainError(f"{where}: {value} is not a finite number")
        reject_non_finite(value, where)


_SEPARATOR = "\u241e"  # joins problems until keys are made printable (a key may hold a newline)


def invalid_config(error: ValidationError, prefix: str = "") -> str:
    """`invalid config: key: problem` on one line, or a line per problem when there are several.

    Control characters in keys are spelled as escapes, so a message is never
    broken (or forged) by the input it reports.
    """
    problems = [
        visible(line)
        for line in format_validation_error(error, prefix=prefix, separator=_SEPARATOR).split(
            _SEPARATOR
        )
    ]
    if len(problems) == 1:
        return f"invalid config: {problems[0]}"
    return "invalid config:\n" + "\n".join(problems)


def validate(raw: Mapping[str, Any], model: type[Config]) -> Config:
    """Validate a raw mapping as `model`; errors become one line per field."""
    reject_non_finite(raw)
    check_keys(raw, model)
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise LlamaTrainError(invalid_config(error)) from None
