"""The Great Expectations suite on small corpora: each bad corpus fails the right check, with an example.

Real GE, no mocks. Every corpus is built in tmp_path; the bounds are lowered with overrides so a few
paragraphs make a valid corpus.
"""

import json
import random
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_params, resolve_params
from pipeline.ingest import CorpusError, Document
from pipeline.validate import (
    SNIPPET_CHARS,
    document_table,
    format_failure,
    main,
    validate_corpus,
    write_report,
)

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "tinyshakespeare.txt"
LOW = ["validation.min_documents=3", "validation.min_total_chars=100", "ingest.doc_chars=100"]
SMALL = resolve_params({}, LOW)
AWS_KEY = "AKIA" + "IOSFODNN7EXAMPLE"  # split: the repository holds no key-shaped string


def good_text(seed: int = 0, paragraphs: int = 12) -> str:
    """Distinct paragraphs of ~120 chars: with doc_chars=100 each one is a document."""
    rng = random.Random(seed)
    words = "alpha beta gamma delta river stone light quick brown fox model token".split()
    return "\n\n".join(" ".join(rng.choice(words) for _ in range(20)) for _ in range(paragraphs))


def failed_checks(corpus: Path, params=SMALL) -> dict:
    report = validate_corpus(corpus, params)
    assert not report.success
    return {c.name: c for c in report.failed}


# ---------------------------------------------------------------------------------------------
# the document table


def test_document_table_columns_ratio_and_duplicates():
    docs = [
        Document("a#0", "ok\x00\ufffd!", False),
        Document("a#1", "ok\x00\ufffd!", True),
        Document("a#2", "tabs\tand\nnewlines\r\n are fine", True),
        Document("a#3", "lone surrogate \ud800 from JSON", True),
    ]
    table = document_table(docs)
    assert list(table.columns) == [
        "source",
        "text",
        "length",
        "nonprintable_ratio",
        "utf8_ok",
        "sha256",
        "is_duplicate",
    ]
    assert table["length"].tolist() == [5, 5, 28, 26]
    assert table["nonprintable_ratio"].tolist()[:3] == [0.4, 0.4, 0.0]
    assert table["nonprintable_ratio"][3] == pytest.approx(1 / 26)
    assert table["is_duplicate"].tolist() == [False, True, False, False]
    assert table["sha256"][0] == table["sha256"][1] != table["sha256"][2]


def test_empty_document_table_keeps_bool_columns():
    table = document_table([])
    assert len(table) == 0 and table["is_duplicate"].dtype == bool and table["utf8_ok"].dtype == bool


# ---------------------------------------------------------------------------------------------
# good and bad corpora


def test_good_corpus_passes(tmp_path, capfd):
    (tmp_path / "a.txt").write_text(good_text())
    report = validate_corpus(tmp_path, SMALL)
    assert report.success and not report.failed
    assert report.stats["documents"] == 12 and report.stats["files"] == 1
    assert report.stats["total_chars"] == len(good_text()) - 2 * 11  # the blank-line separators
    names = [c.name for c in report.checks]
    assert names == [
        "min_documents",
        "min_total_chars",
        "not_null",
        "doc_length",
        "utf8",
        "nonprintable_ratio",
        "duplicate_ratio",
        "secret:aws_access_key_id",
        "secret:private_key_block",
        "secret:github_token",
    ]
    by_name = {c.name: c for c in report.checks}
    assert by_name["min_documents"].observed == 12
    assert by_name["min_documents"].expectation == "expect_table_row_count_to_be_between"
    assert by_name["min_total_chars"].observed == report.stats["total_chars"]  # an int, not 1408.0
    assert by_name["duplicate_ratio"].observed == 0
    assert "Calculating Metrics" not in capfd.readouterr().err  # GE's tqdm bars are off


@pytest.mark.parametrize("content", ["", "   \n\n\t\n  \n"], ids=["empty", "whitespace"])
def test_empty_and_whitespace_fail_min_documents(tmp_path, content):
    (tmp_path / "a.txt").write_text(content)
    report = validate_corpus(tmp_path, SMALL)
    checks = {c.name: c for c in report.failed}
    assert not report.success and checks["min_documents"].observed == 0
    message = format_failure(report)
    assert "min_documents: observed 0, bound >= 3" in message and "0 documents" in message


def test_binary_garbage_fails_utf8_and_nonprintable(tmp_path):
    (tmp_path / "a.txt").write_bytes(random.Random(0).randbytes(20_000))
    checks = failed_checks(tmp_path)
    assert {"utf8", "nonprintable_ratio"} <= set(checks)
    assert checks["utf8"].example.startswith("a.txt#0")
    assert checks["nonprintable_ratio"].observed.startswith("1 of 1 documents")
    assert "\\ufffd" in checks["nonprintable_ratio"].example  # escaped, not raw bytes on the terminal
    assert checks["nonprintable_ratio"].example.isascii()


def test_latin1_fails_utf8(tmp_path):
    (tmp_path / "a.txt").write_text(good_text() + "\n\ncafé crème brûlée", encoding="latin-1")
    report = validate_corpus(tmp_path, SMALL)
    checks = {c.name: c for c in report.failed}
    assert checks["utf8"].observed == "13 of 13 documents from non-UTF-8 files"  # the whole file is suspect
    # the example is the document that shows the replaced bytes, not the clean first one
    assert checks["utf8"].example.startswith("a.txt#12") and "caf\\ufffd" in checks["utf8"].example
    assert "utf8: observed 13 of 13" in format_failure(report)


