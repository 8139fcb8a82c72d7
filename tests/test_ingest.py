"""The builtin corpus, and the staged swap into data/ (the reader itself: test_corpus.py)."""

import hashlib

import pytest

from infra.atomic import replace_dir
from lmforge.config import IngestConfig
from lmforge.data.corpus import read_documents
from lmforge.data.documents import paragraphs
from lmforge.data.formats import CorpusError
from pipeline.ingest import stage_corpus, write_builtin_corpus

CFG = IngestConfig(doc_chars=100)


@pytest.mark.slow  # over 30 s on a loaded 2-core machine
def test_builtin_corpus_is_deterministic_and_about_4mb(tmp_path):
    write_builtin_corpus(tmp_path / "one")
    write_builtin_corpus(tmp_path / "two")
    digest = lambda d: {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}  # noqa: E731
    assert digest(tmp_path / "one") == digest(tmp_path / "two")
    assert sorted(digest(tmp_path / "one")) == ["extensions.jsonl", "stdlib.jsonl", "topics.jsonl"]
    docs = list(read_documents(tmp_path / "one", IngestConfig()))
    chars = sum(len(d.text) for d in docs)
    assert 2_000_000 < chars < 4_000_000
    assert len(docs) > 500 and len({d.text for d in docs}) == len(docs)  # exact duplicates were dropped
    # deduplicated at the source down to the paragraph: no paragraph occurs twice, so none can be in two
    # splits (the stdlib repeats inherited docstrings in many places)
    paras = [" ".join(p.split()) for d in docs for p in paragraphs(d.text)]
    assert len(paras) > 5000 and len(set(paras)) == len(paras)
    assert any(d.source.startswith("topics.jsonl") and "for" in d.text for d in docs)


@pytest.mark.slow  # two builds in isolated interpreters
def test_builtin_chat_corpus_is_deterministic_and_passes_its_own_validation(tmp_path):
    """`--source builtin-chat`: the same bytes every time, thousands of conversations of every shape, none
    dropped by validation, none the start of another, and no answer given twice (no leak across splits)."""
    import json

    from lmforge.params_file import resolve_params
    from pipeline.validate import validate_corpus

    write_builtin_corpus(tmp_path / "one", "builtin-chat")
    write_builtin_corpus(tmp_path / "two", "builtin-chat")
    one = (tmp_path / "one" / "conversations.jsonl").read_bytes()
    assert one == (tmp_path / "two" / "conversations.jsonl").read_bytes()
    conversations = [json.loads(line)["messages"] for line in one.decode().splitlines()]
    assert len(conversations) > 3000
    multi_turn = sum(sum(x["role"] == "user" for x in m) > 1 for m in conversations)
    assert multi_turn > 1000 and sum(m[0]["role"] == "system" for m in conversations) > 500
    serialized = {json.dumps(m) for m in conversations}
    assert not any(json.dumps(m[:n]) in serialized for m in conversations for n in range(1, len(m)))
    firsts = [next(x["content"] for x in m if x["role"] == "assistant") for m in conversations]
    assert len(set(firsts)) == len(firsts)
    report = validate_corpus(tmp_path / "one", resolve_params({}, ["ingest.format=chat"]))
    assert report.success and report.stats["kept_documents"] == len(conversations)


def test_failed_fetch_leaves_data_untouched(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "old.txt").write_text("the good corpus")
    with pytest.raises(CorpusError, match="no such file"):
        stage_corpus(str(tmp_path / "nope"), data, CFG)
    assert (data / "old.txt").read_text() == "the good corpus"
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no staging dir left behind


def test_a_directory_source_is_copied_as_it_is(tmp_path):
    """data/ is the raw source: files of other kinds come along (validation lists them as skipped)."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.jsonl").write_text('{"text": "hello"}\n')
    (src / "sub" / "notes.csv").write_text("a,b\n")
    (src / ".hidden").write_text("not copied")
    staging = stage_corpus(str(src), tmp_path / "data", CFG)
    assert sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()) == [
        "a.jsonl",
        "sub/notes.csv",
    ]


def test_a_staged_corpus_replaces_the_whole_directory(tmp_path):
    src = tmp_path / "src.txt"
    src.write_text("new corpus")
    data = tmp_path / "data"
    data.mkdir()
    (data / "old.txt").write_text("old corpus")
    staging = stage_corpus(str(src), data, CFG)
    replace_dir(staging, data)
    assert [p.name for p in data.iterdir()] == ["src.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "src.txt"]
