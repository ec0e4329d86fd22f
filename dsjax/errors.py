"""Errors that are the user's to fix: a flag, a config field, a file, a checkpoint. The experiment scripts print
them as one line and exit with status 2 (`report_user_errors`); anything else keeps its traceback, since it is ours.
"""

from __future__ import annotations

import contextlib
import sys


class UserError(ValueError):
    """Bad input: the message names the flag, config field, file, tensor or shape and says what to do."""


class ConfigError(UserError):
    """A config field or flag with a value the run cannot use."""


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete or corrupt (the message names the step and what is wrong)."""


@contextlib.contextmanager
def report_user_errors():
    """Around a script's main: a UserError becomes `error: <message>` on stderr and exit status 2."""
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
