"""Finding every occurrence of a rule pack's keywords in a text, in a few passes.

CPython has no multi-string search, and the costs of what it has decide the design:
`str.find` for one word costs ~0.4-0.8 ns per character of text; an `re` pattern that starts
with one literal character is scanned for it at ~0.3 ns per character, plus ~30 ns where it
occurs; a pattern starting with a character class costs ~2.5 ns per character. So keywords
are grouped by an *anchor* character they contain, one that is rare in text (`_`, `-`, `k`,
a capital in an exact keyword...), and each group is found by one pattern that starts with
the anchor: `k(?=(en(?<=token)|ey(?<=key)|...))`. The lookbehind where a keyword ends checks
the part before the anchor, so only real occurrences come back to Python, and matching only
the anchor character finds overlapping occurrences too. Keywords that end with their anchor
are scanned in a reversed copy of the text (`_` then `phg` for `ghp_`), and a very rare
anchor is found with `str.find` (memchr) instead. Anchors are picked greedily with rough
character frequencies (`_PER_MILLE`); a keyword with no character worth a pass (`sonar`) is
found with `str.find`.

A key may also ask where a `followed_by` pattern, matched right after each occurrence, ends
(`Key`); that pattern runs inside the pass, so occurrences no rule wants (the word "token" in
prose) never reach Python either. Follows ignore case: they are matched in the lowercased
text.

A keyword in lowercase matches in any case (it is searched in `text.lower()`); one with a
capital letter matches exactly (searched in the text, or in the lowercased text and checked).

With the optional `hyperscan` package, ASCII texts are scanned once for every keyword instead
(prefilter.py); the passes here stay the reference and do every other text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from sluicegate.redaction.hsfollow import ignoring_case
from sluicegate.redaction.prefilter import HyperscanKeywords

# Rough frequency of characters in code, JSON and prose, per mille (case-sensitive).
# Only the order of magnitude matters: it steers the choice of anchors, never a result.
_PER_MILLE: dict[str, float] = {
    " ": 150,
    **dict(zip("etoainsrlhdcumpfgwybvkxjqz", (
        80, 65, 55, 55, 50, 50, 48, 45, 32, 30, 28, 28, 22, 20, 20, 15, 15, 12, 12, 10, 8, 6,
        4, 1.5, 1, 1,
    ), strict=True)),
    **dict.fromkeys("\n\"", 20),
    **dict.fromkeys(".,:_", 10),
    **dict.fromkeys("()=/0123", 7),
    **dict.fromkeys("-'{}\t456789", 4),
    **dict.fromkeys("[];#*\\`<>", 2),
    **dict.fromkeys("ACDEILMNOPRST", 2),
    **dict.fromkeys("BFGHUWY$+?", 1),
}  # fmt: skip
_RARE = 0.3  # any other character
# Indexes needing fewer passes than this are not worth a Hyperscan database.
FAST_MIN_PASSES = 3

# Costs in nanoseconds per character of text (see the module docstring), as measured.
_PASS = 0.3  # one anchored pattern: scanning for its anchor
_ATTEMPT = 0.03  # ...and trying it where the anchor occurs (30 ns), per mille of the anchor
_LOOKBEHIND = 0.012  # a lookbehind tried wherever the anchor occurs, per mille of it
_REVERSE = 0.3  # a reversed copy of the text, made once per call
_FIND_CHAR = 0.03  # `str.find` of one character (memchr)...
_FIND_ATTEMPT = 0.25  # ...and matching the pattern where it occurs (250 ns), per mille


def _by_find(char: str, folded: bool) -> bool:
    per_mille = _frequency(char, folded)
    return _FIND_CHAR + _FIND_ATTEMPT * per_mille < _PASS + _ATTEMPT * per_mille


def _pass_cost(per_mille: float) -> float:
    """A pass on an anchor this frequent, searched by its pattern or by `str.find`."""
    return min(_PASS + _ATTEMPT * per_mille, _FIND_CHAR + _FIND_ATTEMPT * per_mille)


def _find_cost(keyword: str) -> float:
    """`str.find` skips ahead by about the keyword's length."""
    return 0.25 + 1.4 / len(keyword)


