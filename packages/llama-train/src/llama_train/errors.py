"""The one exception type for user errors.

Library code raises :class:`LlamaTrainError` with a message that says what is
wrong and what to do; the CLI prints that message on one line and exits 1,
never a traceback. ``assert`` is kept for internal invariants only. Errors of
``gssm-data`` (a missing store, an unknown preset) are re-raised as this type
where llama-train calls into it, so the CLI has one type to catch.
"""


class LlamaTrainError(Exception):
    """A user-facing error: bad config, missing or corrupt store or checkpoint, full disk."""
