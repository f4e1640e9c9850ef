"""Errors the CLI turns into one clear line and exit code 2 (bad config, bad input file)."""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (config, input file): reported in one line, exit 2, nothing written."""

    exit_code = 2


class ConfigError(UserError):
    """The build config is invalid; the message names the key."""


class InputError(UserError):
    """An input file is unusable as a whole; the message names the file and the position."""
