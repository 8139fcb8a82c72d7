"""Validate: filter the corpus document by document, then judge what is left with a Great Expectations suite.

Two kinds of check, from the `validation:` section of params.yaml:
  - per document (length bounds, the non-printable share, duplicates): a failing document is DROPPED and
    recorded with its reason; GE's `mostly` says how many may fail before the corpus as a whole does;
  - per corpus (documents and characters left, the dropped share, the duplicate share, the shrink guard,
    secrets, text that is not UTF-8): a failure refuses the corpus.
Duplicates are removed at the paragraph level too (the first occurrence is kept), so no paragraph can
land in two splits. `DocumentFilter` is the one policy: preprocess runs the same filter to train on
exactly the documents kept here.

The corpus is streamed: the table GE checks holds numbers per document, never the text. The parts:
lmforge/data/measures.py (the one pass), lmforge/data/expectations.py (the suite, and what each check
observed), lmforge/data/validation_report.py (what the terminal and report.md show).

`python -m pipeline.validate` is the DVC stage: it validates data/ and writes artifacts/validation/
(report.json, report.md, dropped.jsonl).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from lmforge.config import Params
from lmforge.data.corpus import Corpus, open_corpus
from lmforge.data.engines import data_engine
from lmforge.data.expectations import run_suite
from lmforge.data.measures import DROP_REASONS, DUPLICATE_REASONS, measure
from lmforge.data.validation_report import format_failure, format_summary, write_report
from lmforge.params_file import load_params
from lmforge.runs.contracts import ArtifactError, ValidationReport
from lmforge.workspace import Workspace
from pipeline.stage import run_stage


def validate_corpus(
    path: Path | Corpus, params: Params, name: str | None = None, champion_chars: int | None = None
) -> ValidationReport:
    """Validate the corpus at path (file or directory, or an opened Corpus); name is what the report
    calls it (default: path). The documents are read and measured by data.engine.

    champion_chars turns on the shrink guard (see build_suite). A CorpusError (missing, nothing readable,
    truncated, malformed records) propagates to the caller.
    """
    corpus = path if isinstance(path, Corpus) else open_corpus(path)
    dropped = tempfile.SpooledTemporaryFile(max_size=8 << 20, mode="w+", encoding="utf-8")
    try:
        with data_engine(params) as engine:
            measures, found = measure(corpus, params, dropped, engine)
        table = measures.table()
        checks = run_suite(table, found, params, champion_chars)
    except BaseException:
        dropped.close()
        raise
    summary = corpus.summary()
    stats = {
        "documents": found.documents,
        "kept_documents": int(table["kept"].sum()) if len(table) else 0,
        "dropped_documents": sum(found.reasons[r] for r in DROP_REASONS),
        "duplicate_documents": sum(found.reasons[r] for r in DUPLICATE_REASONS),
        "dropped_by_reason": {r: found.reasons[r] for r in (*DROP_REASONS, *DUPLICATE_REASONS) if found.reasons[r]},
        "duplicate_paragraphs_removed": found.removed_paragraphs,
        "empty_documents": found.empty,
        "files": len(summary["files"]),
        "skipped_files": len(summary["skipped"]),
        "read_chars": found.read_chars,
        "total_chars": int(table["kept_chars"].sum()) if len(table) else 0,
        "non_utf8_documents": int((~table["utf8_ok"]).sum()) if len(table) else 0,
    }  # fmt: skip
    return ValidationReport(
        corpus=name or str(path),
        success=all(c.success for c in checks),
        stats=stats,
        checks=checks,
        files=summary["files"],
        skipped=summary["skipped"],
        examples=found.examples,
        dropped_records=dropped,
    )


def run() -> int:
    """The DVC stage: validate data/, write artifacts/validation/; exit 1 on a corpus that fails."""
    ws = Workspace.find()
    report = validate_corpus(ws.data, load_params(ws.root), name=f"{ws.data.name}/")
    try:
        write_report(report, ws.validation_dir)
    except OSError as exc:  # say which directory, not a traceback
        raise ArtifactError(f"cannot write the report to {ws.validation_dir}: {exc}") from None
    print(format_summary(report))
    print(f"validate: {'passed' if report.success else 'FAILED'} ({ws.validation_dir / 'report.md'})")
    if not report.success:
        print(format_failure(report), file=sys.stderr)
        return 1
    return 0


def main() -> int:
    return run_stage("validate", run)


if __name__ == "__main__":
    raise SystemExit(main())
