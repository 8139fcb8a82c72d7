"""One corpus file in a format people have -> its documents, streamed.

One reader for ingest, validate and preprocess, so what is validated is exactly what is trained on.

Formats (by file name; a directory may mix them, and files of other kinds are listed as skipped):
  .txt .md           text, cut into documents by the layout below
  .jsonl             one JSON object per line, the document in `ingest.text_field` (other fields are allowed;
                     a list of strings is joined line by line)
  .parquet           the `ingest.text_field` column, read in record batches
  + .gz / .zst       gzip or zstd compression of the text formats (.txt.gz, .jsonl.zst, ...)

Text layouts (`ingest.txt_layout`):
  paragraphs  a blank line (one holding only whitespace) ends a paragraph; paragraphs are packed into
              documents of at most `ingest.doc_chars`, and a longer paragraph is cut at line boundaries
  lines       every non-blank line is one document
  auto        lines when the first MiB of a file has several lines and no blank one, else paragraphs
A line longer than doc_chars is cut at whitespace, or between characters for scripts written without
spaces (Chinese, Japanese). Nothing is ever read whole: memory stays flat however large a file is.

With `ingest.format: chat`, each .jsonl line or .parquet row is one conversation (lmforge/data/chat.py): the
document's text is the record as JSON, parsed by validation, which drops the records it cannot use.

Invalid UTF-8 becomes U+FFFD, and the document is flagged (`utf8_ok`), so validation can name the file.

A file is local, or a path in a pyarrow filesystem (`CorpusFile.fs`).
"""

from __future__ import annotations

import gzip
import io
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from infra.errors import LmforgeError
from lmforge.config import IngestConfig

if TYPE_CHECKING:
    from pyarrow.fs import FileSystem

TEXT_FORMATS = (".txt", ".md")
COMPRESSIONS = (".gz", ".zst")
FORMATS = tuple([f + c for f in (*TEXT_FORMATS, ".jsonl") for c in ("", *COMPRESSIONS)] + [".parquet"])
DETECT_CHARS = 1 << 20  # how much of a text file `auto` looks at to pick its layout
PARQUET_BATCH_ROWS = 1024
# Lone surrogates from the `surrogateescape` decoder: the bytes of a file that were not UTF-8.
_ESCAPED_BYTES = re.compile("[\udc80-\udcff]")


class CorpusError(LmforgeError, ValueError):
    """A corpus that cannot be read: missing, nothing readable, undecodable or truncated, malformed records."""


@dataclass(frozen=True)
class Document:
    source: str  # "relative/path.txt#3": the file and the document's index in it
    text: str
    utf8_ok: bool = True  # False when the document held bytes that are not UTF-8 (now U+FFFD)


@dataclass
class CorpusFile:
    path: Path | str  # a local path, or a path in fs
    rel: str  # the path relative to the corpus root, as reports name it
    format: str  # one of FORMATS
    layout: str | None = None  # text files: the layout used (after `auto`)
    documents: int = 0  # filled in while reading
    fs: FileSystem | None = None  # None: the local disk
    size: int | None = None  # bytes, when the listing said

    def open_raw(self) -> BinaryIO:
        if self.fs is None:
            return Path(self.path).open("rb", buffering=1 << 20)
        return self.fs.open_input_stream(str(self.path), compression=None, buffer_size=1 << 20)

    def open_random_access(self):  # Parquet reads its footer first
        return Path(self.path).open("rb") if self.fs is None else self.fs.open_input_file(str(self.path))

    def byte_size(self) -> int:
        return Path(self.path).stat().st_size if self.size is None else self.size


def file_format(name: str) -> str | None:
    """The corpus format a file name says (".jsonl.gz", ".parquet", ...), or None for other files."""
    lower = name.lower()
    return next((f for f in sorted(FORMATS, key=len, reverse=True) if lower.endswith(f)), None)


# ---------------------------------------------------------------------------------------------
# bytes: plain, gzip or zstd, with truncation reported as such


class _ZstdReader(io.RawIOBase):
    """A zstd stream of one or more frames; a stream that ends inside a frame is an error (zstandard's own
    stream_reader just stops, which would silently train on half a file)."""

    def __init__(self, raw: BinaryIO):
        import zstandard

        self._raw, self._dctx, self._error = raw, zstandard.ZstdDecompressor(), zstandard.ZstdError
        self._obj, self._buffer, self._in_frame = self._dctx.decompressobj(), b"", False

    def readable(self) -> bool:
        return True

    def readinto(self, out) -> int:
        while not self._buffer:
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise EOFError("the zstd stream ends inside a frame (truncated)")
                return 0
            while chunk:
                try:
                    self._buffer += self._obj.decompress(chunk)
                except self._error as exc:
                    raise EOFError(f"corrupt zstd data ({exc})") from None
                self._in_frame = not self._obj.eof
                chunk = self._obj.unused_data if self._obj.eof else b""
                if self._obj.eof:
                    self._obj = self._dctx.decompressobj()
        n = min(len(out), len(self._buffer))
        out[:n], self._buffer = self._buffer[:n], self._buffer[n:]
        return n


