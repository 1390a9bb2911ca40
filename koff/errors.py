"""One error family: every refusal koff makes is a ``KoffError``.

The CLI catches this one type and prints its message on one line, without a traceback; anything
else that escapes is a bug in koff. ``UserInputError`` marks a bad value, file or folder that the
user gave; it is also a ``ValueError``, so code that caught ``ValueError`` before keeps working.
"""

from __future__ import annotations


class KoffError(Exception):
    """A refusal with a message a user can act on."""


class UserInputError(KoffError, ValueError):
    """A bad value, file or folder given by the user (a flag, a config entry, a request field)."""


class MissingFileError(UserInputError, FileNotFoundError):
    """A file or folder the user named does not exist."""
