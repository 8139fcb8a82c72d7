"""Validate: filter the corpus document by document, then judge what is left with a Great Expectations suite.

Two kinds of check, from the `validation:` section of params.yaml:
  - per document (length bounds, the non-printable share, duplicates): a failing document is DROPPED and
    recorded with its reason; GE's `mostly` says how many may fail before the corpus as a whole does;
  - per corpus (documents and characters left, the dropped share, the duplicate share, the shrink guard,
    secrets, text that is not UTF-8): a failure refuses the corpus.
Duplicates are removed at the paragraph level too (the first occurrence is kept), so no paragraph can
land in two splits. `DocumentFilter` is the one policy: preprocess runs the same filter to train on
exactly the documents kept here.

The corpus is streamed: the table GE checks holds numbers per document, never the text.

`python -m pipeline.validate` is the DVC stage: it validates data/ and writes artifacts/validation/
(report.json, report.md, dropped.jsonl). Great Expectations is imported only inside the functions that
run the suite: it takes seconds to import, and the CLI must start fast.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import tempfile
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from infra.atomic import atomic_open, write_text_atomic
from lmforge.config import Params
from lmforge.data.chat import RECORD_PROBLEMS
from lmforge.data.corpus import Corpus, open_corpus
from lmforge.data.documents import DocumentFacts, DocumentFilter, Verdict
from lmforge.data.engines import DataEngine, data_engine
from lmforge.params_file import load_params
from lmforge.runs.contracts import ArtifactError, Check, ValidationReport
from lmforge.workspace import Workspace
from pipeline.stage import run_stage

EXAMPLES_PER_REASON = 3
# quality, and conversation records that cannot be trained on: counted against max_dropped_fraction
DROP_REASONS = ("nonprintable", "too_short", "too_long", *RECORD_PROBLEMS)
DUPLICATE_REASONS = ("duplicate", "near_duplicate")  # counted against max_duplicate_ratio


# ---------------------------------------------------------------------------------------------
# measuring: one streaming pass -> a table of numbers per document, examples, the dropped records


class Measures:
    """Columns of per-document numbers in compact arrays (a few dozen bytes a document, never the text)."""

    def __init__(self, secret_names: list[str]):
        self.length, self.nonprintable, self.dropped = array("d"), array("d"), array("d")
        self.duplicate, self.utf8_ok = bytearray(), bytearray()
        self.kept_chars = array("q")
        self.secrets = {name: array("q") for name in secret_names}

    def add(self, verdict: Verdict, utf8_ok: bool, secret_counts: dict[str, int]) -> None:
        dup = verdict.reason in DUPLICATE_REASONS
        nan = float("nan")  # GE's column checks skip nulls: duplicates are not judged on quality
        self.length.append(nan if dup else verdict.length)
        self.nonprintable.append(nan if dup else verdict.nonprintable_ratio)
        self.dropped.append(nan if dup else float(verdict.reason is not None))
        self.duplicate.append(dup)
        self.utf8_ok.append(utf8_ok)
        self.kept_chars.append(verdict.length if verdict.kept else 0)
        for name, count in secret_counts.items():
            self.secrets[name].append(count)

    def table(self):
        import numpy as np
        import pandas as pd

        columns = {
            "length": np.frombuffer(self.length, dtype=np.float64),
            "nonprintable_ratio": np.frombuffer(self.nonprintable, dtype=np.float64),
            "dropped": np.frombuffer(self.dropped, dtype=np.float64),
            "duplicate": np.frombuffer(bytes(self.duplicate), dtype=np.bool_),
            "utf8_ok": np.frombuffer(bytes(self.utf8_ok), dtype=np.bool_),
            "kept_chars": np.frombuffer(self.kept_chars, dtype=np.int64),
        }
        columns["kept"] = (columns["kept_chars"] > 0).astype(np.int64)
        for i, values in enumerate(self.secrets.values()):
            columns[f"secret_{i}"] = np.frombuffer(values, dtype=np.int64)
        return pd.DataFrame(columns)


def _drop_example(facts: DocumentFacts, verdict: Verdict) -> str:
    """The dropped document's source, why, and a short masked snippet."""
    if verdict.reason == "duplicate":
        of = (
            f" duplicates {verdict.duplicate_of}"
            if verdict.duplicate_of
            else " (every paragraph seen before)"
        )
        return f"{facts.source}{of}: {facts.snippet}"
    if verdict.reason == "nonprintable":
        return f"{facts.source} (nonprintable ratio {verdict.nonprintable_ratio:.3f}{facts.bad_char}"
    if facts.problem is not None:
        return f"{facts.source} ({facts.problem}: {facts.problem_detail}): {facts.snippet}"
    return f"{facts.source} ({verdict.length} chars, {verdict.reason}): {facts.snippet}"


@dataclass
class Findings:
    """What one streaming pass saw, beyond the table."""

    documents: int = 0
    empty: int = 0
    read_chars: int = 0
    removed_paragraphs: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    secret_examples: dict[str, str] = field(default_factory=dict)
    utf8_example: str | None = None


