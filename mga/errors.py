"""The project's own errors: failures a user can act on, reported by the command line as one line.

`mga/` and `pipelines/` both derive their error types from these (no torch, no Ray here);
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class MGAError(Exception):
    """A failure whose message says what to change: an input, a setting, a URI, a file."""


class InputError(MGAError, ValueError):
    """A bad argument, setting or input file, named in the message (still a ValueError to Python callers)."""


class MissingInput(MGAError, FileNotFoundError):
    """A file or directory the user named that does not exist (still a FileNotFoundError to Python callers)."""
