"""The Great Expectations suite on small corpora: each bad corpus fails the right check, with an example.

Real GE, no mocks. Every corpus is built in tmp_path; the bounds are lowered with overrides so a few
paragraphs make a valid corpus.
"""

import json
import random
from pathlib import Path

import pytest
import yaml

from lmforge.config import ConfigError
from lmforge.data.corpus import open_corpus
from lmforge.data.documents import SNIPPET_CHARS, DocumentFilter, FactFinder, kept_text
from lmforge.data.engines import kept_documents
from lmforge.data.formats import CorpusError, Document
from lmforge.data.validation_report import format_failure, format_summary, write_report
from lmforge.params_file import load_params, resolve_params
from pipeline.validate import main, validate_corpus

from .conftest import POEM_LINES

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "tinyshakespeare.txt"
LOW = ["validation.min_documents=3", "validation.min_total_chars=100", "ingest.doc_chars=200"]
SMALL = resolve_params({}, LOW)
LOW_MAX = resolve_params({}, [*LOW, "validation.max_doc_chars=1000"])
AWS_KEY = "AKIA" + "IOSFODNN7EXAMPLE"  # split: the repository holds no key-shaped string


def good_text(seed: int = 0, paragraphs: int = 12) -> str:
    """Distinct paragraphs of ~120 chars: with doc_chars=200 each one is a document."""
    rng = random.Random(seed)
    words = "alpha beta gamma delta river stone light quick brown fox model token".split()
    return "\n\n".join(" ".join(rng.choice(words) for _ in range(20)) for _ in range(paragraphs))


def failed_checks(corpus: Path, params=SMALL) -> dict:
    report = validate_corpus(corpus, params)
    assert not report.success
    return {c.name: c for c in report.failed}


# ---------------------------------------------------------------------------------------------
# the per-document filter


def verdicts(texts: list[str], params=SMALL) -> list:
    """Each text's verdict, with .text set to what it keeps (None when dropped)."""
    find, keep = FactFinder(params.validation), DocumentFilter(params.validation)
    got = []
    for i, text in enumerate(texts):
        verdict = keep(find(Document(f"a#{i}", text), 0, i))
        verdict.text = kept_text(text, verdict.fresh) if verdict.kept else None
        got.append(verdict)
    return got


def test_filter_drops_duplicates_down_to_the_paragraph():
    a, b, c = "first paragraph here.", "second paragraph here.", "third paragraph here."
    got = verdicts([f"{a}\n\n{b}", f"{a}\n\n{b}", f"{b}\n \n{c}", f"{a}\n\t\n{b}", c])
    assert [(v.reason, v.text) for v in got] == [
        (None, f"{a}\n\n{b}"),
        ("duplicate", None),  # the same document
        (None, c),  # its first paragraph was seen: only the new one is kept
        ("duplicate", None),  # every paragraph seen before, though the text differs
        ("duplicate", None),
    ]
    assert got[1].duplicate_of == "a#0" and got[2].removed_paragraphs == 1


def test_filter_drops_bad_documents_and_keeps_a_clean_copy_after_one():
    pua = "\ue000" * 5 + "x" * 95  # 5% private-use characters
    got = verdicts(["ok " * 20, pua, "", "y" * 5000, pua.replace("\ue000", "z")], LOW_MAX)
    assert [v.reason for v in got] == [None, "nonprintable", "too_short", "too_long", None]
    assert got[1].nonprintable_ratio == pytest.approx(0.05)


def test_near_duplicates_are_dropped_only_when_enabled():
    base = " ".join(f"word{i}" for i in range(300))
    near = base.replace("word17 ", "word17x ")  # one character in 2,000
    texts = [base, near, " ".join(f"other{i}" for i in range(300))]
    assert [v.reason for v in verdicts(texts)] == [None, None, None]
    params = resolve_params({}, [*LOW, "validation.near_duplicates=true"])
    assert [v.reason for v in verdicts(texts, params)] == [None, "near_duplicate", None]


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
        "utf8",
        "doc_length",
        "nonprintable_ratio",
        "dropped_fraction",
        "duplicate_ratio",
        "secret:aws_access_key_id",
        "secret:private_key_block",
        "secret:github_token",
    ]
    by_name = {c.name: c for c in report.checks}
    assert by_name["min_documents"].observed == 12
    assert by_name["min_documents"].expectation == "expect_column_sum_to_be_between"
    assert by_name["doc_length"].expectation == "expect_column_values_to_be_between"
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
    n = checks["dropped_fraction"].observed.split()[0]  # random bytes hold newlines: many documents
    assert int(n) > 50 and checks["nonprintable_ratio"].observed.startswith(f"{n} of {n} documents")
    assert checks["dropped_fraction"].observed == f"{n} of {n} documents (100.00%): nonprintable {n}"
    assert "\\ufffd" in checks["nonprintable_ratio"].example  # escaped, not raw bytes on the terminal
    assert checks["nonprintable_ratio"].example.isprintable()  # any script may show; nothing invisible


