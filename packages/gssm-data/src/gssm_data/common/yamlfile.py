"""Load a user's YAML file with bounded memory, bounded recursion and one-line errors.

``yaml.safe_load`` on whatever path a user names is not safe enough for a tool
people point at arbitrary files: ``/dev/zero`` or a FIFO is read without end, a
5000-deep ``[[[...]]]`` overflows the recursive composer (``RecursionError``),
``.nan`` slips into numeric fields, and the error messages span several lines.
This module puts every such case behind one :class:`GssmDataError` line that
names what was being loaded and where:

- the path must be an existing regular file (never a directory, device or FIFO;
  it is opened non-blocking and checked again on the open descriptor, so a
  file swapped for a FIFO after the check cannot block);
- at most ``max_bytes + 1`` bytes are ever read;
- the text must be UTF-8;
- nesting is measured on the parser's event stream (``yaml.parse``, an
  iterative state machine) *before* anything is composed, so a deep document
  is refused without recursing;
- syntax errors give line and column (1-based);
- no float in the result (values or keys) may be NaN or infinite;
- numbers are read as YAML 1.2 reads them (:class:`Loader`): ``1e5`` and
  ``3e-4`` are floats, not the strings PyYAML's YAML 1.1 rules make of them.

Otherwise the semantics are exactly ``yaml.safe_load``: no tags that build
Python objects, so loading never executes code. The module depends only on
PyYAML and the package's error type, so other packages may copy or import it.
"""

from __future__ import annotations

import math
import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from gssm_data.errors import GssmDataError

DEFAULT_MAX_BYTES = 1 << 20
DEFAULT_MAX_DEPTH = 64


class Loader(yaml.SafeLoader):
    """``SafeLoader`` with YAML 1.2 floats: `1e5` and `3e-4` are numbers, as people mean them.

    PyYAML follows YAML 1.1, where a float needs a dot (`1.0e5`), so `steps: 1e4`
    would arrive as the string "1e4". Plain data only, like ``safe_load``.
    """


Loader.add_implicit_resolver(
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


def load_yaml_file(
    path: str | os.PathLike[str],
    *,
    what: str,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> Any:
    """Read and parse one YAML file; ``what`` names it in errors ("graph file")."""
    path = Path(path)
    label = f"{what} {path}"
    data = read_bounded(path, label=label, max_bytes=max_bytes)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise GssmDataError(
            f"{label} is not UTF-8 text (invalid byte at offset {error.start})"
        ) from None
    return _load(text, label=label, max_depth=max_depth)


def load_yaml_text(text: str, *, what: str, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Parse YAML text already in memory; ``what`` names its origin in errors."""
    return _load(text, label=what, max_depth=max_depth)


def read_bounded(
    path: str | os.PathLike[str], *, label: str, max_bytes: int, kind: str = "YAML file"
) -> bytes:
    """At most ``max_bytes + 1`` bytes of a regular file, or one clear error.

    Any user-named file a command reads whole goes through here (``kind`` names
    it in errors: "prompt file"), so a device, FIFO or huge file costs nothing.
    """
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise GssmDataError(f"{label} not found") from None
    except OSError as error:
        raise GssmDataError(f"cannot read {label}: {error.strerror or error}") from None
    _check_kind(info, label=label, max_bytes=max_bytes, kind=kind)
    try:
        # O_NONBLOCK: if the path became a FIFO since the stat, open must not wait
        # for a writer; the fstat below then refuses it.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise GssmDataError(f"{label} not found") from None
    except OSError as error:
        raise GssmDataError(f"cannot read {label}: {error.strerror or error}") from None
    try:
        _check_kind(os.fstat(fd), label=label, max_bytes=max_bytes, kind=kind)
        chunks: list[bytes] = []
        size = 0
        while size <= max_bytes:
            chunk = os.read(fd, max_bytes + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as error:
        raise GssmDataError(f"cannot read {label}: {error.strerror or error}") from None
    finally:
        os.close(fd)
    if size > max_bytes:
        raise GssmDataError(_too_large(label, max_bytes, kind))
    return b"".join(chunks)


def _check_kind(info: os.stat_result, *, label: str, max_bytes: int, kind: str) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise GssmDataError(f"{label} is a directory, not a {kind}")
    if not stat.S_ISREG(info.st_mode):
        raise GssmDataError(f"{label} is not a regular file (a device, FIFO or socket)")
    if info.st_size > max_bytes:
        raise GssmDataError(_too_large(label, max_bytes, kind))


def _too_large(label: str, max_bytes: int, kind: str) -> str:
    return f"{label} is larger than the {max_bytes:,}-byte limit for a {kind}"


def _load(text: str, *, label: str, max_depth: int) -> Any:
    try:
        _check_depth(text, label=label, max_depth=max_depth)
        data = yaml.load(text, Loader=Loader)  # a SafeLoader: plain data only
    except yaml.MarkedYAMLError as error:
        raise GssmDataError(f"{label} is not valid YAML: {_describe(error)}") from None
    except yaml.YAMLError as error:
        raise GssmDataError(f"{label} is not valid YAML: {' '.join(str(error).split())}") from None
    _check_finite(data, label=label)
    return data


def _check_depth(text: str, *, label: str, max_depth: int) -> None:
    """Refuse nesting deeper than ``max_depth`` from the event stream alone.

    The parser is a state machine with an explicit stack, so this never
    recurses however deep the document; the composer that ``safe_load`` runs
    afterwards does recurse, and only ever sees documents that passed here.
    """
    depth = 0
    for event in yaml.parse(text, Loader=Loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > max_depth:
                mark = event.start_mark
                where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
                raise GssmDataError(
                    f"{label} nests deeper than {max_depth} levels{where}; "
                    "a configuration never needs that"
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _describe(error: yaml.MarkedYAMLError) -> str:
    """'<problem> at line L, column C' on one line (PyYAML marks are 0-based)."""
    mark = error.problem_mark or error.context_mark
    problem = error.problem or error.context or "syntax error"
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return " ".join(f"{problem}{where}".split())


def _check_finite(data: Any, *, label: str) -> None:
    """Refuse NaN and infinities anywhere (keys too), without recursion.

    Anchors and aliases make the result a graph that can share nodes or even
    contain itself; each container is visited once, so neither a cycle nor an
    alias "bomb" costs more than the document's own size.
    """
    seen: set[int] = set()
    pending: list[tuple[Any, str]] = [(data, "")]
    while pending:
        value, where = pending.pop()
        if isinstance(value, float):
            if not math.isfinite(value):
                at = f" at {where}" if where else ""
                raise GssmDataError(
                    f"{label}: non-finite number {value}{at}; every number must be finite"
                )
        elif isinstance(value, dict | list | tuple | set | frozenset):
            if id(value) in seen:
                continue
            seen.add(id(value))
            if isinstance(value, dict):
                for key, item in value.items():
                    child = f"{where}.{key}" if where else str(key)
                    pending.append((key, where))
                    pending.append((item, child))
            else:
                for index, item in enumerate(value):
                    pending.append((item, f"{where}[{index}]"))
