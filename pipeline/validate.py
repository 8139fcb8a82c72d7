"""Validate: the corpus as a document table, checked by a Great Expectations suite.

Every bound comes from the `validation:` section of params.yaml. A failed check names its observed value,
its bound, and an example document, so a user can find the problem without reading GE's raw output.

`python -m pipeline.validate` is the DVC stage: it validates data/ and writes artifacts/validation/.
Great Expectations is imported only inside the functions that run the suite: it takes seconds to import,
and the CLI must start fast.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import ConfigError, Params, Workspace, load_params
from pipeline.ingest import CorpusError, Document, read_documents

# What a reader cannot see or a tokenizer should not learn: U+FFFD (what undecodable bytes became), the
# C0 controls other than \t \n \r, DEL and the C1 controls, lone surrogates (JSON "\ud800" escapes) and
# private-use characters. One compiled class, counted in C: fast on a 50 MB document.
NONPRINTABLE = re.compile(
    "[\ufffd\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ue000-\uf8ff\U000f0000-\U0010ffff]"
)
SNIPPET_CHARS = 80
COLUMNS = ["source", "text", "length", "nonprintable_ratio", "utf8_ok", "sha256", "is_duplicate"]


@dataclass
class Check:
    name: str  # "min_documents", "doc_length", "secret:aws_access_key_id", ...
    expectation: str  # the GE expectation type, e.g. expect_column_values_to_be_between
    success: bool
    observed: Any  # a number for table-level checks, "k of n documents ..." for per-document ones
    bound: str
    example: str | None = None  # a failing document: its source and a short (masked) snippet


@dataclass
class ValidationReport:
    corpus: str
    success: bool
    stats: dict[str, Any]
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.success]


# ---------------------------------------------------------------------------------------------
# the document table


def document_table(docs: Iterable[Document]) -> pd.DataFrame:
    """One row per document, with the per-document measures the suite checks."""
    rows = []
    seen: set[str] = set()
    for doc in docs:
        # surrogatepass: a lone surrogate from JSON must hash, not crash, and not collide with U+FFFD
        digest = hashlib.sha256(doc.text.encode("utf-8", errors="surrogatepass")).hexdigest()
        length = len(doc.text)
        bad = NONPRINTABLE.subn("", doc.text)[1]
        rows.append((doc.source, doc.text, length, bad / max(length, 1), doc.utf8_ok, digest, digest in seen))
        seen.add(digest)
    # explicit dtypes: an empty table would otherwise get object columns
    return pd.DataFrame(rows, columns=COLUMNS).astype(
        {"length": "int64", "nonprintable_ratio": "float64", "utf8_ok": "bool", "is_duplicate": "bool"}
    )


def table_stats(table: pd.DataFrame) -> dict[str, Any]:
    empty = table.empty
    return {
        "documents": len(table),
        "files": int(table["source"].str.rsplit("#", n=1).str[0].nunique()) if not empty else 0,
        "total_chars": int(table["length"].sum()),
        "max_doc_chars": int(table["length"].max()) if not empty else 0,
        "duplicate_ratio": round(float(table["is_duplicate"].mean()), 4) if not empty else 0.0,
        "max_nonprintable_ratio": round(float(table["nonprintable_ratio"].max()), 4) if not empty else 0.0,
        "non_utf8_documents": int((~table["utf8_ok"]).sum()),
    }


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
            f"{v.min_doc_chars}..{v.max_doc_chars} chars per document",
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
    if champion_chars and v.min_fraction_of_champion > 0:
        floor = math.ceil(champion_chars * v.min_fraction_of_champion)
        checks.append(
            (
                "shrinkage",
                E.ExpectColumnSumToBeBetween(column="length", min_value=floor),
                f">= {floor:,} chars ({v.min_fraction_of_champion:.0%} of the champion's {champion_chars:,}; "
                "set validation.min_fraction_of_champion=0 to allow it)",
            )
        )
    for name, pattern in v.secret_patterns.items():
        checks.append(
            (
                f"secret:{name}",
                E.ExpectColumnValuesToNotMatchRegex(column="text", regex=pattern),
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


def run_suite(
    table: pd.DataFrame, params: Params, corpus: str, champion_chars: int | None = None
) -> ValidationReport:
    """Run the GE suite on the table and turn its results into named checks with examples."""
    gx = _import_gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    stats = table_stats(table)
    suite_checks = build_suite(params, champion_chars)
    if table.empty:
        # Column metrics are undefined on no rows (GE reports a mean of None as a failure), so say plainly
        # that there is nothing instead of failing every check for the wrong reason.
        why = "0 documents: every corpus file is empty or whitespace-only"
        checks = [Check(n, e.expectation_type, False, 0, b, why) for n, e, b in suite_checks[:2]]
        return ValidationReport(corpus, False, stats, checks)

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
    # SUMMARY carries the first offending row indices, which is all an example needs
    result = batch_def.get_batch(batch_parameters={"dataframe": table}).validate(
        suite, result_format="SUMMARY"
    )

    # GE does not keep the suite's order in its results: match them up by expectation id
    by_id = {res.expectation_config.id: res for res in result.results}
    checks = []
    for name, expectation, bound in suite_checks:
        res = by_id[expectation.id]
        detail = res.result or {}
        error = _ge_error(res)
        if error:
            checks.append(Check(name, expectation.expectation_type, False, f"error: {error}", bound))
            continue
        rows = list(detail.get("partial_unexpected_index_list") or [])
        example = None if res.success else _example(name, table, rows, params)
        observed = _observed(name, detail, table)
        checks.append(Check(name, expectation.expectation_type, bool(res.success), observed, bound, example))
    return ValidationReport(corpus, all(c.success for c in checks), stats, checks)


def validate_corpus(
    path: Path, params: Params, name: str | None = None, champion_chars: int | None = None
) -> ValidationReport:
    """Validate the corpus at path (file or directory); name is what the report calls it (default: path).

    champion_chars turns on the shrink guard (see build_suite). A CorpusError (missing, empty directory,
    unreadable, malformed JSONL) propagates to the caller.
    """
    table = document_table(read_documents(path, params.ingest))
    return run_suite(table, params, name or str(path), champion_chars)


# ---------------------------------------------------------------------------------------------
# observed values and examples: what a person needs to find the problem


def _native(value: Any) -> Any:
    """numpy scalars -> plain Python, floats rounded, so the report serializes cleanly."""
    if hasattr(value, "item"):
        value = value.item()
    return round(value, 4) if isinstance(value, float) else value


def _observed(name: str, detail: dict, table: pd.DataFrame) -> Any:
    if "observed_value" in detail:
        value = _native(detail["observed_value"])
        return int(value) if name in ("min_total_chars", "shrinkage") and isinstance(value, float) else value
    count = int(detail.get("unexpected_count") or 0)
    what = {
        "not_null": "null",
        "doc_length": "out of range",
        "utf8": "from non-UTF-8 files",
        "nonprintable_ratio": "over the bound",
    }.get(name, "matching")
    text = f"{count} of {len(table)} documents {what}"
    if name == "doc_length":
        text += f" (shortest {int(table['length'].min())}, longest {int(table['length'].max())} chars)"
    elif name == "nonprintable_ratio":
        text += f" (worst {float(table['nonprintable_ratio'].max()):.4f})"
    return text


def _snippet(text: str, start: int = 0, limit: int = SNIPPET_CHARS) -> str:
    """ascii() of text[start:], at most limit characters in all, '...' marking a cut: terminal-safe."""
    head = "..." if start > 0 else ""
    piece = text[start : start + limit]
    while True:
        tail = "..." if start + len(piece) < len(text) else ""
        out = f"{head}{ascii(piece)}{tail}"
        if len(out) <= limit or not piece:
            return out
        piece = piece[: len(piece) - max(1, (len(out) - limit) // 4)]  # escapes make repr longer


def _mask(secret: str) -> str:
    """Enough to recognise the kind of secret (AKIA...), never enough to use it."""
    keep = 4 if len(secret) >= 16 else 0
    return secret[:keep] + "*" * min(len(secret) - keep, 20)


def _secret_example(source: str, text: str, pattern: str, patterns: dict[str, str]) -> str:
    match = re.search(pattern, text)
    if not match:  # GE and re disagree on the pattern; still say where
        return source
    # The text just before the secret, with any other secret in it masked too; never the text after it
    # (a private key's body follows its header).
    before = text[max(0, match.start() - 200) : match.start()]
    for other in patterns.values():
        before = re.sub(other, lambda m: _mask(m.group(0)), before)
    masked = _mask(match.group(0))
    context = before[-40:]
    while context and len(ascii(context + masked)) > SNIPPET_CHARS - 3:
        context = context[1:]
    cut = "..." if len(context) < match.start() else ""
    return f"{source} at char {match.start()}: {cut}{ascii(context + masked)}"


def _bad_char_example(source: str, text: str, detail: str) -> str:
    """Show the first nonprintable character in context, not the (possibly clean) start of the document."""
    bad = NONPRINTABLE.search(text)
    if not bad:
        return f"{source} {detail}: {_snippet(text)}"
    return f"{source} {detail}, first at char {bad.start()}: {_snippet(text, max(0, bad.start() - 20))}"


def _example(name: str, table: pd.DataFrame, rows: list[int], params: Params) -> str | None:
    """One offending document: its source and a short snippet; a secret is masked, never echoed."""
    if name == "duplicate_ratio":
        dupes = table.index[table["is_duplicate"]]
        if not len(dupes):
            return None
        row = table.loc[dupes[0]]
        original = table.loc[table.index[table["sha256"] == row.sha256][0]]
        return f"{row.source} duplicates {original.source}: {_snippet(row.text)}"
    if not rows:
        return None
    if name == "utf8":
        # the first document of a non-UTF-8 file may be clean: prefer one that shows a replaced byte
        rows = [r for r in rows if "\ufffd" in table.at[r, "text"]] or rows
    row = table.loc[rows[0]]
    if name.startswith("secret:"):
        patterns = params.validation.secret_patterns
        return _secret_example(row.source, row.text, patterns[name.split(":", 1)[1]], patterns)
    if name in ("utf8", "nonprintable_ratio"):
        return _bad_char_example(row.source, row.text, f"(nonprintable ratio {row.nonprintable_ratio:.3f})")
    if name == "doc_length":
        return f"{row.source} ({row.length} chars): {_snippet(row.text)}"
    return str(row.source)


# ---------------------------------------------------------------------------------------------
# reporting


def format_failure(report: ValidationReport) -> str:
    """One line per failed check: observed value, bound and an example, for the terminal."""
    lines = [f"validation failed for {report.corpus}:"]
    for c in report.failed:
        example = f" (example: {c.example})" if c.example else ""
        lines.append(f"  {c.name}: observed {c.observed}, bound {c.bound}{example}")
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    """A reader (DVC, a dashboard) sees the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cell(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def write_report(report: ValidationReport, out_dir: Path) -> None:
    """report.json for machines (and `dvc metrics`), report.md for people."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / "report.json", json.dumps(asdict(report), indent=2, default=str) + "\n")
    stats = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in report.stats.items())
    md = [
        f"# Corpus validation: {'passed' if report.success else 'FAILED'}",
        "",
        f"Corpus `{report.corpus}`: {stats}.",
        "",
        "| check | ok | observed | bound | example |",
        "|---|---|---|---|---|",
        *(
            f"| {_cell(c.name)} | {'ok' if c.success else '**FAIL**'} | {_cell(c.observed)} "
            f"| {_cell(c.bound)} | {_cell(c.example or '')} |"
            for c in report.checks
        ),
    ]
    _write_atomic(out_dir / "report.md", "\n".join(md) + "\n")


def main(argv: list[str] | None = None) -> int:
    """The DVC stage: validate data/, write artifacts/validation/report.{json,md}; exit 1 on bad data."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.validate",
        description="Validate the workspace's data/ against params.yaml `validation:` and write "
        "artifacts/validation/report.{json,md}. Exit 0 valid, 1 invalid, 2 unreadable corpus or bad config.",
    )
    parser.parse_args(argv)
    try:
        ws = Workspace.find()
        params = load_params(ws.root)
        report = validate_corpus(ws.data, params, name=f"{ws.data.name}/")
    except (ConfigError, CorpusError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        write_report(report, ws.validation_dir)
    except OSError as exc:  # say which directory, not a traceback
        print(f"error: cannot write the report to {ws.validation_dir}: {exc}", file=sys.stderr)
        return 2
    s = report.stats
    print(
        f"validate: {s['documents']:,} documents in {s['files']:,} file(s), {s['total_chars']:,} chars: "
        f"{'passed' if report.success else 'FAILED'} ({ws.validation_dir / 'report.md'})"
    )
    if not report.success:
        print(format_failure(report), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
