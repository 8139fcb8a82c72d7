"""A corpus: the readable files under a root (a file or a directory, local or in a pyarrow filesystem)
and their documents, in a stable order.

Files are listed sorted, hidden names skipped, files of other kinds listed as skipped; a symlink loop, a
FIFO or a device is an error named before anything is read. Each file is read by lmforge/data/formats.py.
A corpus is local by default; `open_corpus(root, fs)` reads it through a pyarrow filesystem instead (an
S3 prefix, for the Ray engine's tasks, which must not depend on one machine's disk).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.config import IngestConfig
from lmforge.data.formats import FORMATS, CorpusError, CorpusFile, Document, file_format, read_file_documents

if TYPE_CHECKING:
    from pyarrow.fs import FileSystem


@dataclass
class Corpus:
    """The readable files under a root, and what was skipped: the reader and the report both use it."""

    root: Path
    files: list[CorpusFile]
    skipped: list[str] = field(default_factory=list)  # files of other kinds, relative to the root

    def documents(self, cfg: IngestConfig) -> Iterator[Document]:
        """Every document, in a stable order (files sorted, documents in file order)."""
        for cf in self.files:
            cf.documents = 0
            for doc in read_file_documents(cf, cfg):
                cf.documents += 1
                yield doc

    def summary(self) -> dict:
        return {
            "files": [
                {"file": f.rel, "format": f.format, "layout": f.layout, "documents": f.documents}
                for f in self.files
            ],
            "skipped": self.skipped,
        }


def open_corpus(root: Path | str, fs: FileSystem | None = None) -> Corpus:
    """The corpus at root (a file or a directory), with clear errors for what cannot be read.

    With fs (a pyarrow filesystem), root is a path in it: "bucket/prefix" for S3."""
    if fs is not None:
        return _open_remote_corpus(str(root).rstrip("/"), fs)
    root = Path(root)
    if root.is_symlink() and not root.exists():
        raise CorpusError(f"{root}: broken symlink")
    if not root.exists():
        raise CorpusError(f"{root}: no such file or directory")
    if not root.is_dir():
        _require_regular_file(root)
        fmt = file_format(root.name)
        if fmt is None:
            raise CorpusError(f"{root}: unsupported file type; use one of {', '.join(FORMATS)}")
        return Corpus(root, [CorpusFile(root, root.name, fmt)])
    files, skipped = [], []
    for path in walk_files(root):
        rel = path.relative_to(root).as_posix()
        fmt = file_format(path.name)
        if fmt is None:
            skipped.append(rel)
        else:
            files.append(CorpusFile(path, rel, fmt))
    if not files:
        raise nothing_readable(root, skipped)
    return Corpus(root, files, skipped)


def nothing_readable(root: Path | str, skipped: list[str]) -> CorpusError:
    more = ", ..." if len(skipped) > 5 else ""
    what = f" (skipped: {', '.join(skipped[:5])}{more})" if skipped else ""
    return CorpusError(f"{root}: nothing readable; a corpus needs files of {', '.join(FORMATS)}{what}")


def _walk_order(rel: str) -> list[tuple[int, str]]:
    """os.walk's order as a sort key: a directory's files, then its subdirectories."""
    *dirs, name = rel.split("/")
    return [(1, d) for d in dirs] + [(0, name)]


def _open_remote_corpus(root: str, fs: FileSystem) -> Corpus:
    """The same listing as a local directory's (sorted, hidden names skipped), from a pyarrow filesystem."""
    import pyarrow as pa
    from pyarrow.fs import FileSelector, FileType

    try:
        top = fs.get_file_info(root)
        if top.type == FileType.File:
            entries = [top]
        else:
            entries = fs.get_file_info(FileSelector(root, recursive=True, allow_not_found=True))
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(f"{root}: cannot list ({exc})") from None
    files, skipped = [], []

    found = [e for e in entries if e.type == FileType.File]
    relative = {e.path: e.base_name if e.path == root else e.path[len(root) + 1 :] for e in found}
    for info in sorted(found, key=lambda e: _walk_order(relative[e.path])):
        rel = relative[info.path]
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        fmt = file_format(info.base_name)
        if fmt is None:
            skipped.append(rel)
        else:
            files.append(CorpusFile(info.path, rel, fmt, fs=fs, size=info.size))
    if not files:
        raise nothing_readable(root, skipped)
    return Corpus(Path(root), files, skipped)


def walk_files(root: Path) -> list[Path]:
    """Every non-hidden file under root, sorted; a symlink loop, a FIFO or a device is an error, named
    before anything is read (reading a FIFO would block forever)."""
    found, seen_dirs = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=_raise_walk_error):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop would otherwise walk forever
            raise CorpusError(f"{dirpath}: symlink loop (it points back to {real})")
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
    for path in found:
        _require_regular_file(path)
    return found


def _require_regular_file(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise CorpusError(f"{path}: cannot read ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        raise CorpusError(f"{path}: not a regular file")


def _raise_walk_error(exc: OSError) -> None:
    raise CorpusError(f"{exc.filename}: cannot read directory ({exc.strerror})")


def read_documents(root: Path, cfg: IngestConfig) -> Iterator[Document]:
    return open_corpus(root).documents(cfg)