def test_latin1_fails_utf8(tmp_path):
    (tmp_path / "a.txt").write_text(good_text() + "\n\ncafé crème brûlée", encoding="latin-1")
    report = validate_corpus(tmp_path, SMALL)
    checks = {c.name: c for c in report.failed}
    # text that is not UTF-8 is a file-level problem: it refuses the corpus, though one document holds it
    assert "utf8" in checks  # (its one document is also dropped for the replaced bytes: 1 of 12 is > 5%)
    assert checks["utf8"].observed == "1 of 12 documents from non-UTF-8 bytes"
    # the example shows the replaced bytes, not the clean start of the document they are in
    assert checks["utf8"].example.startswith("a.txt#11 (nonprintable ratio 0.030, first at char 119)")
    assert "caf\\ufffd" in checks["utf8"].example
    assert "utf8: observed 1 of 12" in format_failure(report)


def test_duplicates_fail_with_ratio(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps({"text": "same doc"}) + "\n" for _ in range(20))
        + json.dumps({"text": "other"})
        + "\n"
    )
    report = validate_corpus(
        tmp_path, resolve_params({}, ["validation.min_documents=2", "validation.min_total_chars=10"])
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
    assert (
        "a.txt#11 at char 134: ...'er model stone light\\n\\nconfig: aws_key = AKIA****************'"
        in message
    )
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
    docs = [*good_text().split("\n\n"), "x" * 5000]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    report = validate_corpus(tmp_path, LOW_MAX)
    checks = {c.name: c for c in report.failed}
    assert set(checks) == {"doc_length", "dropped_fraction"}  # 1 of 13 is over the 5% allowed
    assert checks["doc_length"].observed.startswith("1 of 13 documents out of range")
    assert checks["doc_length"].example.startswith("a.jsonl#12 (5000 chars, too_long): 'xxx")
    snippet = checks["doc_length"].example.split(": ", 1)[1]
    assert snippet.endswith("...") and len(snippet) <= SNIPPET_CHARS
    assert "bound 1..1000 chars per document, mostly 95%" in format_failure(report)


def mixed_corpus(path: Path, n: int, bad: int) -> Path:
    """n JSONL documents of which `bad` are bad, of three kinds in turn: binary noise, far too long, empty
    of meaning (3 characters), between good ones."""
    good = good_text(7, n).split("\n\n")
    kinds = ["\x00\x01\x02" * 40, "z" * 5000, "ab"]
    bad_at = {round(i * n / bad) + 1: kinds[i % 3] for i in range(bad)}
    texts = [bad_at.get(i, good[i]) for i in range(n)]
    path.mkdir(parents=True, exist_ok=True)
    (path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


MIXED = resolve_params({}, [*LOW, "validation.max_doc_chars=1000", "validation.min_doc_chars=10"])


def test_two_percent_bad_documents_are_dropped_and_recorded(tmp_path):
    corpus = mixed_corpus(tmp_path / "c", 150, 3)
    report = validate_corpus(corpus, MIXED)
    assert report.success, format_failure(report)
    assert report.stats["kept_documents"] == 147 and report.stats["dropped_documents"] == 3
    assert report.stats["dropped_by_reason"] == {"nonprintable": 1, "too_short": 1, "too_long": 1}
    write_report(report, tmp_path / "out")
    dropped = [json.loads(line) for line in (tmp_path / "out/dropped.jsonl").read_text().splitlines()]
    assert [(d["source"], d["reason"]) for d in dropped] == [
        ("docs.jsonl#1", "nonprintable"),
        ("docs.jsonl#51", "too_long"),
        ("docs.jsonl#101", "too_short"),
    ]
    assert dropped[1]["chars"] == 5000 and dropped[1]["snippet"].startswith("'zzz")
    summary = format_summary(report)
    assert "150 documents read, 147 kept" in summary and "dropped 3 (2.00%)" in summary
    assert "e.g. docs.jsonl#1 (nonprintable ratio 1.000, first at char 0)" in summary
    # what preprocess trains on: exactly the kept documents
    kept = list(kept_documents(open_corpus(corpus), MIXED))
    assert [d.source for d in kept] == [f"docs.jsonl#{i}" for i in range(150) if i not in (1, 51, 101)]


def test_twenty_percent_bad_documents_refuse_the_corpus_naming_the_top_reasons(tmp_path):
    report = validate_corpus(mixed_corpus(tmp_path / "c", 100, 20), MIXED)
    checks = {c.name: c for c in report.failed}
    assert {"dropped_fraction", "doc_length", "nonprintable_ratio"} <= set(checks)
    assert checks["dropped_fraction"].observed == (
        "20 of 100 documents (20.00%): nonprintable 7, too_short 6, too_long 7"
    )
    assert "dropped_fraction: observed 20 of 100 documents (20.00%)" in format_failure(report)


def test_chinese_poems_with_a_few_private_use_glyphs_pass(tmp_path):
    """Classical texts encode rare glyphs as private-use characters: the few such poems are dropped, the
    corpus is not refused."""
    records = []
    for i in range(2000):
        poem = "".join(POEM_LINES[(i + k) % 5] for k in range(1 + i % 4)) + f"（第{i}首）"
        if i % 250 == 0:  # 8 of 2,000 (0.4%) with 2% private-use characters
            poem = poem[:10] + "\ue0a5\ue0b1" + poem[10:]
        records.append({"title": f"poem {i}", "content": poem})
    (tmp_path / "poems.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    params = resolve_params({}, ["ingest.text_field=content", "validation.min_total_chars=10000"])
    report = validate_corpus(tmp_path, params)
    assert report.success, format_failure(report)
    assert report.stats["dropped_by_reason"] == {"nonprintable": 8}
    assert report.stats["kept_documents"] == 1992
    assert report.examples["nonprintable"][0].startswith("poems.jsonl#0 (nonprintable ratio")


def test_missing_corpus_raises_corpus_error(tmp_path):
    with pytest.raises(CorpusError, match="no such file or directory"):
        validate_corpus(tmp_path / "nope", SMALL)


def test_write_report_json_and_markdown(tmp_path):
    (tmp_path / "a.txt").write_text(good_text() + "\n\n" + "pipe | and\nnewline " * 3)
    report = validate_corpus(tmp_path, resolve_params({}, [*LOW, "validation.max_duplicate_ratio=0"]))
    write_report(report, tmp_path / "out")
    data = json.loads((tmp_path / "out/report.json").read_text())
    assert data["success"] is True and data["stats"]["documents"] == 12 and len(data["checks"]) == 10
    assert data["files"] == [{"file": "a.txt", "format": ".txt", "layout": "paragraphs", "documents": 12}]
    md = (tmp_path / "out/report.md").read_text()
    assert (
        md.startswith("# Corpus validation: passed") and "| check | ok | observed | bound | example |" in md
    )
    assert "| min_documents | ok | 12 | >= 3 kept |" in md
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "dropped.jsonl",
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
    raw["ingest"]["doc_chars"] = 200
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
    assert main() == 1
    out, err = capsys.readouterr()
    assert "10 documents" in out and "FAILED" in out
    assert "validation failed for data/:" in err and "duplicate_ratio: observed 0.9" in err
    assert json.loads(report_json.read_text())["success"] is False
    assert "| duplicate_ratio | **FAIL** |" in (workspace / "artifacts/validation/report.md").read_text()

    (workspace / "data/a.txt").write_text(good_text())
    assert main() == 0  # a second run in the same process: a fresh GE context each time
    out, err = capsys.readouterr()
    assert "12 documents" in out and "passed" in out and err == ""
    assert json.loads(report_json.read_text())["success"] is True
    assert "| duplicate_ratio | ok |" in (workspace / "artifacts/validation/report.md").read_text()


def test_stage_main_reports_corpus_and_config_errors_without_traceback(workspace, capsys):
    (workspace / "data").rmdir()
    assert main() == CorpusError.exit_code == 1  # a corpus problem, as in `lmforge validate`
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such file or directory" in err and "Traceback" not in err

    (workspace / "params.yaml").write_text("validation:\n  min_documents: 0\n")
    assert main() == ConfigError.exit_code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "validation.min_documents" in err
