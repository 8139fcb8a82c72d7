"""Writes that a reader (DVC, a dashboard, the next stage, another process) sees whole or not at all:
a file written beside its destination and renamed over it, and a directory built aside and swapped in."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO]:
    """A file to write path's new content into; it replaces path when the block ends without an error,
    and is removed when it does not."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_open(path) as fh:
        fh.write(text)


def replace_dir(staged: Path, final: Path) -> None:
    """A directory built whole beside final takes its place with renames only, so a crash leaves the old
    directory or the new one: the old one is renamed aside first (a directory cannot be renamed over a
    non-empty one), and removed last."""
    old = final.with_name(f".{final.name}-old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    shutil.rmtree(old, ignore_errors=True)
