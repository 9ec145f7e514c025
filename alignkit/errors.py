"""User-facing errors.

Every mistake a user can make (bad data, bad config, bad path) raises a subclass of ``UserError``
carrying a one-paragraph message: what is wrong, where (file, line, field), and what to do. The CLI
prints the message without a traceback (unless ``--debug``) and exits with a non-zero code.
Programming errors stay ordinary exceptions and keep their tracebacks.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input; printed without a traceback."""

    exit_code = 2


class ConfigError(UserError):
    """A config key, value, preset or cross-field rule is wrong (raised at compose time)."""


class DataError(UserError):
    """A data file or record is malformed.

    ``location`` is ``file:line`` (or ``file:record N``), ``field`` the offending field.
    """

    def __init__(self, message: str, *, location: str | None = None, field: str | None = None):
        self.location = location
        self.field = field
        self.detail = message
        prefix = ""
        if location:
            prefix += f"{location}: "
        if field:
            prefix += f"{field}: "
        super().__init__(prefix + message)


class ModelLoadError(UserError):
    """A model path, hub id or file cannot be loaded."""