def test_duplicates_fail_with_ratio(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps({"text": "same doc"}) + "\n" for _ in range(20))
        + json.dumps({"text": "other"})
        + "\n"
    )
    report = validate_corpus(
        tmp_path, resolve_params({}, ["validation.min_documents=3", "validation.min_total_chars=10"])
    )
    checks = {c.name: c for c in report.failed}
    assert set(checks) == {"duplicate_ratio"}
    assert checks["duplicate_ratio"].observed == pytest.approx(19 / 21, abs=1e-3)
    assert checks["duplicate_ratio"].example == "a.jsonl#1 duplicates a.jsonl#0: 'same doc'"
    assert "duplicate_ratio: observed 0.9048, bound <= 0.3 (example: a.jsonl#1" in format_failure(report)


def test_secret_is_found_and_masked(tmp_path):
    (tmp_path / "a.txt").write_text(good_text() + f"\n\nconfig: aws_key = {AWS_KEY} in the middle of a line")
    key_body = "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ"
    (tmp_path / "b.txt").write_text(f"-----BEGIN OPENSSH {'PRIVATE'} KEY-----\n{key_body}\n\n" + good_text(1))
    report = validate_corpus(tmp_path, SMALL)
    checks = {c.name: c for c in report.failed}
    assert set(checks) == {"secret:aws_access_key_id", "secret:private_key_block"}
    message = format_failure(report)
    assert "a.txt#12 at char 18: 'config: aws_key = AKIA****************'" in message
    assert checks["secret:private_key_block"].example.startswith("b.txt#0 at char 0:")
    # neither the key nor what follows a key header is ever echoed, in the message or the reports
    write_report(report, tmp_path / "out")
    for text in (
        message,
        (tmp_path / "out/report.json").read_text(),
        (tmp_path / "out/report.md").read_text(),
    ):
        assert AWS_KEY not in text and AWS_KEY[4:] not in text and key_body[:8] not in text


def test_too_long_document_fails_doc_length(tmp_path):
    (tmp_path / "a.txt").write_text(good_text() + "\n\n" + "x" * 5000)
    report = validate_corpus(tmp_path, resolve_params({}, [*LOW, "validation.max_doc_chars=1000"]))
    checks = {c.name: c for c in report.failed}
    assert set(checks) == {"doc_length"}
    assert checks["doc_length"].observed.startswith("1 of 13 documents out of range")
    assert checks["doc_length"].example.startswith("a.txt#12 (5000 chars): 'xxx")
    snippet = checks["doc_length"].example.split(": ", 1)[1]
    assert snippet.endswith("...") and len(snippet) <= SNIPPET_CHARS
    assert "bound 1..1000 chars per document" in format_failure(report)


def test_missing_corpus_raises_corpus_error(tmp_path):
    with pytest.raises(CorpusError, match="no such file or directory"):
        validate_corpus(tmp_path / "nope", SMALL)


def test_write_report_json_and_markdown(tmp_path):
    (tmp_path / "a.txt").write_text(good_text() + "\n\n" + "pipe | and\nnewline " * 3)
    report = validate_corpus(tmp_path, resolve_params({}, [*LOW, "validation.max_duplicate_ratio=0"]))
    write_report(report, tmp_path / "out")
    data = json.loads((tmp_path / "out/report.json").read_text())
    assert data["success"] is True and data["stats"]["documents"] == 13 and len(data["checks"]) == 10
    md = (tmp_path / "out/report.md").read_text()
    assert (
        md.startswith("# Corpus validation: passed") and "| check | ok | observed | bound | example |" in md
    )
    assert "| min_documents | ok | 13 | >= 3 |" in md
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "report.json",
        "report.md",
    ]  # no temp files


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} is absent (/work/shared not mounted)")
def test_tinyshakespeare_passes_the_default_suite():
    report = validate_corpus(SHAKESPEARE, load_params(REPO))
    assert report.success, format_failure(report)
    assert report.stats["total_chars"] > 1_000_000 and report.stats["documents"] > 200


# ---------------------------------------------------------------------------------------------
# the DVC stage


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A workspace: the repo's params.yaml with lowered bounds, an empty dvc.yaml, a data/ dir."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["validation"].update(min_documents=3, min_total_chars=100)
    raw["ingest"]["doc_chars"] = 100
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "dvc.yaml").write_text("")
    (tmp_path / "data").mkdir()
    monkeypatch.setenv("LMFORGE_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_stage_main_exits_by_result_and_writes_reports(workspace, capsys):
    report_json = workspace / "artifacts/validation/report.json"
    (workspace / "data/a.txt").write_text(
        "\n\n".join(["the same paragraph, long enough to be one document. " * 3] * 10)
    )
    assert main([]) == 1
    out, err = capsys.readouterr()
    assert "10 documents" in out and "FAILED" in out
    assert "validation failed for data/:" in err and "duplicate_ratio: observed 0.9" in err
    assert json.loads(report_json.read_text())["success"] is False
    assert "| duplicate_ratio | **FAIL** |" in (workspace / "artifacts/validation/report.md").read_text()

    (workspace / "data/a.txt").write_text(good_text())
    assert main([]) == 0  # a second run in the same process: a fresh GE context each time
    out, err = capsys.readouterr()
    assert "12 documents" in out and "passed" in out and err == ""
    assert json.loads(report_json.read_text())["success"] is True
    assert "| duplicate_ratio | ok |" in (workspace / "artifacts/validation/report.md").read_text()


def test_stage_main_reports_corpus_and_config_errors_without_traceback(workspace, capsys):
    (workspace / "data").rmdir()
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such file or directory" in err and "Traceback" not in err

    (workspace / "params.yaml").write_text("validation:\n  min_documents: 0\n")
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "validation.min_documents" in err
