"""Validate: the corpus as a document table, checked by a Great Expectations suite.

Every bound comes from the `validation:` section of params.yaml. A failed check names its observed value,
its bound, and an example document, so a user can find the problem without reading GE's raw output.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.config import ConfigError, Params, Workspace, load_params
from pipeline.ingest import CorpusError, Document, read_documents

# U+FFFD (what undecodable bytes became) and the C0 controls other than \t \n \r, plus DEL.
NONPRINTABLE = re.compile("[\ufffd\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass
class Check:
    name: str
    expectation: str
    success: bool
    observed: object
    bound: str
    example: str | None = None


@dataclass
class ValidationReport:
    corpus: str
    success: bool
    stats: dict
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.success]


def document_table(docs: Iterable[Document]) -> pd.DataFrame:
    rows = []
    seen: set[str] = set()
    for doc in docs:
        digest = hashlib.sha256(doc.text.encode("utf-8", errors="replace")).hexdigest()
        length = len(doc.text)
        bad = length - len(NONPRINTABLE.sub("", doc.text))
        rows.append((doc.source, doc.text, length, bad / max(length, 1), doc.utf8_ok, digest, digest in seen))
        seen.add(digest)
    columns = ["source", "text", "length", "nonprintable_ratio", "utf8_ok", "sha256", "is_duplicate"]
    return pd.DataFrame(rows, columns=columns).astype({"length": "int64", "nonprintable_ratio": "float64"})


def _suite(params: Params) -> list[tuple[str, object, str]]:
    """(check name, GE expectation, bound as text), in report order."""
    import great_expectations as gx

    v = params.validation
    E = gx.expectations
    checks = [
        (
            "min_documents",
            E.ExpectTableRowCountToBeBetween(min_value=v.min_documents),
            f">= {v.min_documents}",
        ),
        (
            "min_total_chars",
            E.ExpectColumnSumToBeBetween(column="length", min_value=v.min_total_chars),
            f">= {v.min_total_chars}",
        ),
        ("not_null", E.ExpectColumnValuesToNotBeNull(column="text"), "no null text"),
        (
            "doc_length",
            E.ExpectColumnValuesToBeBetween(
                column="length", min_value=v.min_doc_chars, max_value=v.max_doc_chars
            ),
            f"{v.min_doc_chars}..{v.max_doc_chars} chars",
        ),
        ("utf8", E.ExpectColumnValuesToBeInSet(column="utf8_ok", value_set=[True]), "every file valid UTF-8"),
        (
            "nonprintable_ratio",
            E.ExpectColumnValuesToBeBetween(column="nonprintable_ratio", max_value=v.max_nonprintable_ratio),
            f"<= {v.max_nonprintable_ratio} per document",
        ),
        (
            "duplicate_ratio",
            E.ExpectColumnMeanToBeBetween(column="is_duplicate", max_value=v.max_duplicate_ratio),
            f"<= {v.max_duplicate_ratio}",
        ),
    ]
    for name, pattern in v.secret_patterns.items():
        checks.append(
            (f"secret:{name}", E.ExpectColumnValuesToNotMatchRegex(column="text", regex=pattern), "no match")
        )
    return checks


def _snippet(text: str, limit: int = 80) -> str:
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def _example(name: str, table: pd.DataFrame, rows: list[int], params: Params) -> str | None:
    """One offending document: its source and a short snippet; a secret is masked, never echoed."""
    if name == "duplicate_ratio":
        rows = list(table.index[table["is_duplicate"]][:1])
    if not rows:
        return None
    row = table.loc[rows[0]]
    if name.startswith("secret:"):
        match = re.search(params.validation.secret_patterns[name.split(":", 1)[1]], row.text)
        secret = match.group(0) if match else ""
        return f"{row.source} at char {match.start() if match else '?'}: {secret[:4]}{'*' * max(len(secret) - 4, 0)}"
    detail = {
        "doc_length": f"{row.length} chars",
        "nonprintable_ratio": f"ratio {row.nonprintable_ratio:.3f}",
    }.get(name, "")
    return f"{row.source} {detail} {_snippet(row.text)}".replace("  ", " ")


def _observed(name: str, result: dict, table: pd.DataFrame):
    if "observed_value" in result:
        value = result["observed_value"]
        return round(float(value), 4) if isinstance(value, float) or hasattr(value, "dtype") else value
    return f"{result.get('unexpected_count', 0)} of {len(table)} documents outside"


def run_suite(table: pd.DataFrame, params: Params, corpus: str) -> ValidationReport:
    import great_expectations as gx

    stats = {
        "documents": len(table),
        "total_chars": int(table["length"].sum()),
        "max_doc_chars": int(table["length"].max()) if len(table) else 0,
        "duplicate_ratio": round(float(table["is_duplicate"].mean()), 4) if len(table) else 0.0,
        "max_nonprintable_ratio": round(float(table["nonprintable_ratio"].max()), 4) if len(table) else 0.0,
        "non_utf8_documents": int((~table["utf8_ok"]).sum()) if len(table) else 0,
    }
    suite_checks = _suite(params)
    if table.empty:
        # GE's column metrics are undefined on no rows: say plainly that there is nothing.
        checks = [Check(n, e.expectation_type, False, 0, b) for n, e, b in suite_checks[:2]]
        return ValidationReport(corpus, False, stats, checks)

    context = gx.get_context(mode="ephemeral")  # fresh per run: no "datasource already exists"
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_def = (
        context.data_sources.add_pandas("corpus")
        .add_dataframe_asset("documents")
        .add_batch_definition_whole_dataframe("all")
    )
    suite = context.suites.add(gx.ExpectationSuite("corpus"))
    for _, expectation, _ in suite_checks:
        suite.add_expectation(expectation)
    result = batch_def.get_batch(batch_parameters={"dataframe": table}).validate(
        suite, result_format="SUMMARY"
    )

    # GE does not keep the suite's order in its results: match them up by expectation id.
    by_id = {res.expectation_config.id: res for res in result.results}
    checks = []
    for name, expectation, bound in suite_checks:
        res = by_id[expectation.id]
        detail = res.result or {}
        example = (
            None
            if res.success
            else _example(name, table, detail.get("partial_unexpected_index_list") or [], params)
        )
        checks.append(
            Check(
                name,
                expectation.expectation_type,
                bool(res.success),
                _observed(name, detail, table),
                bound,
                example,
            )
        )
    return ValidationReport(corpus, all(c.success for c in checks), stats, checks)


def validate_corpus(path: Path, params: Params) -> ValidationReport:
    return run_suite(document_table(read_documents(path, params.ingest)), params, str(path))


def format_failure(report: ValidationReport) -> str:
    lines = [f"validation failed for {report.corpus}:"]
    for c in report.failed:
        lines.append(
            f"  {c.name}: observed {c.observed}, expected {c.bound}"
            + (f" (example: {c.example})" if c.example else "")
        )
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(report: ValidationReport, out_dir: Path) -> None:
    """report.json for machines (and `dvc metrics`), report.md for people."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / "report.json", json.dumps(asdict(report), indent=2, default=str) + "\n")
    rows = [
        f"| {c.name} | {'ok' if c.success else '**FAIL**'} | {c.observed} | {c.bound} | {c.example or ''} |"
        for c in report.checks
    ]
    stats = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in report.stats.items())
    md = [
        f"# Corpus validation: {'passed' if report.success else 'FAILED'}",
        "",
        f"Corpus `{report.corpus}`: {stats}.",
        "",
        "| check | result | observed | expected | example |",
        "|---|---|---|---|---|",
        *[r.replace("\n", " ") for r in rows],
    ]
    _write_atomic(out_dir / "report.md", "\n".join(md) + "\n")


def main(argv: list[str] | None = None) -> int:
    """The DVC stage: validate data/, write artifacts/validation/report.{json,md}; exit 1 on bad data."""
    try:
        ws = Workspace.find()
        report = validate_corpus(ws.data, load_params(ws.root))
    except (ConfigError, CorpusError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_report(report, ws.validation_dir)
    print(f"validate: {report.stats['documents']:,} documents, {report.stats['total_chars']:,} chars: "
          f"{'passed' if report.success else 'FAILED'} ({ws.validation_dir / 'report.md'})")  # fmt: skip
    if not report.success:
        print(format_failure(report), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
