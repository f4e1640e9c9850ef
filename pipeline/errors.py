"""Errors the CLI turns into one clear line and exit code 2 (bad config, bad input file), and the
exit codes of `stgr build` / `stgr resume` in one place."""
from __future__ import annotations

#: Every unit committed and no stage reported its product unusable.
EXIT_OK = 0
#: A unit failed after its last attempt (or could not run because an input failed).
EXIT_FAILED_UNITS = 1
#: The config or an input file is unusable; nothing was written.
EXIT_USER_ERROR = 2
#: Every unit committed but a stage reported its product unusable (`StageReport.failure`: an empty dataset).
EXIT_UNUSABLE = 3
#: Interrupted (Ctrl-C, SIGINT): what committed stays committed; `stgr resume` continues.
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A mistake the user can fix (config, input file): reported in one line, exit 2, nothing written."""

    exit_code = EXIT_USER_ERROR


class ConfigError(UserError):
    """The build config is invalid; the message names the key."""


class InputError(UserError):
    """An input file is unusable as a whole; the message names the file and the position."""
