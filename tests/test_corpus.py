"""The corpus reader: every format and layout, cut sensibly, streamed, with clear errors.

The English text is real: Python's own bundled documentation (pydoc_data), which every machine has.
The Chinese text is real too: lines of Tang poems and the Thousand Character Classic.
"""

import gzip
import json
import os
from pathlib import Path
from pydoc_data.topics import topics

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lmforge.config import IngestConfig
from lmforge.data.corpus import open_corpus, read_documents
from lmforge.data.formats import CorpusError, bounded_lines, cut_point, detect_layout, pack_paragraphs

from .conftest import POEM_LINES

CFG = IngestConfig(doc_chars=400)
ENGLISH = "\n\n".join(topics[k] for k in sorted(topics)[:12])  # real multi-paragraph English
POEMS = POEM_LINES[:5]
QIANZIWEN = "天地玄黄宇宙洪荒日月盈昃辰宿列张寒来暑往秋收冬藏闰余成岁律吕调阳云腾致雨露结为霜金生丽水玉出昆冈"


def english_paragraphs() -> list[str]:
    """The paragraphs of ENGLISH, by a split independent of the reader's."""
    paras = [p.strip("\n") for p in ENGLISH.split("\n\n")]
    return [p for p in paras if p.strip() and all(line.strip() for line in p.split("\n"))]


def texts(path: Path, cfg: IngestConfig = CFG) -> list[str]:
    return [d.text for d in read_documents(path, cfg)]


def squash(text: str) -> str:
    return "".join(text.split())


# ---------------------------------------------------------------------------------------------
# text layouts


def test_blank_lines_made_of_spaces_separate_paragraphs(tmp_path):
    """WikiText's layout: its paragraph breaks are lines holding one space."""
    paras = english_paragraphs()[:40]
    (tmp_path / "wiki.txt").write_text("\n \n".join(paras) + "\n \n")
    docs = texts(tmp_path / "wiki.txt")
    assert len(docs) > 5 and all(len(d) <= 400 for d in docs)
    # every short paragraph is whole in exactly one document; none is split across two
    whole = [p for p in paras if len(p) <= 400]
    assert all(sum(p in d.split("\n\n") for d in docs) == 1 for p in whole)
    assert squash("".join(docs)) == squash("".join(paras))  # nothing lost, nothing invented


def test_long_paragraph_is_cut_at_line_boundaries():
    lines = [f"line {i} of one long paragraph with no blank line" for i in range(40)]
    docs = list(pack_paragraphs(iter(lines), doc_chars=200))
    assert all(len(d) <= 200 for d in docs) and len(docs) == 10
    assert "\n".join(docs).split("\n") == lines  # cut between lines, never inside one


def test_paragraphs_are_packed_up_to_doc_chars():
    paras = [f"paragraph {i} " + "x" * 40 for i in range(5)]  # 52 chars each
    lines = [line for p in paras for line in (p, " ")]
    assert list(pack_paragraphs(iter(lines), doc_chars=120)) == [
        "\n\n".join(paras[0:2]),
        "\n\n".join(paras[2:4]),
        paras[4],
    ]
    assert list(pack_paragraphs(iter(["", " \t", "\u3000"]), doc_chars=100)) == []


