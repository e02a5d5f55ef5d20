"""Numbers and validation errors as people type and read them.

Shared by both packages' command lines and configs (llama-train imports it), so a
count is spelled the same way everywhere and every invalid setting reads the same.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Annotated

from pydantic import BeforeValidator, ValidationError

from gssm_data.errors import GssmDataError

_COUNT_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


def parse_count(value: object, *, option: str = "--n", minimum: int = 0) -> int:
    """A whole count as people type it: 100000, 100_000, 1e8, 2.5e6, 2.5M, 10k.

    YAML reads ``1e5`` as a string and command-line values arrive as text, so
    sizes can be written the way people say them. `option` names the setting in
    the message; a count below `minimum` is refused.
    """
    subject = f"{option} {value!r}" if option else repr(value)
    if isinstance(value, bool):
        raise GssmDataError(f"{subject} is not a count; write e.g. 100000, 100_000, 1e8 or 2.5M")
    if isinstance(value, int):
        number = Decimal(value)
    else:
        text = str(value).strip().replace("_", "").replace(",", "")
        scale = 1
        if text and text[-1].lower() in _COUNT_SUFFIXES:
            scale, text = _COUNT_SUFFIXES[text[-1].lower()], text[:-1]
        try:
            number = Decimal(text) * scale
        except InvalidOperation:
            raise GssmDataError(
                f"{subject} is not a count; write e.g. 100000, 100_000, 1e8 or 2.5M"
            ) from None
    if not number.is_finite() or number != number.to_integral_value():
        raise GssmDataError(f"{subject} is not a whole number")
    if number < minimum:
        bound = "must not be negative" if minimum == 0 else f"must be at least {minimum}"
        raise GssmDataError(f"{subject} {bound}")
    return int(number)


def as_count(value: object) -> object:
    """:func:`parse_count` for a config field: at least 1, None passed on (an optional count).

    A ValueError, so pydantic reports it under the field's dotted key like any other.
    """
    if value is None:
        return None
    try:
        return parse_count(value, option="", minimum=1)
    except GssmDataError as error:
        raise ValueError(str(error)) from None


# The one type of a count in a config (steps, tokens, sequences, parameters): a positive
# int that may be written 100_000, 1e5, 2.5M or 16k (YAML reads 1e5 as a string).
Count = Annotated[int, BeforeValidator(as_count)]


def format_si(value: float) -> str:
    """A rate or size in three significant characters: 12.3k, 4.5M, 1.2G."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def format_validation_error(error: ValidationError, prefix: str = "", separator: str = "; ") -> str:
    """One `key: message (got value)` entry per problem, keys dotted like overrides.

    `prefix` is prepended to every key (a section validated on its own);
    `separator` joins the entries (one line, or one per line).
    """
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
    return separator.join(dict.fromkeys(lines))


def _is_type_tag(part: object) -> bool:
    # Union members show up in error locations as type names (`int`, `function-after[...]`).
    return isinstance(part, str) and (
        part in {"int", "float", "str", "bool", "none", "list", "dict"} or "[" in part
    )


def format_duration(seconds: float) -> str:
    """A rough duration for people: "40 s", "3 min", "1.5 h"."""
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
