"""The Great Expectations suite a corpus must pass, from params' `validation:` section, run over the
measured table; and, for each check, what it observed and an example, so a person can find the problem.

Great Expectations is imported only inside the functions that run the suite: it takes seconds to
import, and the CLI must start fast."""

from __future__ import annotations

import logging
import math
from typing import Any

from lmforge.config import Params
from lmforge.data.measures import DROP_REASONS, DUPLICATE_REASONS, Findings
from lmforge.runs.contracts import Check


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
