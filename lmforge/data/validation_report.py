"""A validation report for people: the terminal's summary and failure lines, and artifacts/validation/
(report.json for machines and `dvc metrics`, report.md for people, dropped.jsonl for the record)."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from infra.atomic import atomic_open, write_text_atomic
from lmforge.data.measures import DROP_REASONS, DUPLICATE_REASONS
from lmforge.runs.contracts import ValidationReport


def format_failure(report: ValidationReport) -> str:
    """One line per failed check: observed value, bound and an example, for the terminal."""
    lines = [f"validation failed for {report.corpus}:"]
    for c in report.failed:
        example = f" (example: {c.example})" if c.example else ""
        lines.append(f"  {c.name}: observed {c.observed}, bound {c.bound}{example}")
    return "\n".join(lines)


def format_summary(report: ValidationReport) -> str:
    """Kept and dropped documents by reason, with examples: what `lmforge validate` prints."""
    s = report.stats
    skipped = f", {s['skipped_files']} skipped ({', '.join(report.skipped[:5])})" if report.skipped else ""
    layouts = Counter(f["layout"] for f in report.files if f["layout"])
    files = ", ".join(f"{k} ({v} file{'s' if v > 1 else ''})" for k, v in layouts.items())
    layout = f"; text layout: {files}" if layouts else ""
    lines = [
        f"{report.corpus}: {s['files']} file(s){skipped}{layout}",
        f"  {s['documents']:,} documents read, {s['kept_documents']:,} kept ({s['total_chars']:,} chars)",
    ]
    for label, reasons in (("dropped", DROP_REASONS), ("duplicates", DUPLICATE_REASONS)):
        count = sum(s["dropped_by_reason"].get(r, 0) for r in reasons)
        if not count:
            continue
        share = count / max(s["documents"], 1)
        by = ", ".join(f"{r} {s['dropped_by_reason'][r]:,}" for r in reasons if s["dropped_by_reason"].get(r))
        lines.append(f"  {label} {count:,} ({share:.2%}): {by}")
        for reason in reasons:
            lines += [f"    e.g. {e}" for e in report.examples.get(reason, [])[:2]]
    if s["duplicate_paragraphs_removed"]:
        lines.append(
            f"  duplicate paragraphs removed from kept documents: {s['duplicate_paragraphs_removed']:,}"
        )
    if s["empty_documents"]:
        lines.append(f"  empty documents skipped: {s['empty_documents']:,}")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def write_report(report: ValidationReport, out_dir: Path) -> None:
    """report.json for machines (and `dvc metrics`), report.md for people, dropped.jsonl for the record."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report.save(out_dir / report.FILE)
    md = [
        f"# Corpus validation: {'passed' if report.success else 'FAILED'}",
        "",
        "```",
        format_summary(report),
        "```",
        "",
        "| check | ok | observed | bound | example |",
        "|---|---|---|---|---|",
        *(
            f"| {_cell(c.name)} | {'ok' if c.success else '**FAIL**'} | {_cell(c.observed)} "
            f"| {_cell(c.bound)} | {_cell(c.example or '')} |"
            for c in report.checks
        ),
    ]
    write_text_atomic(out_dir / "report.md", "\n".join(md) + "\n")
    with atomic_open(out_dir / "dropped.jsonl") as fh:
        if report.dropped_records is not None:
            report.dropped_records.seek(0)
            shutil.copyfileobj(report.dropped_records, fh)
