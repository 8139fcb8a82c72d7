"""Ingest: a source (builtin, a local file or dir, or s3://bucket/prefix) -> the corpus in data/.

The corpus format is plain files: `.txt` and `.md` are cut into documents at blank lines, and each line of
a `.jsonl` file is one document with a string `text` field. `read_documents` is the one reader that
validate and preprocess share, so what is validated is exactly what is trained on.

A new corpus is staged next to data/, validated there, and only then swapped in: bad input never
replaces a good corpus.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import IngestConfig

CORPUS_SUFFIXES = (".txt", ".md", ".jsonl")


class CorpusError(ValueError):
    """A corpus that cannot be read at all: missing, empty, unreadable, or malformed JSONL."""


@dataclass(frozen=True)
class Document:
    source: str  # "relative/path.txt#3": the file and the document's index in it
    text: str
    utf8_ok: bool  # False when the file had bytes that are not UTF-8 (they were replaced by U+FFFD)


def corpus_files(root: Path) -> list[Path]:
    """The corpus files under root (or root itself), sorted, with clear errors for what cannot be read."""
    if root.is_symlink() and not root.exists():
        raise CorpusError(f"{root}: broken symlink")
    if not root.exists():
        raise CorpusError(f"{root}: no such file or directory")
    if not root.is_dir():
        _require_regular_file(root)
        if root.suffix not in CORPUS_SUFFIXES:
            raise CorpusError(
                f"{root}: unsupported file type {root.suffix!r}; use one of {', '.join(CORPUS_SUFFIXES)}"
            )
        return [root]
    files, seen_dirs = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=_raise_walk_error):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop would otherwise walk forever
            raise CorpusError(f"{dirpath}: symlink loop (it points back to {real})")
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [
            Path(dirpath, f)
            for f in sorted(filenames)
            if f.endswith(CORPUS_SUFFIXES) and not f.startswith(".")
        ]
    if not files:
        raise CorpusError(f"{root}: no {', '.join(CORPUS_SUFFIXES)} files in this directory")
    for path in files:
        _require_regular_file(path)
    return files


def _require_regular_file(path: Path) -> None:
    """A symlink loop, a dangling link, a FIFO or a device is named here, before anything is copied:
    reading a FIFO would block forever."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise CorpusError(f"{path}: cannot read ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        raise CorpusError(f"{path}: not a regular file")


def _raise_walk_error(exc: OSError) -> None:
    raise CorpusError(f"{exc.filename}: cannot read directory ({exc.strerror})")


def _read_text(path: Path, max_bytes: int) -> tuple[str, bool]:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise CorpusError(f"{path}: {size:,} bytes is over ingest.max_file_bytes ({max_bytes:,})")
        raw = path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return raw.decode("utf-8"), True
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), False


def split_paragraphs(text: str, doc_chars: int) -> list[str]:
    """Cut text at blank lines into documents of about doc_chars; one paragraph is never split."""
    docs, current, size = [], [], 0
    for para in text.replace("\r\n", "\n").split("\n\n"):
        if not para.strip():
            continue
        if current and size + len(para) > doc_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        docs.append("\n\n".join(current))
    return docs


def _jsonl_documents(path: Path, text: str) -> Iterator[str]:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(
                f"{path}:{lineno}: not valid JSON ({exc.msg}); the file may be truncated"
            ) from None
        if not isinstance(record, dict) or "text" not in record:
            raise CorpusError(f"{path}:{lineno}: JSONL record has no 'text' field")
        if not isinstance(record["text"], str):
            raise CorpusError(
                f"{path}:{lineno}: 'text' must be a string, got {type(record['text']).__name__}"
            )
        yield record["text"]


def read_documents(root: Path, cfg: IngestConfig) -> Iterator[Document]:
    """Every document of the corpus at root, in a stable order."""
    base = root if root.is_dir() else root.parent
    for path in corpus_files(root):
        text, utf8_ok = _read_text(path, cfg.max_file_bytes)
        rel = path.relative_to(base).as_posix()
        texts = (
            _jsonl_documents(path, text) if path.suffix == ".jsonl" else split_paragraphs(text, cfg.doc_chars)
        )
        for i, doc in enumerate(texts):
            yield Document(source=f"{rel}#{i}", text=doc, utf8_ok=utf8_ok)


