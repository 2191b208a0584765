"""The one error type that means "the user's input is wrong".

A file, a flag, a config field, a mixture or a task that cannot be used raises :class:`BadInput` (or a subclass:
``ConfigError``, ``TaskError``, ``SpecError``) with a message that names what is wrong and where. The CLI prints
exactly these as one line and exits 2; any other exception is our bug or the environment's, and keeps its type
and the way to its traceback (``--debug``).
"""

from __future__ import annotations


class BadInput(ValueError):
    """The user's input is wrong; the message (one line) says what, where, and what to do.

    A ``ValueError``, so library callers that catch ``ValueError`` keep working.
    """