def test_one_document_per_line_is_detected_and_can_be_forced(tmp_path):
    lines = [p.replace("\n", " ") for p in english_paragraphs()[:30]]
    (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n\n")  # a trailing blank line is no break
    assert detect_layout(tmp_path / "lines.txt") == "lines"
    corpus = open_corpus(tmp_path)
    docs = [d.text for d in corpus.documents(IngestConfig(doc_chars=100_000))]
    assert docs == lines
    assert corpus.summary()["files"] == [
        {"file": "lines.txt", "format": ".txt", "layout": "lines", "documents": 30}
    ]
    packed = texts(tmp_path, IngestConfig(doc_chars=100_000, txt_layout="paragraphs"))
    assert len(packed) < 30  # the same file, forced to paragraphs: lines packed together
    (tmp_path / "prose.txt").write_text(ENGLISH)
    assert detect_layout(tmp_path / "prose.txt") == "paragraphs"


def test_a_single_5mb_line_is_cut_at_whitespace(tmp_path):
    words = squash(ENGLISH)  # no whitespace at all in here
    line = " ".join(words[i : i + 7] for i in range(0, len(words), 7))
    line = ((line + " ") * (5_000_000 // len(line) + 1)).rstrip()
    (tmp_path / "one_line.txt").write_text(line)
    docs = texts(tmp_path / "one_line.txt", IngestConfig(doc_chars=4000))
    assert len(docs) > 1000 and all(3000 < len(d) <= 4000 for d in docs[:-1])
    assert all(not d.startswith(" ") and not d.endswith(" ") for d in docs)  # cut at a space
    assert " ".join(docs) == line.strip()  # only the spaces at the cuts are gone


def test_chinese_without_spaces_is_cut_between_characters(tmp_path):
    text = "".join(POEMS) * 200 + QIANZIWEN * 50  # one line, no whitespace
    (tmp_path / "zh.txt").write_text(text)
    docs = texts(tmp_path / "zh.txt", IngestConfig(doc_chars=1000))
    assert [len(d) for d in docs[:-1]] == [1000] * (len(text) // 1000)
    assert "".join(docs) == text


def test_cut_point_prefers_whitespace_in_the_second_half():
    assert cut_point("aaaa bbbb cccc", 12) == 10
    assert cut_point("a bbbbbbbbbbbbbbbb", 12) == 12  # the only space is too early
    assert cut_point("天地玄黄　宇宙洪荒", 6) == 5  # an ideographic space is whitespace too


def test_bounded_lines_streams_in_pieces(tmp_path):
    import io

    stream = io.StringIO("short\n" + " ".join(["word"] * 1000) + "\n\nend")
    lines = list(bounded_lines(stream, 100))
    assert lines[0] == "short" and lines[-2:] == ["", "end"]
    assert all(len(line) <= 100 for line in lines)
    assert " ".join(lines[1:-2]) == " ".join(["word"] * 1000)


# ---------------------------------------------------------------------------------------------
# formats


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def test_every_format_in_one_directory(tmp_path):
    records = [{"id": i, "content": p, "meta": {"dynasty": "tang"}} for i, p in enumerate(POEMS)]
    (tmp_path / "a.txt").write_text(ENGLISH[:3000])
    (tmp_path / "b.md.gz").write_bytes(gzip.compress(b"# Title\n\nA markdown paragraph.\n"))
    (tmp_path / "c.jsonl").write_bytes(jsonl(records[:2]))
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(jsonl(records[2:3])))
    (tmp_path / "e.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl(records[3:])))
    (tmp_path / "f.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(QIANZIWEN.encode()))
    pq.write_table(
        pa.table({"content": ["parquet one", None, "parquet two"], "n": [1, 2, 3]}), tmp_path / "g.parquet"
    )
    (tmp_path / "notes.csv").write_text("a,b\n")
    (tmp_path / "img.png").write_bytes(b"\x89PNG")
    corpus = open_corpus(tmp_path)
    cfg = IngestConfig(doc_chars=400, text_field="content")
    docs = list(corpus.documents(cfg))
    by_file = {}
    for d in docs:
        by_file.setdefault(d.source.split("#")[0], []).append(d.text)
    assert by_file["c.jsonl"] == POEMS[:2] and by_file["d.jsonl.gz"] == POEMS[2:3]
    assert by_file["e.jsonl.zst"] == POEMS[3:]
    assert by_file["b.md.gz"] == ["# Title\n\nA markdown paragraph."]
    assert by_file["f.txt.zst"] == [QIANZIWEN]
    assert by_file["g.parquet"] == ["parquet one", "", "parquet two"]  # a null is an empty document
    assert squash("".join(by_file["a.txt"])) == squash(ENGLISH[:3000])
    assert corpus.skipped == ["img.png", "notes.csv"]
    assert [f["format"] for f in corpus.summary()["files"]] == [
        ".txt", ".md.gz", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".txt.zst", ".parquet"
    ]  # fmt: skip


def test_parquet_with_a_content_field_is_streamed_in_batches(tmp_path):
    rows = [f"{POEMS[i % 5]} {i}" for i in range(5000)]
    pq.write_table(pa.table({"content": rows}), tmp_path / "poems.parquet", row_group_size=700)
    docs = list(read_documents(tmp_path, IngestConfig(text_field="content")))
    assert [d.text for d in docs] == rows and docs[4999].source == "poems.parquet#4999"
    with pytest.raises(CorpusError, match=r"poems.parquet: no 'text' column \(its columns: content\)"):
        list(read_documents(tmp_path, IngestConfig()))
    categorical = pa.array(["a", "b", "a"]).dictionary_encode()  # how pandas writes a category column
    pq.write_table(pa.table({"content": categorical}), tmp_path / "poems.parquet")
    assert texts(tmp_path, IngestConfig(text_field="content")) == ["a", "b", "a"]
    lines = pa.array([POEMS[:2], None, POEMS[2:3]], pa.list_(pa.string()))
    pq.write_table(pa.table({"content": lines}), tmp_path / "poems.parquet")
    assert texts(tmp_path, IngestConfig(text_field="content")) == ["\n".join(POEMS[:2]), "", POEMS[2]]
    pq.write_table(pa.table({"content": [1, 2]}), tmp_path / "poems.parquet")
    with pytest.raises(CorpusError, match="column 'content' must hold strings, it holds int64"):
        list(read_documents(tmp_path, IngestConfig(text_field="content")))


def test_jsonl_text_field_and_bad_records_name_file_and_line(tmp_path):
    (tmp_path / "c.jsonl").write_bytes(
        jsonl([{"content": "ok", "other": 1}, {"content": None}, {"content": POEMS[:2]}])
    )
    # null is an empty document; a list of lines (how some poetry datasets store a poem) is joined
    assert texts(tmp_path, IngestConfig(text_field="content")) == ["ok", "", "\n".join(POEMS[:2])]
    (tmp_path / "c.jsonl").write_bytes(jsonl([{"content": "ok", "other": 1}, {"body": "x"}]))
    with pytest.raises(
        CorpusError, match=r"c.jsonl:2: JSONL record has no 'content' field \(its fields: body\)"
    ):
        texts(tmp_path, IngestConfig(text_field="content"))
    with pytest.raises(CorpusError, match="set ingest.text_field"):
        texts(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": 42}\n', "c.jsonl:1: 'text' must be a string, got int"),
        ('{"text": ["a", 1]}\n', "c.jsonl:1: 'text' must be a string, got list"),
        ('{"text": "ok"}\n{"text": "trunc', "c.jsonl:2: not valid JSON"),
        ('["a list"]\n', "c.jsonl:1: JSONL record has no 'text' field"),
    ],
)
def test_malformed_jsonl(tmp_path, content, message):
    (tmp_path / "c.jsonl").write_text(content)
    with pytest.raises(CorpusError, match=message.replace("(", r"\(").replace(")", r"\)")):
        texts(tmp_path)


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst", ".txt.gz", ".txt.zst"])
def test_truncated_compressed_file_is_refused_not_half_read(tmp_path, suffix):
    data = jsonl([{"text": ENGLISH[i : i + 500]} for i in range(0, 60_000, 500)])
    packed = gzip.compress(data) if suffix.endswith(".gz") else zstandard.ZstdCompressor().compress(data)
    (tmp_path / f"c{suffix}").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(CorpusError, match=rf"c{suffix}: truncated or corrupt {suffix} file"):
        texts(tmp_path)


def test_a_file_that_is_not_what_its_name_says_is_refused(tmp_path):
    (tmp_path / "c.jsonl.gz").write_bytes(b'{"text": "plain JSONL, not gzip"}\n')
    with pytest.raises(
        CorpusError, match=r"c.jsonl.gz: truncated or corrupt .jsonl.gz file \(Not a gzipped file"
    ):
        texts(tmp_path)


def test_truncated_parquet_is_refused(tmp_path):
    pq.write_table(pa.table({"text": POEMS * 100}), tmp_path / "p.parquet")
    data = (tmp_path / "p.parquet").read_bytes()
    (tmp_path / "p.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorpusError, match="p.parquet: not a readable Parquet file"):
        texts(tmp_path)


def test_invalid_utf8_is_flagged_per_document(tmp_path):
    good = english_paragraphs()[:3]
    (tmp_path / "l1.txt").write_bytes(
        "\n\n".join(good).encode()
        + "\n\ncaf\xe9 cr\xe8me".encode("latin-1")
        + b"\n\n"
        + good[0][::-1].encode()
    )
    docs = list(read_documents(tmp_path, IngestConfig(doc_chars=100_000, txt_layout="lines")))
    assert [d.text for d in docs if not d.utf8_ok] == ["caf\ufffd cr\ufffdme"]  # only that line is flagged
    assert len(docs) > 3
    with_bom = tmp_path / "bom"
    with_bom.mkdir()
    (with_bom / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + jsonl([{"text": "after a byte-order mark"}]))
    assert texts(with_bom) == ["after a byte-order mark"]


def test_unreadable_sources_are_clear(tmp_path):
    with pytest.raises(CorpusError, match="no such file or directory"):
        open_corpus(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="nothing readable"):
        open_corpus(tmp_path / "empty")
    (tmp_path / "only_other").mkdir()
    (tmp_path / "only_other" / "x.pdf").write_bytes(b"%PDF")
    with pytest.raises(CorpusError, match=r"nothing readable.*\(skipped: x.pdf\)"):
        open_corpus(tmp_path / "only_other")
    with pytest.raises(CorpusError, match="x.pdf: unsupported file type"):
        open_corpus(tmp_path / "only_other" / "x.pdf")
    loop = tmp_path / "loop"
    loop.mkdir()
    (loop / "a.txt").write_text("hello")
    os.symlink(loop, loop / "again")
    with pytest.raises(CorpusError, match="symlink loop"):
        open_corpus(loop)
    (tmp_path / "big.txt").write_text("x" * 200)
    with pytest.raises(CorpusError, match="over ingest.max_file_bytes"):
        texts(tmp_path / "big.txt", IngestConfig(max_file_bytes=100))