def _frequency(char: str, folded: bool) -> float:
    """Per mille of `char` in the scanned text (the lowercased one if `folded`)."""
    exact = _PER_MILLE.get(char, _RARE)
    if folded and char.upper() != char:
        return exact + _PER_MILLE.get(char.upper(), _RARE)
    return exact


@dataclass(frozen=True)
class _Haystack:
    """Which copy of the text a pass scans: lowercased or not, reversed or not."""

    folded: bool
    reverse: bool

    def form(self, keyword: str) -> str | None:
        """How `keyword` appears in this copy; None if it cannot be found in it."""
        if self.folded:
            form = keyword.lower()
            if len(form) != len(keyword):
                return None
        elif keyword == keyword.lower():
            return None  # lowercase keywords match in any case: only the folded copy will do
        else:
            form = keyword
        return form[::-1] if self.reverse else form


# A keyword, and the `followed_by` pattern its occurrences must be followed by (or None).
Key = tuple[str, re.Pattern[str] | None]


@dataclass(frozen=True)
class _Word:
    """A keyword with everything asked about its occurrences."""

    keyword: str
    plain: bool  # where it starts is wanted
    follows: tuple[re.Pattern[str], ...]  # where each of these, matched after it, ends

    def follow_hits(self, haystack: str, start: int, hits: dict[Key, list[int]]) -> None:
        """Record the follows matching after an occurrence at `start` (found in Python)."""
        for follow in self.follows:
            match = ignoring_case(follow).match(haystack, start + len(self.keyword))
            if match is not None:
                hits.setdefault((self.keyword, follow), []).append(match.end())


@dataclass(frozen=True)
class _Entry:
    word: _Word
    form: str  # as it appears in the scanned copy (see `_Haystack.form`)
    anchor: int  # index of the anchor character in `form`
    exact: bool  # found in the folded copy, must also match the original text exactly


@dataclass(frozen=True)
class _Leaf:
    """Where the pattern of a pass reports an entry: the group marking that the entry's
    branch matched, and the group spanning each of its follows."""

    entry: _Entry
    marker: int
    follows: tuple[tuple[re.Pattern[str], int], ...]


class _AnchoredScan:
    """One pattern finding every keyword of a group at its anchor character; follows are
    checked in the pattern too, so occurrences no rule wants never come back to Python."""

    def __init__(
        self, char: str, haystack: _Haystack, entries: list[_Entry], *, by_find: bool
    ) -> None:
        self.haystack = haystack
        self._char = char
        # A rare anchor is found faster by `str.find` (memchr) than by the pattern's search.
        self._by_find = by_find
        leaves: dict[_Entry, _Leaf] = {}
        branches = _branches(entries, leaves)
        self._pattern = re.compile(re.escape(char) + f"(?=({branches}))")
        # matched continuation -> entries on its path: the deepest one matched in the
        # pattern, shorter ones (keywords that are prefixes of others) are checked here.
        paths = {entry.form[entry.anchor + 1 :] for entry in entries}
        self._candidates = {
            path: [leaves[e] for e in entries if path.startswith(e.form[e.anchor + 1 :])]
            for path in paths
        }

    def _matches(self, haystack: str) -> Iterator[re.Match[str]]:
        if not self._by_find:
            yield from self._pattern.finditer(haystack)
            return
        char, find, match_at = self._char, haystack.find, self._pattern.match
        index = find(char)
        while index >= 0:
            match = match_at(haystack, index)
            if match is not None:
                yield match
            index = find(char, index + 1)

    def scan(self, haystack: str, text: str, hits: dict[Key, list[int]]) -> None:
        size, reverse = len(text), self.haystack.reverse
        for match in self._matches(haystack):
            anchor = match.start()
            for leaf in self._candidates[match.group(1)]:
                entry = leaf.entry
                start = anchor - entry.anchor
                matched = match.start(leaf.marker) >= 0
                if not matched and (start < 0 or not haystack.startswith(entry.form, start)):
                    continue
                if reverse:  # only keywords without follows go to reversed copies
                    start = size - start - len(entry.form)
                if entry.exact and not text.startswith(entry.word.keyword, start):
                    continue
                word = entry.word
                if word.plain:
                    hits.setdefault((word.keyword, None), []).append(start)
                if not matched:
                    word.follow_hits(haystack, start, hits)
                    continue
                for follow, group in leaf.follows:
                    end = match.end(group)
                    if end >= 0:
                        hits.setdefault((word.keyword, follow), []).append(end)


