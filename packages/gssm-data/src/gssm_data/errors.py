"""The one exception type for user errors.

Library code raises :class:`GssmDataError` with a message that says what is wrong
and what to do; the CLI prints that message on one line and exits 1, never a
traceback. ``assert`` is kept for internal invariants only.
"""


class GssmDataError(Exception):
    """A user-facing error: bad spec, missing or corrupt store, full disk."""
