"""The per-document policy: what is measured of each document, and which documents are kept.

Two halves, so that an engine can run the expensive one anywhere:
  - DocumentFacts: hashes, lengths, regex counts and quoted snippets of one document, computed from its
    text alone (FactFinder); any process may compute them, in any order;
  - DocumentFilter: the decisions, made in corpus order, since a document is a duplicate only of one
    before it. It needs the facts, never the text (except for near-duplicates).
validate and preprocess both run them, so what is validated is exactly what is trained on. KeepPlan
carries the decisions back to whatever reads the files again.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from lmforge.config import IngestConfig, ValidationConfig
from lmforge.data.chat import LONE_SURROGATE, canonical, conversation_text, parse_conversation
from lmforge.data.formats import Document

# What a reader cannot see or a tokenizer should not learn: U+FFFD (what undecodable bytes became), the
# C0 controls other than \t \n \r, DEL and the C1 controls, lone surrogates (JSON "\ud800" escapes) and
# private-use characters. One compiled class, counted in C.
NONPRINTABLE = re.compile(
    "[\ufffd\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ue000-\uf8ff\U000f0000-\U0010ffff]"
)
BLANK_LINES = re.compile(r"\n(?:[^\S\n]*\n)+")  # a paragraph break: one or more whitespace-only lines
SNIPPET_CHARS = 80
SHINGLE_CHARS = 5  # near-duplicates: MinHash over character 5-grams, which works for every script


# ---------------------------------------------------------------------------------------------
# the facts: what the filter and the report need, computed from one document alone


def paragraphs(text: str) -> list[str]:
    return [p for p in BLANK_LINES.split(text.strip()) if p.strip()]


def _key(text: str) -> int:
    # surrogatepass: a lone surrogate from JSON must hash, not crash, and not collide with U+FFFD
    return int.from_bytes(
        hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little"
    )


def document_digest(text: str) -> bytes:
    """The content hash preprocess splits by (of the document as read, so no engine needs the kept text)."""
    return hashlib.sha256(text.encode("utf-8", errors="replace")).digest()


@dataclass
class DocumentFacts:
    """One document, measured: everything the filter, the table and the examples need, and no decision.

    This is the per-document work (hashing, regexes, snippets); it depends on nothing but the document,
    so an engine may compute it anywhere, in any order. The decisions (DocumentFilter) stay sequential.
    """

    file: int  # the file's index in the corpus, and the document's index in that file
    index: int
    source: str
    utf8_ok: bool
    blank: bool  # only whitespace: skipped, like a blank line
    chars: int = 0
    whole: int = 0  # key of the whole text
    keys: list[int] = field(default_factory=list)  # per paragraph; [whole] when the text is one paragraph
    paragraph_chars: list[int] = field(default_factory=list)
    paragraph_nonprintable: list[int] = field(default_factory=list)  # [] when nonprintable is 0
    nonprintable: int = 0
    secret_counts: list[int] = field(default_factory=list)  # per validation.secret_patterns entry
    secret_examples: list[str | None] = field(default_factory=list)
    snippet: str = ""  # the start of the text, secrets masked, quoted
    bad_char: str = ""  # ", first at char N): <snippet there>", when there are any (or bytes were not UTF-8)
    digest: bytes = b""
    text: str | None = None  # carried only when near-duplicate detection needs the kept text
    problem: str | None = None  # a conversation record that cannot be trained on: lmforge.data.chat's reason
    problem_detail: str | None = None


class FactFinder:
    """Computes DocumentFacts with the compiled secret patterns of one ValidationConfig.

    A conversation (ingest.format chat) is measured on what its messages say, as one paragraph: it is
    kept or dropped whole, and its duplicates and split go by its messages, not the rest of its record."""

    def __init__(self, cfg: ValidationConfig, ingest: IngestConfig | None = None):
        self.patterns = [re.compile(p) for p in cfg.secret_patterns.values()]
        self.keep_text = cfg.near_duplicates
        self.chat = ingest if ingest is not None and ingest.format == "chat" else None

    def __call__(self, doc: Document, file: int, index: int) -> DocumentFacts:
        text, identity, problem = doc.text, doc.text, None
        if self.chat is not None and text.strip():
            c = self.chat
            messages, problem = parse_conversation(
                json.loads(text), c.messages_field, c.prompt_field, c.completion_field
            )
            if messages is not None:
                text, identity = conversation_text(messages), canonical(messages)
        if not text.strip():
            return DocumentFacts(file, index, doc.source, doc.utf8_ok, blank=True)
        paras = [text] if self.chat is not None else paragraphs(text)
        whole = _key(identity)
        single = paras == [text]
        nonprintable = len(NONPRINTABLE.findall(text))
        counts, examples, masked = [], [], text
        for pattern in self.patterns:  # on the raw text: a dropped document is still read
            matches = list(pattern.finditer(text))
            counts.append(len(matches))
            examples.append(secret_example(doc.source, text, matches[0], self.patterns) if matches else None)
        if any(counts):
            masked = mask_secrets(text, self.patterns)
        bad_char = ""
        if nonprintable or not doc.utf8_ok:
            bad = NONPRINTABLE.search(masked)
            start = max(0, bad.start() - 20) if bad else 0
            bad_char = f"{f', first at char {bad.start()}' if bad else ''}): {snippet_of(masked, start)}"
        return DocumentFacts(
            file, index, doc.source, doc.utf8_ok, blank=False, chars=len(text), whole=whole,
            keys=[whole] if single else [_key(p) for p in paras],
            paragraph_chars=[len(p) for p in paras],
            paragraph_nonprintable=[len(NONPRINTABLE.findall(p)) for p in paras] if nonprintable else [],
            nonprintable=nonprintable, secret_counts=counts, secret_examples=examples,
            snippet=snippet_of(masked), bad_char=bad_char, digest=document_digest(identity),
            text=text if self.keep_text else None,
            problem=problem and problem[0], problem_detail=problem and problem[1],
        )  # fmt: skip


def kept_text(text: str, fresh: list[int] | None) -> str:
    """The text a verdict keeps: all of it (fresh None), or its fresh paragraphs. A lone surrogate (a JSON
    escape) becomes U+FFFD, since no tokenizer can encode it."""
    if fresh is not None:
        paras = paragraphs(text)
        text = "\n\n".join(paras[i] for i in fresh)
    return text if text.isascii() else LONE_SURROGATE.sub("\ufffd", text)


# ---------------------------------------------------------------------------------------------
# the per-document policy


@dataclass
class Verdict:
    reason: str | None  # why it was dropped: one of DROP_REASONS or DUPLICATE_REASONS; None when kept
    length: int  # characters after duplicate paragraphs were removed
    nonprintable_ratio: float
    fresh: list[int] | None = None  # the paragraphs kept when some were removed; None: the whole text
    removed_paragraphs: int = 0
    duplicate_of: str | None = None  # the source of the earlier, identical document

    @property
    def kept(self) -> bool:
        return self.reason is None


class DocumentFilter:
    """Keeps or drops each document in corpus order; deterministic, so validate and preprocess agree.

    Order: exact duplicates first (of a whole earlier document, or every paragraph seen before), then
    the remaining paragraphs are judged on the quality bounds, then near-duplicates when enabled. Only a
    kept document's paragraphs count as seen, so a clean copy after a dropped one is still kept.
    """

    def __init__(self, cfg: ValidationConfig):
        self.cfg = cfg
        self.seen_paragraphs: set[int] = set()
        self.first_source: dict[int, str] = {}  # whole-document key -> the first kept document's source
        self.lsh, self.sketched = None, 0  # sketched: the next LSH key
        if cfg.near_duplicates:
            from datasketch import MinHashLSH

            self.lsh = MinHashLSH(threshold=cfg.near_duplicate_threshold, num_perm=cfg.minhash_permutations)

    def __call__(self, facts: DocumentFacts) -> Verdict:
        if facts.problem is not None:
            return Verdict(facts.problem, facts.chars, 0.0)
        if (original := self.first_source.get(facts.whole)) is not None:
            return Verdict("duplicate", 0, 0.0, duplicate_of=original)
        if not facts.keys:
            return Verdict("too_short", 0, 0.0)
        keys = facts.keys
        fresh = [i for i, k in enumerate(keys) if k not in self.seen_paragraphs]
        if not fresh:
            return Verdict("duplicate", 0, 0.0)
        if len(fresh) == len(keys):
            length, bad, kept = facts.chars, facts.nonprintable, None
        else:  # the fresh paragraphs, joined by blank lines
            length = sum(facts.paragraph_chars[i] for i in fresh) + 2 * (len(fresh) - 1)
            bad = sum(facts.paragraph_nonprintable[i] for i in fresh) if facts.nonprintable else 0
            kept = fresh
        ratio = bad / max(length, 1)
        verdict = Verdict(None, length, ratio, fresh=kept, removed_paragraphs=len(keys) - len(fresh))
        if ratio > self.cfg.max_nonprintable_ratio:
            verdict.reason = "nonprintable"
        elif length < self.cfg.min_doc_chars:
            verdict.reason = "too_short"
        elif length > self.cfg.max_doc_chars:
            verdict.reason = "too_long"
        elif self.lsh is not None and self._near_duplicate(kept_text(facts.text, kept)):
            verdict.reason = "near_duplicate"
        if verdict.reason:
            return verdict
        self.first_source[facts.whole] = facts.source
        self.seen_paragraphs.update(keys[i] for i in fresh)
        return verdict

    def _near_duplicate(self, text: str) -> bool:
        from datasketch import MinHash

        norm = " ".join(text.lower().split())
        shingles = {norm[i : i + SHINGLE_CHARS] for i in range(max(1, len(norm) - SHINGLE_CHARS + 1))}
        sketch = MinHash(num_perm=self.cfg.minhash_permutations, seed=1)
        sketch.update_batch([s.encode("utf-8", "surrogatepass") for s in shingles])
        if self.lsh.query(sketch):
            return True
        self.lsh.insert(self.sketched, sketch)
        self.sketched += 1
        return False


class KeepPlan:
    """The filter's decisions by file: which documents to read again, and which of their paragraphs, in a
    form that can travel to the task reading each file."""

    def __init__(self, files: int):
        self.kept: list[dict[int, list[int] | None]] = [{} for _ in range(files)]

    def add(self, file: int, index: int, fresh: list[int] | None) -> None:
        self.kept[file][index] = fresh

    def count(self, file: int | None = None) -> int:
        return sum(map(len, self.kept)) if file is None else len(self.kept[file])


# ---------------------------------------------------------------------------------------------
# snippets: quoted, masked, short


def quote(text: str) -> str:
    """repr(): any script stays readable, while control, private-use and other invisible characters are
    escaped (terminal-safe); U+FFFD too, since it marks bytes that were not UTF-8."""
    return repr(text).replace("\ufffd", "\\ufffd")


def snippet_of(text: str, start: int = 0, limit: int = SNIPPET_CHARS) -> str:
    """text[start:] quoted, at most limit characters in all, '...' marking a cut."""
    head = "..." if start > 0 else ""
    piece = text[start : start + limit]
    while True:
        tail = "..." if start + len(piece) < len(text) else ""
        out = f"{head}{quote(piece)}{tail}"
        if len(out) <= limit or not piece:
            return out
        # escapes make the quoted form longer than the piece: shrink in proportion, by one at least
        piece = piece[: min(len(piece) - 1, len(piece) * (limit - 8) // len(out))]


def mask_secret(secret: str) -> str:
    """Enough to recognise the kind of secret (AKIA...), never enough to use it."""
    keep = 4 if len(secret) >= 16 else 0
    return secret[:keep] + "*" * min(len(secret) - keep, 20)


def mask_secrets(text: str, patterns: list[re.Pattern]) -> str:
    for pattern in patterns:
        text = pattern.sub(lambda m: mask_secret(m.group(0)), text)
    return text


def secret_example(source: str, text: str, match: re.Match, patterns: list[re.Pattern]) -> str:
    # The text just before the secret, with any other secret in it masked too; never the text after it
    # (a private key's body follows its header).
    before = mask_secrets(text[max(0, match.start() - 200) : match.start()], patterns)
    masked = mask_secret(match.group(0))
    context = before[-40:]
    while context and len(quote(context + masked)) > SNIPPET_CHARS - 3:
        context = context[1:]
    cut = "..." if len(context) < match.start() else ""
    return f"{source} at char {match.start()}: {cut}{quote(context + masked)}"
