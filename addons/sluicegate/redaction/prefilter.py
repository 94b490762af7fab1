"""Keyword occurrences found by one Hyperscan scan, exactly as `keywords.KeywordIndex` finds them.

The pure-Python keyword index costs a dozen regex passes per text, most of the time redaction
takes on short JSON strings. When the optional `hyperscan` package (PyPI wheels bundle the
library) is installed, one scan of the text's bytes finds every keyword at once: lowercase
keywords with Hyperscan's ASCII case folding, others exactly. Positions are then handed to the
same Python code as before: follow patterns are matched in Python on the same copy of the text
the index would have used (the lowercased text, or the text itself for keywords with a capital
letter that the index searches there), and the result is the same mapping, sorted the same way.

Exactness: only ASCII texts are scanned here (there `text.lower()` folds exactly the letters
Hyperscan folds, and byte offsets are character offsets); any other text, a pack with a keyword
that is not ASCII, or no `hyperscan` module, uses the pure-Python index, which stays the
reference (a property test compares the two). `SLUICEGATE_PURE_PYTHON=1` switches this off.

Scratch space is per thread: large bodies are redacted on worker threads.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from collections.abc import Sequence
from typing import Any

from sluicegate.redaction import hsfollow

try:  # optional: `pip install sluicegate[fast]`
    import hyperscan
except ImportError:  # pragma: no cover - exercised where the wheel is not installed
    # An optional module: None when absent (checked by `available()`); mypy types the import.
    hyperscan = None  # type: ignore[assignment,unused-ignore]

Key = tuple[str, Any]  # (keyword, its follow pattern or None), as keywords.Key
# One keyword: (keyword, whether its start is wanted, its follow patterns, whether the index
# matches those follows in the lowercased text).
Word = tuple[str, bool, tuple[re.Pattern[str], ...], bool]


def available() -> bool:
    return hyperscan is not None and os.environ.get("SLUICEGATE_PURE_PYTHON", "") in ("", "0")


def follows_compiled() -> bool:
    """Whether keyword + follow expressions are scanned (hsfollow.py); `SLUICEGATE_HS_FOLLOW=0`
    keeps every follow checked in Python after its keyword (the previous behaviour)."""
    return os.environ.get("SLUICEGATE_HS_FOLLOW", "") in ("", "1")


@functools.cache
def _compiles(source: str) -> bool:
    """Whether Hyperscan takes this follow expression with start-of-match tracking."""
    assert hyperscan is not None
    database = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    try:
        database.compile(expressions=[source.encode("ascii")], ids=[0], elements=1, flags=[_SOM])
    except hyperscan.error:
        return False
    return True


_SOM = 0 if hyperscan is None else hyperscan.HS_FLAG_SOM_LEFTMOST


class _Occurrences:
    """A keyword expression: where a keyword occurs, and the follows checked after each."""

    __slots__ = ("follows", "in_folded", "keyword", "length", "plain")

    def __init__(
        self, keyword: str, plain: bool, follows: tuple[re.Pattern[str], ...], in_folded: bool
    ) -> None:
        self.keyword, self.length, self.plain = keyword, len(keyword), plain
        self.follows = tuple((follow, hsfollow.ignoring_case(follow).match) for follow in follows)
        self.in_folded = in_folded


class _Gate:
    """A keyword + follow expression (hsfollow.py): its matches start at least wherever the
    follow matches after the keyword; the follow is then matched in Python there."""

    __slots__ = ("exact", "follow", "in_folded", "keyword", "length", "match")

    def __init__(self, keyword: str, follow: re.Pattern[str], in_folded: bool) -> None:
        self.keyword, self.length, self.follow = keyword, len(keyword), follow
        self.match = hsfollow.ignoring_case(follow).match
        self.in_folded = in_folded
        self.exact = keyword != keyword.lower()  # found exactly, else in the lowercased text


def _literal(keyword: str) -> bytes:
    """A Hyperscan expression matching exactly these bytes."""
    return "".join(f"\\x{byte:02x}" for byte in keyword.encode("ascii")).encode("ascii")


class HyperscanKeywords:
    """One compiled database of a keyword index's keywords (and of their follows, where
    hsfollow.py translates them); `hits` as KeywordIndex.hits."""

    def __init__(
        self, words: Sequence[Word], *, gate_follows: bool = True, check_each: bool = False
    ) -> None:
        """`check_each`: compile each follow expression alone first and leave those Hyperscan
        refuses to the Python check (else one refusal fails the whole database)."""
        assert hyperscan is not None
        expressions: list[bytes] = []
        flags: list[int] = []
        self._entries: list[_Occurrences | _Gate] = []
        for keyword, plain, follows, in_folded in words:
            gated: list[tuple[re.Pattern[str], str]] = []
            unchecked: list[re.Pattern[str]] = []
            for follow in follows:
                source = (
                    hsfollow.follow_source(keyword, follow, in_folded) if gate_follows else None
                )
                if source is not None and (not check_each or _compiles(source)):
                    gated.append((follow, source))
                else:
                    unchecked.append(follow)
            if plain or unchecked:
                expressions.append(_literal(keyword))
                flags.append(hyperscan.HS_FLAG_CASELESS if keyword == keyword.lower() else 0)
                self._entries.append(_Occurrences(keyword, plain, tuple(unchecked), in_folded))
            for follow, source in gated:
                expressions.append(source.encode("ascii"))
                flags.append(_SOM)
                self._entries.append(_Gate(keyword, follow, in_folded))
        self.gated = sum(isinstance(entry, _Gate) for entry in self._entries)
        self._db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        self._db.compile(
            expressions=expressions,
            ids=list(range(len(expressions))),
            elements=len(expressions),
            flags=flags,
        )
        self._prototype = hyperscan.Scratch(self._db)
        self._local = threading.local()

    @classmethod
    def build(cls, words: Sequence[Word]) -> HyperscanKeywords | None:
        """None where the pure-Python index must do: no hyperscan, or a keyword it cannot take."""
        if not words or not available():
            return None
        if any(not keyword or not keyword.isascii() for keyword, *_ in words):
            return None
        # Every follow at once (one compilation, the usual case), else each one tried alone
        # (a follow expression Hyperscan refuses stays with Python), else keywords only.
        attempts = [{"gate_follows": True}, {"gate_follows": True, "check_each": True}]
        attempts = attempts if follows_compiled() else []
        for options in [*attempts, {"gate_follows": False}]:
            try:
                return cls(words, **options)
            except hyperscan.error:
                continue
        return None  # pragma: no cover - a keyword database Hyperscan refuses: stay exact

    def _scratch(self) -> Any:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = self._prototype.clone()
        return scratch

    def hits(self, text: str, folded: str | None) -> dict[Key, list[int]] | None:
        """key -> sorted offsets, as KeywordIndex.hits; None for a text this cannot scan
        exactly (not ASCII)."""
        if not text.isascii():
            return None
        found: list[tuple[int, int, int]] = []
        append = found.append

        def on_match(ident: int, start: int, end: int, _flags: int, _context: Any) -> None:
            append((ident, start, end))

        self._db.scan(text.encode("ascii"), match_event_handler=on_match, scratch=self._scratch())
        hits: dict[Key, list[int]] = {}
        if not found:
            return hits
        entries = self._entries
        # gate index -> [start, end) ranges whose keyword occurrences may be followed
        ranges: dict[int, list[tuple[int, int]]] = {}
        for ident, som, end in found:
            entry = entries[ident]
            if isinstance(entry, _Gate):
                ranges.setdefault(ident, []).append((som, end))
                continue
            start = end - entry.length
            keyword = entry.keyword
            if entry.plain:
                hits.setdefault((keyword, None), []).append(start)
            if entry.follows:
                if entry.in_folded and folded is None:
                    folded = text.lower()
                haystack = folded if entry.in_folded else text
                after = start + entry.length
                for follow, match in entry.follows:
                    matched = match(haystack, after)  # type: ignore[arg-type]
                    if matched is not None:
                        hits.setdefault((keyword, follow), []).append(matched.end())
        for ident, spans in ranges.items():
            gate = entries[ident]
            assert isinstance(gate, _Gate)
            if folded is None and (gate.in_folded or not gate.exact):
                folded = text.lower()
            find = (text if gate.exact else folded).find  # type: ignore[union-attr]
            haystack = folded if gate.in_folded else text
            keyword, length, match = gate.keyword, gate.length, gate.match
            ends: list[int] = []
            spans.sort()
            # Occurrences before `position` have been checked, and so have those ending by
            # `covered` that start in a later span (an earlier span, starting no later,
            # held them): each character is searched once however many ends a start has.
            position = covered = 0
            for low, high in spans:
                index = find(keyword, max(low, position, covered - length + 1), high)
                covered = max(covered, high)
                while index >= 0:
                    matched = match(haystack, index + length)  # type: ignore[arg-type]
                    if matched is not None:
                        ends.append(matched.end())
                    position = index + 1
                    index = find(keyword, position, high)
            if ends:
                hits.setdefault((keyword, gate.follow), []).extend(ends)
        for positions in hits.values():
            positions.sort()
        return hits
