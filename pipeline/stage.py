"""The one wrapper every stage's main() goes through (the DVC stages: `python -m pipeline.<stage>`).

An expected failure (an LmforgeError: bad params, a bad corpus, a missing input, S3 down, a failed
command) ends with `error: <what to do>` on stderr and its exit code, never a traceback. A traceback
means a bug.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from infra.errors import LmforgeError

MISSING_INPUT_EXIT = 2


def run_stage(name: str, body: Callable[[], int | None]) -> int:
    """Run body; its return value (None for 0) is the exit code unless it raised an expected failure."""
    try:
        return body() or 0
    except LmforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except FileNotFoundError as exc:  # an input an earlier stage writes: say which, and what to run
        print(f"error: {exc.filename or exc}: not found; run the stages before {name} (dvc repro {name})",
              file=sys.stderr)  # fmt: skip
        return MISSING_INPUT_EXIT