def _branches(entries: list[_Entry], leaves: dict[_Entry, _Leaf]) -> str:
    """What follows the anchor, as a trie (longer continuations first). Where a keyword
    ends: a lookbehind checking all of it (so also what precedes the anchor), an empty
    group marking the branch, and its follows: required (one of them, unless its start is
    wanted too) and each in its own group. Fills `leaves` with the group numbers."""
    # A trie: characters to children; "" to the entries ending there (_Entry keys).
    root: dict[str, dict[Any, Any]] = {}
    for entry in entries:
        node = root
        for char in entry.form[entry.anchor + 1 :]:
            node = node.setdefault(char, {})
        node.setdefault("", {})[entry] = {}
    group = 1  # the continuation itself

    def leaf(entry: _Entry) -> str:
        nonlocal group
        check = f"(?<={re.escape(entry.form)})" if entry.anchor else ""
        group += 1
        marker = group
        follows = entry.word.follows
        sources = [f"(?i:{follow.pattern})" for follow in follows]
        gate = "" if entry.word.plain or not follows else "(?=" + "|".join(sources) + ")"
        group += sum(follow.groups for follow in follows) if gate else 0
        spans = []
        for follow in follows:
            spans.append((follow, group + 1))
            group += 1 + follow.groups
        leaves[entry] = _Leaf(entry, marker, tuple(spans))
        return check + "()" + gate + "".join(f"(?:(?=({source})))?" for source in sources)

    def emit(node: dict[str, dict[Any, Any]]) -> str:
        branches = []
        for char, child in sorted(node.items(), key=lambda item: item[0]):
            if char:
                branches.append(re.escape(char) + emit(child))
        ends = sorted(node.get("", {}), key=lambda entry: entry.form)
        branches += [leaf(entry) for entry in ends]
        return branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"

    return emit(root)


class KeywordIndex:
    """Every occurrence of a set of keywords, found in as few passes as the costs allow."""

    def __init__(self, keys: Iterable[Key]) -> None:
        plain: set[str] = set()
        follows: dict[str, dict[re.Pattern[str], None]] = {}
        for keyword, follow in keys:
            if follow is None:
                plain.add(keyword)
            else:
                follows.setdefault(keyword, {})[follow] = None
        words = [
            _Word(keyword, keyword in plain, tuple(follows.get(keyword, ())))
            for keyword in sorted(plain | set(follows))
        ]
        scans, finds = _plan(words)
        self._scans = [
            _AnchoredScan(char, haystack, entries, by_find=_by_find(char, haystack.folded))
            for char, haystack, entries in scans
        ]
        self._finds: list[tuple[_Word, bool]] = finds  # (word, search the folded text)
        self.needs_folding = any(s.haystack.folded for s in self._scans) or any(
            folded for _, folded in self._finds
        )
        # Each word is in one pass or one find; its follows are matched in that copy's text.
        in_folded = {e.word.keyword: h.folded for _, h, entries in scans for e in entries}
        in_folded.update((word.keyword, folded) for word, folded in finds)
        self._words = [(w.keyword, w.plain, w.follows, in_folded[w.keyword]) for w in words]
        # Built by `prepare` (the gateway's redactors, when a config is applied: 0.1-0.4 s
        # no request should pay) or else at the first scan (rule self-tests build many small
        # indexes, never scanned much), and only where the passes here would be several.
        self._fast: HyperscanKeywords | None = None
        self._fast_pending = self.passes >= FAST_MIN_PASSES

    @property
    def accelerated(self) -> bool:
        """Whether ASCII texts are scanned by Hyperscan (prefilter.py)."""
        return self._prefilter() is not None

    def prepare(self) -> None:
        """Build the Hyperscan database now rather than at the first scan. A database Hyperscan
        refuses leaves the pure-Python passes (exact either way); any other failure raises
        here."""
        self._prefilter()

    def _prefilter(self) -> HyperscanKeywords | None:
        if self._fast_pending:
            self._fast = HyperscanKeywords.build(self._words)
            self._fast_pending = False
        return self._fast

    @property
    def passes(self) -> int:
        return len(self._scans) + len(self._finds)

    def hits(self, text: str, folded: str | None) -> dict[Key, list[int]]:
        """key -> sorted offsets: where the keyword starts, or for a key with a follow
        pattern, where the pattern's match right after the keyword ends. `folded` is
        text.lower() (same length) or None when no keyword needs it."""
        prefilter = self._fast if not self._fast_pending else self._prefilter()
        if prefilter is not None:
            fast = prefilter.hits(text, folded)
            if fast is not None:
                return fast
        return self.python_hits(text, folded)

    def python_hits(self, text: str, folded: str | None) -> dict[Key, list[int]]:
        """`hits` by the pure-Python passes (the reference)."""
        hits: dict[Key, list[int]] = {}
        copies: dict[_Haystack, str] = {}
        for scan in self._scans:
            copy = copies.get(scan.haystack)
            if copy is None:
                base = folded if scan.haystack.folded else text
                assert base is not None
                copy = copies[scan.haystack] = base[::-1] if scan.haystack.reverse else base
            scan.scan(copy, text, hits)
        for word, in_folded in self._finds:
            haystack = folded if in_folded else text
            assert haystack is not None
            keyword, find = word.keyword, haystack.find
            index = find(keyword)
            while index >= 0:
                if word.plain:
                    hits.setdefault((keyword, None), []).append(index)
                word.follow_hits(haystack, index, hits)
                index = find(keyword, index + 1)
        for positions in hits.values():
            positions.sort()
        return hits


