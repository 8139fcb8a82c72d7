"""The serving package's one error base. The CLI prints these like its own expected failures: the
message says what to fix (this package imports nothing outside itself, so it has its own base)."""

from __future__ import annotations


class ServingError(ValueError):
    """A request, a setting or a key the service cannot use as given; the message says why."""

    exit_code = 2
