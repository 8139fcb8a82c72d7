"""Contamination: the share of val and test n-grams that also occur in train, counted in the text.

The units are words, NFKC-normalised and casefolded, with punctuation dropped, as GPT-3's analysis and
datatrove's decontamination count them. Scripts written without spaces (Chinese, Japanese, Thai, ...)
have no words to split on, so each of their characters is a unit. So the same documents give the same
figure whatever the tokenizer. Each held-out document counts under its main script, so a corpus that
mixes languages reports each one apart.

Memory is bounded: at most HELD_OUT_SAMPLE held-out n-grams are kept (a hash-based sample, and a
sampled n-gram is sampled in every split, train included), and train streams past them in chunks.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections import Counter
from collections.abc import Iterable
from functools import cache, lru_cache

import numpy as np
import regex

from lmforge.data.shards import sorted_unique

UNIT_NAME = "words"  # what the figure counts, for the report: n-grams of words (characters where no spaces)
NO_SPACE_SCRIPTS = ("Han", "Hiragana", "Katakana", "Thai", "Lao", "Khmer", "Myanmar", "Tibetan")
_NO_SPACE = "".join(rf"\p{{{s}}}" for s in NO_SPACE_SCRIPTS)
# a character of a script without spaces, or a run of word characters of any other script
UNIT = regex.compile(rf"[{_NO_SPACE}]|[^\W{_NO_SPACE}]+")
COMMON = "Common"  # digits and signs that belong to no one script

NGRAM_HASH_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd: the polynomial hash wraps mod 2**64
BOUNDARY = np.uint64(0)  # between documents; a unit's id is never 0
CHUNK_UNITS = 1 << 22  # units hashed at a time: about 150 MB of temporaries
HELD_OUT_SAMPLE = 1 << 23  # held-out n-grams kept at most, for the estimate


def ngram_hashes(ids: np.ndarray, n: int, boundary: int) -> np.ndarray:
    """A mixed 64-bit hash of every n-gram of ids that does not cross a boundary id."""
    if len(ids) < n:
        return np.empty(0, np.uint64)
    ids = ids.astype(np.uint64)
    count = len(ids) - n + 1
    h = np.zeros(count, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * NGRAM_HASH_BASE + ids[j : j + count]
        # splitmix64's finalizer: every bit of the result depends on every unit, so a threshold on the
        # hash is a uniform sample
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    crossed = np.concatenate([[0], np.cumsum(ids == boundary)])
    return h[crossed[n:] == crossed[:count]]


@cache
def script_of(char: str) -> str:
    """The Unicode script a character's name starts with (LATIN, CYRILLIC, ...); CJK is Han."""
    word = unicodedata.name(char, "").split(" ", 1)[0]
    if word == "CJK":
        return "Han"
    if not word or word in ("DIGIT", "FULLWIDTH", "SUPERSCRIPT", "SUBSCRIPT", "VULGAR", "ROMAN", "CIRCLED"):
        return COMMON
    return word.capitalize()


@lru_cache(maxsize=1 << 21)  # a bound on memory, not on correctness
def unit_id(unit: str) -> int:
    """A stable 64-bit id (the same in every process and engine), never BOUNDARY."""
    digest = hashlib.blake2b(unit.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") | 1


def units_of(text: str) -> tuple[list[int], str]:
    """A document's units as ids, and its main script."""
    units = UNIT.findall(unicodedata.normalize("NFKC", text).casefold())
    scripts = Counter(script_of(u[0]) for u in units)
    if len(scripts) > 1:
        scripts.pop(COMMON, None)
    return [unit_id(u) for u in units], (scripts.most_common(1)[0][0] if scripts else COMMON)


class _NGrams:
    """Documents' n-gram hashes, sampled below cut: documents are joined with BOUNDARY between them and
    hashed about CHUNK_UNITS units at a time."""

    def __init__(self, n: int, cut: np.uint64 | None):
        self.n, self.cut = n, cut
        self.buffer: list[int] = []
        self.parts: list[np.ndarray] = []

    def add(self, ids: list[int]) -> None:
        self.buffer.extend(ids)
        self.buffer.append(0)
        if len(self.buffer) >= CHUNK_UNITS:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            h = ngram_hashes(np.array(self.buffer, np.uint64), self.n, BOUNDARY)
            self.parts.append(h if self.cut is None else h[h < self.cut])
            self.buffer = []

    def unique(self, return_counts: bool = False):
        self.flush()
        return sorted_unique(np.concatenate([np.empty(0, np.uint64), *self.parts]), return_counts=return_counts)


def contamination(held_out: Iterable[tuple[str, str]], train: Iterable[str], n: int, held_out_chars: int) -> dict:
    """The share of val and test word n-grams (GPT-3's check, n=13) that also occur in train, overall and by
    script. held_out yields (split, text); held_out_chars (their length) sets the sample rate."""
    # units never outnumber characters: a rate set from characters keeps at most HELD_OUT_SAMPLE n-grams
    rate = min(1.0, HELD_OUT_SAMPLE / max(held_out_chars, 1))
    cut = None if rate >= 1 else np.uint64(int(rate * 2**64))

    groups: dict[tuple[str, str], _NGrams] = {}  # (split, script) -> its n-grams
    for split, text in held_out:
        ids, script = units_of(text)
        groups.setdefault((split, script), _NGrams(n, cut)).add(ids)
    held = {group: ngrams.unique(return_counts=True) for group, ngrams in groups.items()}
    wanted = sorted_unique(np.concatenate([np.empty(0, np.uint64), *(unique for unique, _ in held.values())]))

    # train streams past: each chunk keeps only what it shares with the held-out n-grams
    train_ngrams, found = _NGrams(n, cut), []
    for text in train:
        train_ngrams.add(units_of(text)[0])
        if train_ngrams.parts:
            found.append(np.intersect1d(wanted, sorted_unique(train_ngrams.parts.pop()), assume_unique=True))
    found.append(np.intersect1d(wanted, train_ngrams.unique(), assume_unique=True))
    seen = sorted_unique(np.concatenate([np.empty(0, np.uint64), *found]))

    hits: dict[tuple[str, str], tuple[int, int]] = {}  # (split, script) -> (n-grams seen in train, n-grams)
    for group, (unique, counts) in held.items():
        _, hit, _ = np.intersect1d(unique, seen, assume_unique=True, return_indices=True)
        hits[group] = (int(counts[hit].sum()), int(counts.sum()))

    def shares(of: list[tuple[str, str]]) -> dict:
        out = {}
        for split in ("val", "test"):
            seen_n = sum(hits[g][0] for g in of if g[0] == split)
            total = sum(hits[g][1] for g in of if g[0] == split)
            out[split] = round(seen_n / total, 6) if total else 0.0
            out[f"{split}_ngrams"] = total
        return out

    scripts = sorted({script for _, script in hits})
    return {
        "unit": UNIT_NAME,
        "ngram": n,
        "sample_rate": round(rate, 6),
        **shares(list(hits)),
        "by_script": {s: shares([g for g in hits if g[1] == s]) for s in scripts},
    }