_HAYSTACKS = tuple(
    _Haystack(folded, reverse) for folded in (True, False) for reverse in (False, True)
)


def _plan(
    words: list[_Word],
) -> tuple[list[tuple[str, _Haystack, list[_Entry]]], list[tuple[_Word, bool]]]:
    """Greedy weighted set cover: take the pass that saves most for what it costs (the
    `str.find` loops it replaces against its own cost), as long as one saves anything.

    A keyword whose anchor is its last character (in that copy) adds a lookbehind tried
    wherever the anchor occurs, so it only joins passes on rare anchors. Keywords with
    follows are only found in copies that are not reversed (follows are matched forward).
    """
    remaining = {word.keyword: word for word in words}
    scans: list[tuple[str, _Haystack, list[_Entry]]] = []
    reversed_copies: set[bool] = set()
    while remaining:
        options: dict[tuple[str, _Haystack], list[tuple[_Entry, float]]] = {}
        for keyword, word in sorted(remaining.items()):
            for haystack in _HAYSTACKS:
                form = haystack.form(keyword)
                if form is None or (haystack.reverse and word.follows):
                    continue
                for char in dict.fromkeys(form):
                    anchor = form.index(char)
                    extra = 0.0
                    if 0 < anchor == len(form) - 1:
                        extra = _LOOKBEHIND * _frequency(char, haystack.folded)
                        if extra >= _find_cost(keyword):
                            continue
                    exact = haystack.folded and keyword != keyword.lower()
                    entry = _Entry(word, form, anchor, exact)
                    options.setdefault((char, haystack), []).append((entry, extra))
        best: tuple[float, str, _Haystack, list[_Entry]] | None = None
        for (char, haystack), found in options.items():
            cost = _pass_cost(_frequency(char, haystack.folded))
            cost += sum(extra for _, extra in found)
            if haystack.reverse and haystack.folded not in reversed_copies:
                cost += _REVERSE
            saved = sum(_find_cost(entry.word.keyword) for entry, _ in found)
            if saved > cost and (best is None or saved / cost > best[0]):
                best = (saved / cost, char, haystack, [entry for entry, _ in found])
        if best is None:
            break
        _, char, haystack, entries = best
        scans.append((char, haystack, entries))
        if haystack.reverse:
            reversed_copies.add(haystack.folded)
        for entry in entries:
            del remaining[entry.word.keyword]
    finds = [(word, keyword == keyword.lower()) for keyword, word in sorted(remaining.items())]
    return scans, finds
