"""The one error base. Every failure lmforge expects (bad input, a server that is down, a failed
command) is an LmforgeError; its exit_code is what the command exits with, and its message is all
the user needs, so it is printed without a traceback (see pipeline.stage.run_stage and the CLI)."""

from __future__ import annotations


class LmforgeError(Exception):
    """An expected failure, said so that a user knows what to do."""

    exit_code = 1


class UsageError(LmforgeError):
    """A bad param, argument or request: fix the input and run again."""

    exit_code = 2
