"""User-facing errors: one clear message, exit code 2, no traceback.

Anything raised as `UserError` is a mistake the user can fix (bad config, bad data, a
missing file). Every other exception is a bug in lorafit or a library and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix. `str(err)` is the whole message shown to them."""

    exit_code = 2

    def __init__(self, message: str, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(message if not fix else f"{message}\n  fix: {fix}")


class ConfigError(UserError):
    """A config field has a wrong name, type, value or combination."""


class DataError(UserError):
    """A dataset cannot be read, parsed or trained on."""