def _open_bytes(cf: CorpusFile) -> BinaryIO:
    if cf.format.endswith(".gz"):
        return gzip.open(cf.open_raw(), "rb")
    if cf.format.endswith(".zst"):
        return io.BufferedReader(_ZstdReader(cf.open_raw()), buffer_size=1 << 20)
    return cf.open_raw()


def _open_text(cf: CorpusFile) -> io.TextIOWrapper:
    # utf-8-sig: a byte-order mark is not text. surrogateescape keeps the bytes that are not UTF-8 visible
    # (as lone surrogates) so that a document can say it held some, then they become U+FFFD.
    return io.TextIOWrapper(_open_bytes(cf), encoding="utf-8-sig", errors="surrogateescape")


def _repair(text: str) -> tuple[str, bool]:
    """(text with undecodable bytes as U+FFFD, whether it had any)."""
    if text.isascii() or _ESCAPED_BYTES.search(text) is None:  # isascii is O(1) in CPython
        return text, True
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), False


def read_file_documents(cf: CorpusFile, cfg: IngestConfig) -> Iterator[Document]:
    """One file's documents, in file order; a text file's layout is set on cf."""
    if cfg.max_file_bytes is not None and cf.byte_size() > cfg.max_file_bytes:
        raise CorpusError(
            f"{cf.rel}: {cf.byte_size():,} bytes is over ingest.max_file_bytes ({cfg.max_file_bytes:,})"
        )
    if cfg.format == "chat" and not cf.format.startswith((".jsonl", ".parquet")):
        raise CorpusError(
            f"{cf.rel}: ingest.format=chat reads conversations from .jsonl or .parquet records, not {cf.format} text"
        )
    if cf.format == ".parquet":
        reader = _parquet_records(cf) if cfg.format == "chat" else _parquet_documents(cf, cfg)
    elif cf.format.startswith(".jsonl"):
        reader = _jsonl_documents(cf, cfg)
    else:
        reader = _text_documents(cf, cfg)
    try:
        yield from reader
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:  # BadGzipFile is an OSError: caught first
        raise CorpusError(f"{cf.rel}: truncated or corrupt {cf.format} file ({exc})") from None
    except OSError as exc:
        raise CorpusError(f"{cf.rel}: cannot read ({exc.strerror or exc})") from None


# ---------------------------------------------------------------------------------------------
# records: JSONL and Parquet


def _jsonl_documents(cf: CorpusFile, cfg: IngestConfig) -> Iterator[Document]:
    key = cfg.text_field
    with _open_text(cf) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            line, utf8_ok = _repair(line)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(
                    f"{cf.rel}:{lineno}: not valid JSON ({exc.msg}); the file may be truncated"
                ) from None
            if cfg.format == "chat":  # the record whole: validation judges it as a conversation
                yield Document(f"{cf.rel}#{lineno - 1}", line.strip(), utf8_ok)
                continue
            if not isinstance(record, dict) or key not in record:
                fields = f" (its fields: {', '.join(sorted(record)[:8])})" if isinstance(record, dict) else ""
                raise CorpusError(
                    f"{cf.rel}:{lineno}: JSONL record has no {key!r} field{fields}; "
                    "set ingest.text_field to the field that holds the text"
                )
            text = record[key]
            if text is None:
                text = ""  # an empty record: skipped like a blank line
            elif isinstance(text, list) and all(isinstance(line, str) for line in text):
                text = "\n".join(text)  # a poem's or a dialogue's lines, as some datasets store them
            if not isinstance(text, str):
                raise CorpusError(f"{cf.rel}:{lineno}: {key!r} must be a string, got {type(text).__name__}")
            yield Document(f"{cf.rel}#{lineno - 1}", text, utf8_ok)


def _parquet_documents(cf: CorpusFile, cfg: IngestConfig) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    key = cfg.text_field
    try:
        pf = pq.ParquetFile(cf.open_random_access())
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(f"{cf.rel}: not a readable Parquet file ({exc})") from None
    schema = pf.schema_arrow
    if key not in schema.names:
        raise CorpusError(
            f"{cf.rel}: no {key!r} column (its columns: {', '.join(schema.names[:8])}); "
            "set ingest.text_field to the column that holds the text"
        )
    kind = schema.field(key).type
    if pa.types.is_dictionary(kind):  # pandas writes a categorical column so
        kind = kind.value_type
    lines = pa.types.is_list(kind) or pa.types.is_large_list(kind)  # a poem's lines, say: joined
    if lines:
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise CorpusError(f"{cf.rel}: column {key!r} must hold strings, it holds {schema.field(key).type}")
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[key]):
            for text in batch.column(0).to_pylist():
                text = "\n".join(t for t in text if t is not None) if lines and text else text
                yield Document(f"{cf.rel}#{row}", text or "")
                row += 1
    except pa.ArrowException as exc:
        raise CorpusError(f"{cf.rel}: truncated or corrupt Parquet data ({exc})") from None


