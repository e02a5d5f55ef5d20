"""`gssm-data generate`, `info`, `verify`, `presets`."""

from gssm_data.cli.app import app  # noqa: F401