def measure(
    corpus: Corpus, params: Params, dropped_out: IO[str], engine: DataEngine | None = None
) -> tuple[Measures, Findings]:
    """One pass over the corpus: every document filtered and measured, every dropped one written out."""
    names = list(params.validation.secret_patterns)
    keep = DocumentFilter(params.validation)
    measures, found = Measures(names), Findings()
    engine = engine or data_engine(params)
    with tqdm(unit="doc", desc=f"validate ({engine.name})", disable=None, mininterval=2) as bar:
        for facts in engine.facts(corpus, params):
            bar.update()
            if facts.blank:
                found.empty += 1  # nothing to learn or to judge, like a blank line
                continue
            found.documents += 1
            found.read_chars += facts.chars
            for name, example in zip(names, facts.secret_examples, strict=True):
                if example is not None and name not in found.secret_examples:
                    found.secret_examples[name] = example
            if not facts.utf8_ok and found.utf8_example is None:
                found.utf8_example = f"{facts.source} (nonprintable ratio {facts.nonprintable / facts.chars:.3f}{facts.bad_char}"
            verdict = keep(facts)
            measures.add(verdict, facts.utf8_ok, dict(zip(names, facts.secret_counts, strict=True)))
            found.removed_paragraphs += verdict.removed_paragraphs
            if verdict.reason:
                found.reasons[verdict.reason] += 1
                examples = found.examples.setdefault(verdict.reason, [])
                if len(examples) < EXAMPLES_PER_REASON:
                    examples.append(_drop_example(facts, verdict))
                record = {"source": facts.source, "reason": verdict.reason, "chars": facts.chars,
                          "snippet": facts.snippet}  # fmt: skip
                if verdict.duplicate_of:
                    record["duplicate_of"] = verdict.duplicate_of
                if facts.problem_detail:
                    record["detail"] = facts.problem_detail
                dropped_out.write(json.dumps(record) + "\n")
    return measures, found


# ---------------------------------------------------------------------------------------------
# the suite


def build_suite(params: Params, champion_chars: int | None = None) -> list[tuple[str, Any, str]]:
    """(check name, GE expectation, bound as text), in report order.

    champion_chars, the size of the champion's corpus, adds the shrink guard: a source that lost most
    of its data (a half-synced bucket, a wrong prefix) must not quietly retrain the model.
    """
    gx = _import_gx()

    v = params.validation
    E = gx.expectations
    mostly = 1 - v.max_dropped_fraction
    checks = [
        (
            "min_documents",
            E.ExpectColumnSumToBeBetween(column="kept", min_value=v.min_documents),
            f">= {v.min_documents} kept",
        ),
        (
            "min_total_chars",
            E.ExpectColumnSumToBeBetween(column="kept_chars", min_value=v.min_total_chars),
            f">= {v.min_total_chars} kept",
        ),
        ("utf8", E.ExpectColumnValuesToBeInSet(column="utf8_ok", value_set=[True]), "every file valid UTF-8"),
        (
            "doc_length",
            E.ExpectColumnValuesToBeBetween(
                column="length", min_value=v.min_doc_chars, max_value=v.max_doc_chars, mostly=mostly
            ),
            f"{v.min_doc_chars}..{v.max_doc_chars} chars per document, mostly {mostly:.0%}",
        ),
        (
            "nonprintable_ratio",
            E.ExpectColumnValuesToBeBetween(
                column="nonprintable_ratio", max_value=v.max_nonprintable_ratio, mostly=mostly
            ),
            f"<= {v.max_nonprintable_ratio} per document, mostly {mostly:.0%}",
        ),
        (
            "dropped_fraction",
            E.ExpectColumnMeanToBeBetween(column="dropped", max_value=v.max_dropped_fraction),
            f"<= {v.max_dropped_fraction:.0%} of documents dropped",
        ),
        (
            "duplicate_ratio",
            E.ExpectColumnMeanToBeBetween(column="duplicate", max_value=v.max_duplicate_ratio),
            f"<= {v.max_duplicate_ratio}",
        ),
    ]
    if champion_chars and v.min_fraction_of_champion > 0:
        floor = math.ceil(champion_chars * v.min_fraction_of_champion)
        checks.append(
            (
                "shrinkage",
                E.ExpectColumnSumToBeBetween(column="kept_chars", min_value=floor),
                f">= {floor:,} chars ({v.min_fraction_of_champion:.0%} of the champion's {champion_chars:,}; "
                "set validation.min_fraction_of_champion=0 to allow it)",
            )
        )
    for i, (name, pattern) in enumerate(v.secret_patterns.items()):
        checks.append(
            (
                f"secret:{name}",
                E.ExpectColumnValuesToBeBetween(column=f"secret_{i}", max_value=0),
                f"no match of /{pattern}/",
            )
        )
    return checks