# ---------------------------------------------------------------------------------------------
# the builtin corpus: Python's own documentation, always present, built the same way every time


def write_builtin_corpus(dest: Path) -> None:
    """Build it in a fresh, isolated interpreter: docstrings of C modules depend on what else a process
    has imported or patched (Prefect does), and the dataset md5 must not."""
    script = Path(__file__).with_name("builtin_corpus.py")
    result = subprocess.run(
        [sys.executable, "-I", "-S", str(script), str(dest)], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise CorpusError(f"building the builtin corpus failed:\n{result.stderr[-2000:]}")


# ---------------------------------------------------------------------------------------------
# fetching a source into a staging directory, then swapping it in


def fetch_source(source: str, dest: Path, cfg: IngestConfig, storage=None) -> None:
    """Copy the corpus named by source into dest (an empty directory)."""
    if source == "builtin":
        write_builtin_corpus(dest / "builtin")
    elif source.startswith("s3://"):
        from pipeline.storage import download_prefix

        if storage is None:
            raise CorpusError("an s3:// source needs the storage config")
        download_prefix(source, dest, *storage)
    else:
        src = Path(source).expanduser()
        for path in corpus_files(src):  # validates the source before anything is copied
            rel = path.relative_to(src) if src.is_dir() else Path(path.name)
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest / rel)
    corpus_files(dest)  # an s3 prefix or directory with nothing usable in it fails here


def stage_corpus(source: str, data_dir: Path, cfg: IngestConfig, storage=None) -> Path:
    """Fetch the source into a fresh staging dir beside data_dir (same filesystem, so the swap is a rename)."""
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".data-staging-", dir=data_dir.parent))
    try:
        fetch_source(source, staging, cfg, storage)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def swap_in(staging: Path, data_dir: Path) -> None:
    """Replace data_dir by staging with renames only, so a crash leaves either the old or the new corpus."""
    old = data_dir.with_name(f".data-old-{os.getpid()}")
    if data_dir.exists():
        os.replace(data_dir, old)
    os.replace(staging, data_dir)
    shutil.rmtree(old, ignore_errors=True)


def same_tree(a: Path, b: Path) -> bool:
    """True when the two directories hold the same files with the same bytes."""
    if not b.is_dir():
        return False
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all(filecmp.cmp(a / rel, b / rel, shallow=False) for rel in files_a)


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def champion_chars(ws, params) -> int | None:
    """How many characters the champion was trained on (its record keeps the validation stats), or None
    when there is no champion, the record predates the stats, or the shrink guard is off."""
    if params.validation.min_fraction_of_champion <= 0:
        return None
    from pipeline.registry import read_champion

    champion = read_champion(params.storage, ws.state) or {}
    return (champion.get("data_stats") or {}).get("total_chars")


def ingest(source: str, ws, params, on_line=print) -> str:
    """source -> staged -> validated -> data/ -> `dvc add data`; returns the dataset md5.

    A source that fails validation (including the shrink guard against the champion's corpus) is
    discarded before data/ is touched.
    """
    from pipeline.validate import format_failure, validate_corpus
    from pipeline.versioning import data_md5, dvc

    reference = champion_chars(ws, params)
    staging = stage_corpus(source, ws.data, params.ingest, (params.storage, ws.state))
    try:
        if same_tree(staging, ws.data) and data_md5(ws.root):
            # The corpus in data/ passed this suite when it came in, and the validate stage re-checks it
            # whenever the validation params change: a scheduled rerun on unchanged data skips GE here.
            on_line("source unchanged: data/ already holds exactly this corpus")
            return data_md5(ws.root)
        report = validate_corpus(staging, params, champion_chars=reference)
        if not report.success:
            raise CorpusError(
                f"source {source} failed validation; data/ is unchanged\n{format_failure(report)}"
            )
        swap_in(staging, ws.data)
    finally:
        discard(staging)
    dvc(["add", "--quiet", "data"], ws.root, on_line)
    return data_md5(ws.root)