def _parquet_records(cf: CorpusFile) -> Iterator[Document]:
    """Each row as a JSON record (conversations: a messages column of structs, or prompt and completion)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(cf.open_random_access())
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(f"{cf.rel}: not a readable Parquet file ({exc})") from None
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for record in batch.to_pylist():
                yield Document(f"{cf.rel}#{row}", json.dumps(record, ensure_ascii=False, default=str))
                row += 1
    except pa.ArrowException as exc:
        raise CorpusError(f"{cf.rel}: truncated or corrupt Parquet data ({exc})") from None


# ---------------------------------------------------------------------------------------------
# text: lines -> paragraphs -> documents


def cut_point(text: str, limit: int) -> int:
    """Where to cut a line longer than limit: after the last whitespace in its first limit characters,
    or at limit when there is none in the second half (scripts written without spaces)."""
    for i in range(limit - 1, limit // 2 - 1, -1):
        if text[i].isspace():
            return i + 1
    return limit


def bounded_lines(fh: io.TextIOBase, limit: int) -> Iterator[str]:
    """Lines without their newline, each at most limit characters: a longer line is cut at whitespace
    (see cut_point). Reads at most limit characters at a time."""
    carry = ""
    while True:
        piece = fh.readline(limit)
        text = carry + piece
        whole = piece.endswith("\n") or not piece
        if whole:
            text = text.removesuffix("\n")
        while len(text) > limit or (not whole and len(text) == limit):
            cut = cut_point(text, limit)
            yield text[:cut].rstrip()
            text = text[cut:]
        if not whole:
            carry = text
            continue
        if text or piece:
            yield text
        if not piece:
            return
        carry = ""


def detect_layout(cf: CorpusFile | Path) -> str:
    """lines when the first MiB holds several lines and none is blank, else paragraphs."""
    if not isinstance(cf, CorpusFile):
        cf = CorpusFile(cf, Path(cf).name, file_format(Path(cf).name) or ".txt")
    with _open_text(cf) as fh:
        head = fh.read(DETECT_CHARS)
    lines = head.split("\n")
    if len(head) == DETECT_CHARS:
        lines = lines[:-1]  # the last one is cut short
    while lines and not lines[-1].strip():
        lines.pop()  # trailing newlines are not paragraph breaks
    if len(lines) >= 2 and all(line.strip() for line in lines):
        return "lines"
    return "paragraphs"


def pack_paragraphs(lines: Iterator[str], doc_chars: int) -> Iterator[str]:
    """Paragraphs (separated by blank lines) packed into documents of at most doc_chars; a paragraph
    longer than that is cut at line boundaries. Lines must be at most doc_chars long."""
    doc: list[str] = []  # whole paragraphs of the document being built
    doc_len = 0
    para: list[str] = []  # lines of the paragraph being read
    para_len = 0
    for line in chain(lines, [""]):
        if line.strip():
            if para and para_len + 1 + len(line) > doc_chars:  # too long for any document: cut it here
                if doc:
                    yield "\n\n".join(doc)
                    doc, doc_len = [], 0
                yield "\n".join(para)
                para, para_len = [], 0
            para_len += len(line) + (1 if para else 0)
            para.append(line)
            continue
        if not para:
            continue
        if doc and doc_len + 2 + para_len > doc_chars:
            yield "\n\n".join(doc)
            doc, doc_len = [], 0
        doc_len += para_len + (2 if doc else 0)
        doc.append("\n".join(para))
        para, para_len = [], 0
    if doc:
        yield "\n\n".join(doc)


def _text_documents(cf: CorpusFile, cfg: IngestConfig) -> Iterator[Document]:
    cf.layout = detect_layout(cf) if cfg.txt_layout == "auto" else cfg.txt_layout
    with _open_text(cf) as fh:
        lines = bounded_lines(fh, cfg.doc_chars)
        if cf.layout == "lines":
            docs = (line for line in lines if line.strip())
        else:
            docs = pack_paragraphs(lines, cfg.doc_chars)
        for i, raw in enumerate(docs):  # undecodable bytes ride along as surrogates until here
            text, utf8_ok = _repair(raw)
            yield Document(f"{cf.rel}#{i}", text, utf8_ok)
