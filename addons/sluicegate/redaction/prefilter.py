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

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

try:  # optional: `pip install sluicegate[fast]`
    import hyperscan
except ImportError:  # pragma: no cover - exercised where the wheel is not installed
    # An optional module: None when absent (checked by `available()`); mypy types the import.
    hyperscan = None  # type: ignore[assignment,unused-ignore]

Key = tuple[str, Any]  # (keyword, its follow pattern or None), as keywords.Key
# Records the follows after one occurrence: (haystack, start, hits), as `_Word.follow_hits`.
FollowHits = Callable[[str, int, dict[Any, list[int]]], None]
# One keyword: (keyword, whether its start is wanted, its follows' recorder or None, whether
# the index matches those follows in the lowercased text).
Word = tuple[str, bool, FollowHits | None, bool]


def available() -> bool:
    return hyperscan is not None and os.environ.get("SLUICEGATE_PURE_PYTHON", "") in ("", "0")


def _literal(keyword: str) -> bytes:
    """A Hyperscan expression matching exactly these bytes."""
    return "".join(f"\\x{byte:02x}" for byte in keyword.encode("ascii")).encode("ascii")


class HyperscanKeywords:
    """One compiled database of a keyword index's keywords; `hits` as KeywordIndex.hits."""

    def __init__(self, words: Sequence[Word]) -> None:
        assert hyperscan is not None
        self._words = tuple(words)
        self._lengths = tuple(len(word[0]) for word in words)
        flags = [
            hyperscan.HS_FLAG_CASELESS if keyword == keyword.lower() else 0 for keyword, *_ in words
        ]
        self._db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        self._db.compile(
            expressions=[_literal(keyword) for keyword, *_ in words],
            ids=list(range(len(words))),
            elements=len(words),
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
        try:
            return cls(words)
        except hyperscan.error:  # pragma: no cover - a pattern Hyperscan refuses: stay exact
            return None

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
        found: list[tuple[int, int]] = []
        append = found.append

        def on_match(ident: int, _start: int, end: int, _flags: int, _context: Any) -> None:
            append((ident, end))

        self._db.scan(text.encode("ascii"), match_event_handler=on_match, scratch=self._scratch())
        hits: dict[Key, list[int]] = {}
        if not found:
            return hits
        words, lengths = self._words, self._lengths
        for ident, end in found:
            keyword, plain, follow, in_folded = words[ident]
            start = end - lengths[ident]
            if plain:
                hits.setdefault((keyword, None), []).append(start)
            if follow is not None:
                if in_folded and folded is None:
                    folded = text.lower()
                follow(folded if in_folded else text, start, hits)  # type: ignore[arg-type]
        for positions in hits.values():
            positions.sort()
        return hits
