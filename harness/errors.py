"""User-facing errors.

Every error a user can cause (a typo in a method name, a missing data file, a corrupt image) is raised as a
`HarnessError` whose message is one line that says what is wrong and how to fix it. The CLI prints that line
and exits with code 2; it never prints a traceback for these, and never deletes results already written.
"""

from __future__ import annotations


class HarnessError(Exception):
    """An error caused by user input; the message is a single line naming the fix."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))  # force one line


class UnknownNameError(HarnessError):
    """A method, task, model or option name that is not registered."""


class DataError(HarnessError):
    """A missing, malformed or corrupt data file."""


class ModelError(HarnessError):
    """A model path or checkpoint that cannot be used."""
