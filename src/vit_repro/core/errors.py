"""Errors caused by the user's input or environment: the CLI prints their one-line message and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or an unusable environment; the message names the problem and the fix.

    Every module's own error class subclasses this one, so the command line needs to know only it.
    """

    exit_code = 2


class Interrupted(BaseException):
    """Raised from SIGTERM so that a run ends as KILLED, like Ctrl-C."""
