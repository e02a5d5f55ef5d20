"""`gssm-data entropy`, `calibrate`, `scaling`."""

from gssm_data.cli.app import app  # noqa: F401
