"""The installed version of a distribution, for `--version` and the manifest.

A leaf that imports nothing of either package, so both command lines answer
`--version` without loading their commands (numpy, zarr, torch).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version(distribution: str) -> str:
    """The installed version of a distribution (0+unknown when run from a bare source tree)."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "0+unknown"
