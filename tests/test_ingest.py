"""The corpus reader, the builtin corpus, and the staged swap into data/."""

import hashlib
import json
import os

import pytest

from pipeline.config import IngestConfig
from pipeline.ingest import (
    CorpusError,
    read_documents,
    split_paragraphs,
    stage_corpus,
    swap_in,
    write_builtin_corpus,
)

CFG = IngestConfig(doc_chars=100)


def test_split_paragraphs_groups_at_blank_lines_up_to_doc_chars():
    paras = [f"paragraph {i} " + "x" * 40 for i in range(5)]
    docs = split_paragraphs("\n\n".join(paras) + "\n\n\n", doc_chars=120)
    assert docs == ["\n\n".join(paras[0:2]), "\n\n".join(paras[2:4]), paras[4]]
    assert split_paragraphs("one giant line " * 100, doc_chars=100) == ["one giant line " * 100]
    assert split_paragraphs(" \n\n \t\n", doc_chars=100) == []


def test_reads_txt_md_and_jsonl_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("beta one " * 10 + "\n\n" + "beta two " * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.md").write_text("# alpha")
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"text": "gamma", "id": 1}) + "\n\n" + json.dumps({"text": "delta"}) + "\n"
    )
    (tmp_path / "ignored.csv").write_text("x,y")
    docs = list(read_documents(tmp_path, IngestConfig(doc_chars=100)))
    assert [(d.source, d.text) for d in docs] == [
        ("b.txt#0", "beta one " * 10),
        ("b.txt#1", "beta two " * 10),
        ("c.jsonl#0", "gamma"),
        ("c.jsonl#1", "delta"),
        ("sub/a.md#0", "# alpha"),
    ]
    assert all(d.utf8_ok for d in docs)


def test_latin1_is_flagged_not_fatal(tmp_path):
    (tmp_path / "l1.txt").write_bytes("café crème".encode("latin-1"))
    [doc] = read_documents(tmp_path, CFG)
    assert not doc.utf8_ok and "\ufffd" in doc.text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\n{"txt": "no text field"}\n', "c.jsonl:2: JSONL record has no 'text' field"),
        ('{"text": 42}\n', "c.jsonl:1: 'text' must be a string, got int"),
        ('{"text": "ok"}\n{"text": "trunc', "c.jsonl:2: not valid JSON"),
        ('["a list"]\n', "c.jsonl:1: JSONL record has no 'text' field"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    (tmp_path / "c.jsonl").write_text(content)
    with pytest.raises(CorpusError, match=message.replace("(", r"\(").replace(")", r"\)")):
        list(read_documents(tmp_path, CFG))


def test_unreadable_sources_are_clear(tmp_path):
    with pytest.raises(CorpusError, match="no such file or directory"):
        list(read_documents(tmp_path / "missing", CFG))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match=r"no \.txt, \.md, \.jsonl files"):
        list(read_documents(tmp_path / "empty", CFG))
    (tmp_path / "x.pdf").write_bytes(b"%PDF")
    with pytest.raises(CorpusError, match="unsupported file type '.pdf'"):
        list(read_documents(tmp_path / "x.pdf", CFG))
    loop = tmp_path / "loop"
    loop.mkdir()
    (loop / "a.txt").write_text("hello")
    os.symlink(loop, loop / "again")
    with pytest.raises(CorpusError, match="symlink loop"):
        list(read_documents(loop, CFG))
    (tmp_path / "big.txt").write_text("x" * 200)
    with pytest.raises(CorpusError, match="over ingest.max_file_bytes"):
        list(read_documents(tmp_path / "big.txt", IngestConfig(max_file_bytes=100)))


def test_builtin_corpus_is_deterministic_and_about_4mb(tmp_path):
    write_builtin_corpus(tmp_path / "one")
    write_builtin_corpus(tmp_path / "two")
    digest = lambda d: {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}  # noqa: E731
    assert digest(tmp_path / "one") == digest(tmp_path / "two")
    assert sorted(digest(tmp_path / "one")) == ["extensions.jsonl", "stdlib.jsonl", "topics.jsonl"]
    docs = list(read_documents(tmp_path / "one", IngestConfig()))
    chars = sum(len(d.text) for d in docs)
    assert 3_000_000 < chars < 6_000_000
    assert len(docs) > 500 and len({d.text for d in docs}) == len(docs)  # exact duplicates were dropped
    assert any(d.source.startswith("topics.jsonl") and "for" in d.text for d in docs)


def test_failed_fetch_leaves_data_untouched(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "old.txt").write_text("the good corpus")
    with pytest.raises(CorpusError, match="no such file"):
        stage_corpus(str(tmp_path / "nope"), data, CFG)
    assert (data / "old.txt").read_text() == "the good corpus"
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no staging dir left behind


def test_swap_in_replaces_the_whole_directory(tmp_path):
    src = tmp_path / "src.txt"
    src.write_text("new corpus")
    data = tmp_path / "data"
    data.mkdir()
    (data / "old.txt").write_text("old corpus")
    staging = stage_corpus(str(src), data, CFG)
    swap_in(staging, data)
    assert [p.name for p in data.iterdir()] == ["src.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "src.txt"]
