"""Measuring a corpus for validation: one streaming pass over its documents, each filtered by the one
policy (DocumentFilter) and measured. The result is a table of numbers per document (a few dozen bytes
each, never the text), counts and examples by reason, and the dropped records, written out as they go."""

from __future__ import annotations

import json
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import IO

from tqdm import tqdm

from lmforge.config import Params
from lmforge.data.chat import RECORD_PROBLEMS
from lmforge.data.corpus import Corpus
from lmforge.data.documents import DocumentFacts, DocumentFilter, Verdict
from lmforge.data.engines import DataEngine, data_engine

EXAMPLES_PER_REASON = 3
# quality, and conversation records that cannot be trained on: counted against max_dropped_fraction
DROP_REASONS = ("nonprintable", "too_short", "too_long", *RECORD_PROBLEMS)
DUPLICATE_REASONS = ("duplicate", "near_duplicate")  # counted against max_duplicate_ratio


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