def _import_gx() -> Any:
    """great_expectations, with its logging kept to errors unless the caller chose a level: it logs at
    import and on every context, and Prefect's INFO handlers would show all of it."""
    logger = logging.getLogger("great_expectations")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.ERROR)
    import great_expectations as gx

    # this module forces itself to INFO at import and logs a temp dir for every ephemeral context
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    return gx


def _ge_error(res: Any) -> str | None:
    """The message of an expectation that raised inside GE, else None (its result is then meaningless)."""
    info = res.exception_info or {}
    candidates = [info] if "raised_exception" in info else [i for i in info.values() if isinstance(i, dict)]
    for item in candidates:
        if item.get("raised_exception"):
            return str(item.get("exception_message") or "GE raised an exception")
    return None


def run_suite(table, found: Findings, params: Params, champion_chars: int | None = None) -> list[Check]:
    """Run the GE suite on the table of measures and turn its results into named checks with examples."""
    gx = _import_gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    suite_checks = build_suite(params, champion_chars)
    if table.empty:
        # Column metrics are undefined on no rows (GE reports a mean of None as a failure), so say plainly
        # that there is nothing instead of failing every check for the wrong reason.
        why = "0 documents: every corpus file is empty or whitespace-only"
        return [Check(n, e.expectation_type, False, 0, b, why) for n, e, b in suite_checks[:2]]

    context = gx.get_context(mode="ephemeral")  # fresh per run: no "datasource already exists"
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # no tqdm bars on stderr
    batch_def = (
        context.data_sources.add_pandas("corpus")
        .add_dataframe_asset("documents")
        .add_batch_definition_whole_dataframe("all")
    )
    suite = context.suites.add(gx.ExpectationSuite("corpus"))
    for _, expectation, _ in suite_checks:
        suite.add_expectation(expectation)
    result = batch_def.get_batch(batch_parameters={"dataframe": table}).validate(suite, result_format="BASIC")
    # GE does not keep the suite's order in its results: match them up by expectation id
    by_id = {res.expectation_config.id: res for res in result.results}
    checks = []
    for name, expectation, bound in suite_checks:
        res = by_id[expectation.id]
        if error := _ge_error(res):
            checks.append(Check(name, expectation.expectation_type, False, f"error: {error}", bound))
            continue
        observed = _observed(name, res.result or {}, table, found)
        example = None if res.success else _example(name, found)
        checks.append(Check(name, expectation.expectation_type, bool(res.success), observed, bound, example))
    return checks


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


# ---------------------------------------------------------------------------------------------
# observed values and examples: what a person needs to find the problem


def _native(value: Any) -> Any:
    """numpy scalars -> plain Python, floats rounded, so the report serializes cleanly."""
    if hasattr(value, "item"):
        value = value.item()
    return round(value, 4) if isinstance(value, float) else value


def _by_reason(found: Findings, reasons: tuple[str, ...]) -> str:
    return ", ".join(f"{r} {found.reasons[r]:,}" for r in reasons if found.reasons[r])


def _observed(name: str, detail: dict, table, found: Findings) -> Any:
    judged = int(table["dropped"].notna().sum())
    if name == "dropped_fraction":
        count = sum(found.reasons[r] for r in DROP_REASONS)
        share = f" ({count / judged:.2%})" if judged else ""
        why = f": {_by_reason(found, DROP_REASONS)}" if count else ""
        return f"{count:,} of {judged:,} documents{share}{why}"
    if name == "duplicate_ratio":
        return _native(detail.get("observed_value"))
    if name.startswith("secret:"):
        return f"{int(detail.get('unexpected_count') or 0)} of {len(table)} documents matching"
    if "observed_value" in detail:
        value = _native(detail["observed_value"])
        return int(value) if isinstance(value, float) else value
    count = int(detail.get("unexpected_count") or 0)
    if name == "utf8":
        return f"{count} of {len(table)} documents from non-UTF-8 bytes"
    if name == "doc_length":
        lengths = table["length"].dropna()
        return f"{count} of {judged} documents out of range" + (
            f" (shortest {int(lengths.min())}, longest {int(lengths.max())} chars)" if len(lengths) else ""
        )
    if name == "nonprintable_ratio":
        return f"{count} of {judged} documents over the bound (worst {float(table['nonprintable_ratio'].max()):.4f})"
    return count


def _example(name: str, found: Findings) -> str | None:
    if name.startswith("secret:"):
        return found.secret_examples.get(name.split(":", 1)[1])
    if name == "utf8":
        return found.utf8_example
    reasons = {
        "doc_length": ("too_long", "too_short"),
        "nonprintable_ratio": ("nonprintable",),
        "dropped_fraction": tuple(sorted(DROP_REASONS, key=lambda r: -found.reasons[r])),
        "duplicate_ratio": DUPLICATE_REASONS,
    }.get(name, ())
    for reason in reasons:
        if found.examples.get(reason):
            return found.examples[reason][0]
    return None


# ---------------------------------------------------------------------------------------------
# reporting


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
