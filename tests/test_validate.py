"""The Great Expectations suite on small corpora: each bad corpus fails the right check, with an example."""

import json
import random
import shutil
from pathlib import Path

import pytest

from pipeline.config import resolve_params
from pipeline.validate import document_table, format_failure, main, validate_corpus

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "corpora" / "tinyshakespeare.txt"
SMALL = resolve_params(
    {}, ["validation.min_documents=3", "validation.min_total_chars=100", "ingest.doc_chars=100"]
)


def good_text(seed: int = 0, paragraphs: int = 12) -> str:
    rng = random.Random(seed)
    words = "alpha beta gamma delta river stone light quick brown fox model token".split()
    return "\n\n".join(" ".join(rng.choice(words) for _ in range(20)) for _ in range(paragraphs))


def failed(corpus: Path, params=SMALL) -> dict:
    report = validate_corpus(corpus, params)
    assert not report.success
    return {c.name: c for c in report.failed}


def test_good_corpus_passes(tmp_path):
    (tmp_path / "a.txt").write_text(good_text())
    report = validate_corpus(tmp_path, SMALL)
    assert report.success and report.stats["documents"] == 12 and not report.failed
    names = [c.name for c in report.checks]
    assert names[:7] == [
        "min_documents",
        "min_total_chars",
        "not_null",
        "doc_length",
        "utf8",
        "nonprintable_ratio",
        "duplicate_ratio",
    ]
    assert {"secret:aws_access_key_id", "secret:private_key_block"} <= set(names)


def test_document_table_columns():
    from pipeline.ingest import Document

    table = document_table([Document("a#0", "ok\x00\ufffd!", False), Document("a#1", "ok\x00\ufffd!", True)])
    assert list(table.columns) == [
        "source",
        "text",
        "length",
        "nonprintable_ratio",
        "utf8_ok",
        "sha256",
        "is_duplicate",
    ]
    assert table["nonprintable_ratio"].tolist() == [0.4, 0.4]
    assert table["is_duplicate"].tolist() == [False, True]


@pytest.mark.parametrize("content", ["", "   \n\n\t\n  \n"])
def test_empty_and_whitespace_fail_min_documents(tmp_path, content):
    (tmp_path / "a.txt").write_text(content)
    checks = failed(tmp_path)
    assert checks["min_documents"].observed == 0 and "min_documents: observed 0" in format_failure(
        validate_corpus(tmp_path, SMALL)
    )


def test_binary_garbage_fails_utf8_and_nonprintable(tmp_path):
    (tmp_path / "a.txt").write_bytes(random.Random(0).randbytes(20_000))
    checks = failed(tmp_path)
    assert {"utf8", "nonprintable_ratio"} <= set(checks)
    assert checks["utf8"].example.startswith("a.txt#")


def test_latin1_fails_utf8(tmp_path):
    (tmp_path / "a.txt").write_text(good_text() + "\n\ncafé crème brûlée", encoding="latin-1")
    checks = failed(tmp_path)
    assert checks["utf8"].observed == "13 of 13 documents outside"  # every document of the file is suspect
    assert "a.txt#12" in checks["nonprintable_ratio"].example  # and the accented one shows where


def test_duplicates_fail_with_ratio(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps({"text": "same doc"}) + "\n" for _ in range(20))
        + json.dumps({"text": "other"})
        + "\n"
    )
    checks = failed(
        tmp_path, resolve_params({}, ["validation.min_documents=3", "validation.min_total_chars=10"])
    )
    assert checks["duplicate_ratio"].observed == pytest.approx(19 / 21, abs=1e-3)
    assert checks["duplicate_ratio"].example.startswith("a.jsonl#1")


def test_secret_is_found_and_masked(tmp_path):
    key = "AKIAIOSFODNN7EXAMPLE"
    (tmp_path / "a.txt").write_text(good_text() + f"\n\nconfig: aws_key = {key} in the middle of a line")
    (tmp_path / "b.txt").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n\n" + good_text(1))
    report = validate_corpus(tmp_path, SMALL)
    checks = {c.name: c for c in report.failed}
    assert set(checks) == {"secret:aws_access_key_id", "secret:private_key_block"}
    message = format_failure(report)
    assert "a.txt#12 at char" in message and "AKIA****************" in message and key not in message


def test_too_long_document_fails_doc_length(tmp_path):
    (tmp_path / "a.txt").write_text(good_text() + "\n\n" + "x" * 5000)
    checks = failed(
        tmp_path,
        resolve_params(
            {},
            [
                "validation.min_documents=3",
                "validation.min_total_chars=100",
                "validation.max_doc_chars=1000",
                "ingest.doc_chars=100",
            ],
        ),
    )
    assert set(checks) == {"doc_length"} and "5000 chars" in checks["doc_length"].example


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} is absent (only on dev machines)")
def test_tinyshakespeare_passes_the_default_suite():
    report = validate_corpus(SHAKESPEARE, resolve_params({}))
    assert report.success and report.stats["total_chars"] > 1_000_000


def test_stage_main_writes_reports_and_exits_by_result(tmp_path, monkeypatch, capsys):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text(good_text(paragraphs=40) * 10)
    monkeypatch.setenv("LMFORGE_ROOT", str(tmp_path))
    assert main() == 1  # 40 docs but under the default 100,000 characters
    report = json.loads((tmp_path / "artifacts/validation/report.json").read_text())
    assert report["success"] is False and "min_total_chars" in capsys.readouterr().err
    (tmp_path / "data" / "a.txt").write_text("\n\n".join(good_text(seed) for seed in range(100)))
    monkeypatch.setattr("sys.argv", ["x"])
    assert main() == 0
    assert json.loads((tmp_path / "artifacts/validation/report.json").read_text())["success"] is True
    assert "| duplicate_ratio | ok |" in (tmp_path / "artifacts/validation/report.md").read_text()
