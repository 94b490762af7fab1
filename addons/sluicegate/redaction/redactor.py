"""Whole-text and incremental redaction with a compiled `RulePack`.

Findings: every rule is run on its own (separate regexes are faster than one alternation and
keep rule semantics independent). A rule reports the span of its `group` (default: the whole
match) when its validators accept it. Existing redaction tags are blanked out before rules
run and findings overlapping them are dropped, so redacting redacted output is a no-op.
Overlapping findings are merged into one span; its tag is that of the first finding in
(start, longest, pack order) order, literal secrets coming before every rule. Adjacent
(touching) findings are not merged. Counts are per emitted tag.

Whole text: a few passes find all keyword occurrences (`keywords.KeywordIndex`), and for
rules with `followed_by`, where that pattern's match after each occurrence ends. A rule with
keywords is only tried near those anchors (its `window`), by anchored matches at the
characters its matches can start with. Rules without keywords start with a literal the
regex engine searches fast.

Streaming: `StreamRedactor.feed()` releases every character that can no longer be part of a
match and holds back the rest, using partial matching of the `regex` module. A complete match
is only trusted once no alternative path of its regex reaches the end of the buffer (checked
with the rule's sentinel pattern, `(?:pattern)(?!)`); before that it is held like a partial
one. Per-feed cost stays small because only the rules that can start a match with one of the
new characters are run (see `rules.FirstChars`).
"""

from __future__ import annotations

import bisect
import copy
import gc
import hashlib
import hmac
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn, Protocol

import regex

from sluicegate.redaction import encodings
from sluicegate.redaction.keywords import Key, KeywordIndex
from sluicegate.redaction.rules import (
    CONTEXT_CHARS,
    Direction,
    FirstChars,
    KeyRule,
    Rule,
    RulePack,
    literal_prefixes,
    use_stream_check,
)
from sluicegate.redaction.validators import known_example

OVERFLOW_RULE_ID = "stream-hold-overflow"
TAG_PATTERN = regex.compile(r"\[REDACTED:[a-z0-9]+(?:-[a-z0-9]+)*(?::[0-9a-f]{8})?\]")
_TAG_START = "[REDACTED:"  # `in` finds it faster than the pattern's search
# After a hold overflow, this much of the held text is kept so the rule can keep matching.
_OVERFLOW_SEED = 256
# Longest literal prefix a stream checks before running a rule (see `_StreamIndex`).
_PREFIX_LIMIT = 4


@dataclass(frozen=True)
class LiteralSecret:
    """An exact string to mask, e.g. a credential the gateway injected upstream."""

    rule_id: str
    value: str


class Tagger(Protocol):
    def __call__(self, rule_id: str, secret: str) -> str: ...


def plain_tag(rule_id: str, secret: str) -> str:
    """`[REDACTED:<rule-id>]`: says what was removed, nothing about the value."""
    return f"[REDACTED:{rule_id}]"


class KeyedTagger:
    """`[REDACTED:<rule-id>:<8 hex>]`: HMAC-SHA256 of the secret under a deployment key.

    The same secret always maps to the same tag (so a reader can tell two redacted values
    apart or see one value reused) without the tag revealing or confirming the value to
    anyone lacking the key.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the tag key needs at least 16 bytes")
        self._key = key

    def __call__(self, rule_id: str, secret: str) -> str:
        data = secret.encode("utf-8", "surrogatepass")
        digest = hmac.new(self._key, data, hashlib.sha256).hexdigest()[:8]
        return f"[REDACTED:{rule_id}:{digest}]"


class StreamTooSlow(RuntimeError):
    """A stream's text took more CPU to redact than its budget: the stream must be cut (nothing
    of what was held is released). `code` is stable and safe to log or send."""

    code = "redaction_timeout"


# CPU a stream may spend on one `feed` or `flush`: a fixed part, plus a part per character fed.
# Ordinary text costs 1-10 µs a character (scripts/bench_sse_body.py); text made to keep many
# rules' partial matches open costs milliseconds a character (every feed rescans what is held),
# and would hold mitmproxy's event loop, which runs every stream's redaction, for minutes.
STREAM_BUDGET_SECONDS = 0.05
STREAM_BUDGET_PER_CHAR = 10e-6
# And over the whole stream, so that many calls just under their budget add up to little: a
# second, plus a millisecond a call (tiny deltas cost ~0.1 ms each) and the per-character part.
STREAM_TOTAL_SECONDS = 1.0
STREAM_TOTAL_PER_CALL = 1e-3
# Searches over at most this many characters run without the regex module's timeout.
_UNTIMED_CHARS = 256

# This thread's CPU time in the garbage collector's older generations. A full collection walks
# the whole process's heap (150 ms of CPU for 3 M objects): it may start during any feed and is
# not work the stream's text caused, so a stream's budget does not count it (a long-running
# gateway's heap would otherwise cut ordinary streams).
_gc_time = threading.local()


def _on_gc(phase: str, info: dict[str, int]) -> None:
    if info.get("generation") == 0:  # short and frequent: not worth reading a clock
        return
    if phase == "start":
        _gc_time.started = time.thread_time()
        return
    started = getattr(_gc_time, "started", None)
    if started is not None:
        _gc_time.spent = getattr(_gc_time, "spent", 0.0) + time.thread_time() - started
        _gc_time.started = None


# One callback, also when this module is loaded again (a script reload).
gc.callbacks[:] = [
    callback
    for callback in gc.callbacks
    if not (getattr(callback, "__module__", None) == __name__ and callback.__name__ == "_on_gc")
]
gc.callbacks.append(_on_gc)


def work_time() -> float:
    """This thread's CPU time, less what it spent in collections of the older generations."""
    return time.thread_time() - getattr(_gc_time, "spent", 0.0)


@dataclass(frozen=True)
class RedactionResult:
    text: str
    counts: dict[str, int]

    @property
    def changed(self) -> bool:
        return bool(self.counts)


@dataclass(frozen=True, order=True)
class _Finding:
    start: int
    neg_end: int  # sorts longer spans first at equal start
    order: int  # pack order; literals are -1
    rule_id: str = field(compare=False)

    @property
    def end(self) -> int:
        return -self.neg_end


@dataclass(frozen=True, eq=False)
class _Scanner:
    """One thing the stream scans for: a rule, the literal secrets, or existing tags."""

    pattern: regex.Pattern[str]
    sentinel: regex.Pattern[str]
    first: FirstChars
    order: int
    rule: Rule | None = None
    literals: dict[str, str] | None = None  # value -> rule id

    def finding(
        self, match: regex.Match[str], blanks: Sequence[tuple[int, int]] = ()
    ) -> _Finding | None:
        if self.rule is None:
            if self.literals is None:  # the tag scanner reports protected spans elsewhere
                return None
            start, end = match.span()
            return _Finding(start, -end, self.order, self.literals[match.group()])
        return _rule_finding(self.rule, self.order, match, blanks)


def _rule_finding(
    rule: Rule, order: int, match: regex.Match[str], blanks: Sequence[tuple[int, int]] = ()
) -> _Finding | None:
    start, end = match.span(rule.group)
    if start < 0:  # the group is in an alternative that did not take part: whole match
        start, end = match.span()
    # Groups must lie inside the match; a group in a lookbehind could be released text.
    start, end = max(start, match.start()), min(end, match.end())
    if start >= end:
        return None
    if blanks and _overlaps_any(_Finding(start, -end, order, rule.id), blanks):
        # A value running into a tag: judged (and kept) without it, see `_clipped`.
        return _Finding(start, -end, order, rule.id)
    candidate = match.string[start:end]
    if not rule.accepts(candidate) or known_example(candidate):
        return None
    return _Finding(start, -end, order, rule.id)


def _literal_pattern(literals: dict[str, str]) -> regex.Pattern[str]:
    values = sorted(literals, key=len, reverse=True)
    return regex.compile("|".join(regex.escape(v) for v in values))


def _sentinel(pattern: regex.Pattern[str]) -> regex.Pattern[str]:
    return regex.compile(f"(?:{pattern.pattern})(?!)", pattern.flags)


@dataclass(eq=False)
class _Compiled:
    """Per (pack, direction): the rules, their stream scanners and the keyword index."""

    rules: tuple[Rule, ...]
    scanners: tuple[_Scanner, ...]
    keywords: KeywordIndex
    # (keyword, followed_by) -> orders of the rules using it; rules without keywords always
    # run.
    by_key: dict[Key, tuple[int, ...]]
    unkeyed: tuple[int, ...]
    # per rule: its only possible first character, or the one literal prefix every match
    # starts with (found with `str.find`: `re_` is tried where `re_` is, not at every `r`),
    # if it has one
    first_char: tuple[str | None, ...]

    @classmethod
    def build(cls, pack: RulePack, direction: Direction) -> _Compiled:
        rules = pack.rules_for(direction)
        tag_first = FirstChars(frozenset("["), False)
        tag_scanner = _Scanner(TAG_PATTERN, _sentinel(TAG_PATTERN), tag_first, order=-2)
        scanners = (
            tag_scanner,
            *(
                _Scanner(r.pattern, r.sentinel, r.first, order=i, rule=r)
                for i, r in enumerate(rules)
            ),
        )
        by_key: dict[Key, list[int]] = {}
        for order, rule in enumerate(rules):
            for keyword in rule.keywords:
                by_key.setdefault((keyword, rule.followed_by), []).append(order)
        unkeyed = tuple(order for order, rule in enumerate(rules) if not rule.keywords)
        first_char = tuple(_first_literal(rule) for rule in rules)
        return cls(
            rules,
            scanners,
            KeywordIndex(by_key),
            {key: tuple(orders) for key, orders in by_key.items()},
            unkeyed,
            first_char,
        )

    @classmethod
    def of(cls, pack: RulePack, direction: Direction) -> _Compiled:
        key = ("redactor", direction)
        compiled = pack.cache.get(key)
        if compiled is None:
            compiled = pack.cache[key] = cls.build(pack, direction)
        return compiled


class Redactor:
    """Redacts text with the rules of one pack and direction, plus literal secrets."""

    def __init__(
        self,
        pack: RulePack,
        direction: Direction,
        *,
        tagger: Tagger | None = None,
        literals: Sequence[LiteralSecret] = (),
        decode: bool = True,
    ) -> None:
        self.pack = pack
        # Whole-text redaction also decodes encoded spans (see `encodings`); streams never do,
        # so `decode=False` gives the whole-text twin of a stream.
        self.decode = decode
        self.direction = Direction(direction)
        self.tagger: Tagger = tagger or plain_tag
        self._compiled = _Compiled.of(pack, self.direction)
        self._literals: dict[str, str] = {}
        for literal in literals:
            if literal.value:
                self._literals.setdefault(literal.value, literal.rule_id)
        self._stream_index: _StreamIndex | None = None
        self._literal_scanner: _Scanner | None = None
        if self._literals:
            pattern = _literal_pattern(self._literals)
            first = FirstChars(
                frozenset(v[0] for v in self._literals if v[0] < "\x80"),
                any(v[0] >= "\x80" for v in self._literals),
            )
            self._literal_scanner = _Scanner(
                pattern, _sentinel(pattern), first, order=-1, literals=self._literals
            )

    def warm(self, *, stream: bool = True) -> None:
        """Build now what the first scan would otherwise build: the keyword index's Hyperscan
        database (shared by every redactor of this pack and direction) and, with `stream`, the
        stream index. The gateway calls this when it applies a config, so no request pays for
        it and a failure stops the config, not a request."""
        self._compiled.keywords.prepare()
        if stream and self._stream_index is None:
            self._stream_index = _StreamIndex.build(self._compiled, self._literal_scanner)

    def holds_literal(self, text: str) -> bool:
        """Whether `text` contains one of this redactor's literal secrets."""
        return any(value in text for value in self._literals)

    @property
    def key_rules(self) -> tuple[KeyRule, ...]:
        return self.pack.key_rules_for(self.direction)

    @property
    def literals(self) -> dict[str, str]:
        """The literal secrets masked by this redactor: value -> rule id."""
        return dict(self._literals)

    def with_literals(self, literals: Sequence[LiteralSecret]) -> Redactor:
        """A redactor sharing this one's compiled rules, masking these literals too."""
        return Redactor(
            self.pack,
            self.direction,
            tagger=self.tagger,
            literals=[*(LiteralSecret(r, v) for v, r in self._literals.items()), *literals],
            decode=self.decode,
        )

    def tag(self, rule_id: str, secret: str) -> str:
        return self.tagger(rule_id, secret)

    def redact_text(self, text: str) -> RedactionResult:
        """Redacted text; redacting it again changes nothing (a tag can reveal a neighbour
        that its secret hid: `IBAN<secret>` gives `IBAN[tag]`, so the passes are repeated
        until nothing more is found)."""
        return self._rounds(text, decode=self.decode)

    def _rounds(self, text: str, *, decode: bool) -> RedactionResult:
        if not text:
            return RedactionResult(text, {})
        counts: dict[str, int] = {}
        for _ in range(_MAX_ROUNDS):
            text, found = self._redact_once(text, decode=decode)
            if not found:
                break
            for rule_id, n in found.items():
                counts[rule_id] = counts.get(rule_id, 0) + n
        return RedactionResult(text, counts)

    def _redact_once(self, text: str, *, decode: bool) -> tuple[str, dict[str, int]]:
        protected = [m.span() for m in TAG_PATTERN.finditer(text)] if _TAG_START in text else []
        findings = self._findings_beside(text, protected)
        if decode:
            scan = _neutralize(text, protected) if protected else text
            findings += self._encoded_findings(
                scan, findings, encodings.MAX_DEPTH, [encodings.MAX_DECODED]
            )
        counts: dict[str, int] = {}
        out = _render(text, 0, len(text), findings, protected, self.tagger, counts)
        return out, counts

    def _findings_beside(self, text: str, blanks: list[tuple[int, int]]) -> list[_Finding]:
        """Findings with `blanks` (tags) read two ways: as letters, like the secret a tag
        replaced (no rule uses a tag's words as context, and a neighbour sees what it saw next
        to the secret), and as a boundary (a tag written next to a secret must not hide it)."""
        if not blanks:
            return self._findings(text)
        rules = self._compiled.rules
        out: list[_Finding] = []
        for finding in self._findings(_neutralize(text, blanks), blanks=blanks):
            if not _overlaps_any(finding, blanks):
                out.append(finding)
            elif finding.order >= 0:
                out += _clipped(finding, rules[finding.order], text, blanks, confirm=True)
        bracketed = _neutralize(text, blanks, bracketed=True)
        for finding in self._findings(bracketed, blanks=blanks):
            if not _overlaps_any(finding, blanks):
                out.append(finding)
            elif finding.order >= 0:
                out += _clipped(finding, rules[finding.order], text, blanks)
        return out

    def stream(self, max_hold: int, *, segments: bool = False) -> StreamRedactor:
        """A stream redactor; with `segments`, its text is cut into segments (`mark`)."""
        if self._stream_index is None:
            self._stream_index = _StreamIndex.build(self._compiled, self._literal_scanner)
        return StreamRedactor(
            self._stream_index, self.tagger, max_hold, self._reread, segments=segments
        )

    def _reread(self, text: str) -> RedactionResult:
        """The passes after the first, as whole text runs them (a stream's own tags)."""
        return self._rounds(text, decode=False)

    # --- whole-text search --------------------------------------------------------------

    def _encoded_findings(
        self, text: str, found: list[_Finding], depth: int, budget: list[int]
    ) -> list[_Finding]:
        """Findings for the encoded spans of `text` whose decoded text holds a secret (see
        `encodings`): the escaped characters spelling it, or a whole base64/hex block."""
        out: list[_Finding] = []
        for span in encodings.decoded_spans(text, budget):
            if any(f.start <= span.start and span.end <= f.end for f in found):
                continue  # masked whole already
            inner = self._findings(span.text)
            if depth > 1:
                inner += self._encoded_findings(span.text, inner, depth - 1, budget)
            for finding in inner:
                if not span.keeps(finding.start, finding.end):
                    continue
                start, end = span.source(finding.start, finding.end)
                out.append(_Finding(start, -end, finding.order, finding.rule_id))
        return out

    def _findings(
        self, text: str, *, prefilter: bool = True, blanks: Sequence[tuple[int, int]] = ()
    ) -> list[_Finding]:
        findings: list[_Finding] = []
        if self._literals:
            findings += _literal_findings(text, self._literals)
        compiled = self._compiled
        hits: dict[Key, list[int]] | None = None
        if prefilter:
            folded = text.lower() if compiled.keywords.needs_folding else None
            if folded is None or len(folded) == len(text):  # a few characters lowercase to two
                hits = compiled.keywords.hits(text, folded)
        if hits is None:
            orders: Iterable[int] = range(len(compiled.rules))
        else:
            selected = set(compiled.unkeyed)
            for key in hits:
                selected.update(compiled.by_key[key])
            orders = sorted(selected)
        for order in orders:
            rule = compiled.rules[order]
            if rule.keywords and hits is not None:
                matches: Iterable[regex.Match[str]] = _windowed_matches(
                    rule, compiled.first_char[order], text, _anchors(rule, hits)
                )
            else:
                matches = rule.plain.finditer(text)
            for match in matches:
                finding = _rule_finding(rule, order, match, blanks)
                if finding is not None:
                    findings.append(finding)
        return findings


def _anchors(rule: Rule, hits: dict[Key, list[int]]) -> list[int]:
    """Where the rule's windows are measured from (sorted): its keyword occurrences, or with
    `followed_by`, where that pattern's matches after them end."""
    found = [hits[key] for key in ((k, rule.followed_by) for k in rule.keywords) if key in hits]
    if len(found) == 1:
        return found[0]
    return sorted(p for positions in found for p in positions)


def _first_literal(rule: Rule) -> str | None:
    """What every match of the rule starts with, if that is one string: its one literal
    prefix (`rules.literal_prefixes`, case-sensitive patterns only) or its one possible
    first character; None if neither."""
    if len(rule.first.ascii) != 1 or rule.first.non_ascii:
        return None
    char = next(iter(rule.first.ascii))
    if not rule.plain.flags & regex.IGNORECASE:
        found = literal_prefixes(rule.plain.pattern, _PREFIX_LIMIT)
        if found is not None and len(found) == 1:
            (prefix,) = found
            if prefix.startswith(char):
                return prefix
    return char


def _windowed_matches(
    rule: Rule, first_char: str | None, text: str, anchors: list[int]
) -> list[regex.Match[str]]:
    """The matches `finditer` would yield, searching only in the windows around `anchors`
    (sorted; see `_anchors`).

    Windows around consecutive anchors are merged into runs; in a run, the rule is tried
    (anchored, on the full text) only where its matches can start: where its one literal
    prefix or first character occurs (`first_char`, found with `str.find`) when it has one,
    else where its rule's `finder` finds one of its first characters.
    """
    before, after = rule.window
    match_at = rule.plain.match
    finder = rule.finder
    find = text.find
    matches: list[regex.Match[str]] = []
    position = 0
    count, index = len(anchors), 0
    while index < count:
        low, high = anchors[index] - before, anchors[index] + after
        index += 1
        while index < count and anchors[index] - before <= high:
            high = anchors[index] + after
            index += 1
        if position < low:
            position = low if low > 0 else 0
        while position <= high:
            if first_char is not None:
                start = find(first_char, position, high + len(first_char))
                if start < 0:
                    break
                match = match_at(text, start)
            elif finder is not None:
                candidate = finder.search(text, position, high + 1)
                if candidate is None:
                    break
                start = candidate.start()
                match = match_at(text, start)
            else:
                match = _bounded_search(rule, text, position, high)
                if match is None:
                    break
                start = match.start()
            if match is None:
                position = start + 1
                continue
            matches.append(match)
            end = match.end()
            position = end if end > start else start + 1
    return matches


def _bounded_search(rule: Rule, text: str, pos: int, limit: int) -> regex.Match[str] | None:
    """The first full-text match starting in [pos, limit], scanning no further than `limit`.

    On the text truncated after `limit`, the leftmost complete match is a candidate; a match
    attempt that runs into the cut (found with the rule's sentinel) may start earlier or make
    that candidate longer, so it is decided by an anchored match on the full text.
    """
    endpos = limit + 1
    if endpos >= len(text):
        match = rule.plain.search(text, pos)
        return match if match is not None and match.start() <= limit else None
    while pos <= limit:
        match = rule.plain.search(text, pos, endpos)
        pending = rule.sentinel.search(text, pos, endpos, partial=True)
        cut = pending.start() if pending is not None and pending.start() <= limit else None
        if match is not None and match.end() >= endpos and cut is None:
            cut = match.start()
        if cut is not None and (match is None or cut <= match.start()):
            full = rule.plain.match(text, cut)
            if full is not None:
                return full
            pos = cut + 1
            continue
        return match if match is not None and match.start() <= limit else None
    return None


def _literal_findings(text: str, literals: dict[str, str]) -> list[_Finding]:
    """Leftmost-longest, non-overlapping: what the literal alternation would find."""
    hits: list[tuple[int, int, str]] = []
    for value, rule_id in literals.items():
        index = text.find(value)
        while index >= 0:
            hits.append((index, -len(value), rule_id))
            index = text.find(value, index + 1)
    hits.sort()
    findings: list[_Finding] = []
    end = 0
    for start, neg_length, rule_id in hits:
        if start >= end:
            end = start - neg_length
            findings.append(_Finding(start, -end, -1, rule_id))
    return findings


def _render(
    text: str,
    start: int,
    end: int,
    findings: list[_Finding],
    protected: list[tuple[int, int]],
    tagger: Tagger,
    counts: dict[str, int],
) -> str:
    """text[start:end] with merged findings replaced by tags (findings clipped to the range)."""
    if not findings:
        return text[start:end]
    findings = sorted(findings)
    if protected:
        findings = [f for f in findings if not _overlaps_any(f, protected)]
    pieces: list[str] = []
    cursor = start
    index = 0
    while index < len(findings):
        first = findings[index]
        group_end = first.end
        index += 1
        while index < len(findings) and findings[index].start < group_end:
            group_end = max(group_end, findings[index].end)
            index += 1
        group_start = max(first.start, cursor)
        group_end = min(group_end, end)
        if group_start >= group_end:
            continue
        pieces.append(text[cursor:group_start])
        pieces.append(tagger(first.rule_id, text[first.start : group_end]))
        counts[first.rule_id] = counts.get(first.rule_id, 0) + 1
        cursor = group_end
    pieces.append(text[cursor:end])
    return "".join(pieces)


# A letter, like most of the secret it replaced: a rule's boundary (`(?![A-Za-z0-9])`,
# `(?<![\w-])`) sees the same thing next to a tag as it saw next to the secret, so redacting
# redacted text finds nothing new (an IBAN directly followed by a secret: the IBAN was found
# with the secret beside it, or not at all). A run of it is a mask to the validators.
_FILLER = "x"


# Passes of `Redactor.redact_text`: each needs a finding that only a tag beside it reveals.
_MAX_ROUNDS = 8
# How far back a stream holds the line of text that leads to a held position (a secret a
# neighbour hid is on its line: see `StreamRedactor`).
_GLUE_CHARS = 256
_LAST_SPACE = regex.compile(r"(?r)\s")
# The last quote before a position, when it opens a value (`key: "...`, `key = '...`).
_OPEN_VALUE = regex.compile(r"""(?r)[:=][ \t]{0,20}(["'])[^"'\n\r]*""")


def _neutralize(text: str, spans: list[tuple[int, int]], *, bracketed: bool = False) -> str:
    """`text` with existing tags blanked out (same length), so that no rule uses a tag's
    words as context: `[REDACTED:generic-password]: x` must not read as `password: x`.
    `bracketed` keeps a tag's brackets, which bound the tokens beside it as a tag does."""
    pieces, cursor = [], 0
    for start, end in spans:
        blank = _FILLER * (end - start)
        if bracketed and end - start >= 2:
            blank = "[" + blank[2:] + "]"
        pieces += [text[cursor:start], blank]
        cursor = end
    pieces.append(text[cursor:])
    return "".join(pieces)


def _overlapping(finding: _Finding, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The spans `finding` overlaps; `spans` are tags: sorted, disjoint (binary search, so a
    body of many tags costs no more than its length)."""
    index = bisect.bisect_right(spans, (finding.start, finding.start))
    if index and spans[index - 1][1] > finding.start:
        index -= 1
    out = []
    while index < len(spans) and spans[index][0] < finding.end:
        if spans[index][1] > finding.start:
            out.append(spans[index])
        index += 1
    return out


def _overlaps_any(finding: _Finding, spans: Sequence[tuple[int, int]]) -> bool:
    return bool(_overlapping(finding, spans))


def _clipped(
    finding: _Finding,
    rule: Rule,
    text: str,
    spans: Sequence[tuple[int, int]],
    *,
    confirm: bool = False,
) -> list[_Finding]:
    """The parts of a finding before its first and after its last tag that are values of the
    rule on their own: `P@ssw0rd[REDACTED:a]` keeps its password redacted. What lies between
    two tags is context and is left alone. With `confirm` (the reading of tags as letters),
    only the part before the tags, and only if the rule finds a value holding it once the tags
    are taken out: text after a tag read as letters looks like the rest of a value
    (`KEY=[tag]"next": "`), and our own tags must not make it one."""
    overlapping = _overlapping(finding, spans)
    first, last = overlapping[0][0], overlapping[-1][1]
    pieces: list[_Finding] = []
    edges = [(finding.start, first)] if confirm else [(finding.start, first), (last, finding.end)]
    for start, end in edges:
        if end <= start:
            continue
        piece = text[start:end]
        if not rule.accepts(piece) or known_example(piece):
            continue
        if confirm and not _found_without(rule, text, (first, last), (start, end)):
            continue
        pieces.append(_Finding(start, -end, finding.order, finding.rule_id))
    return pieces


def _found_without(rule: Rule, text: str, tags: tuple[int, int], piece: tuple[int, int]) -> bool:
    """Whether the rule finds a value holding `piece` in `text` with `tags` taken out."""
    cut = tags[1] - tags[0]
    reading = text[: tags[0]] + text[tags[1] :]
    start, end = piece if piece[1] <= tags[0] else (piece[0] - cut, piece[1] - cut)
    low = max(0, start - CONTEXT_CHARS)
    for match in rule.plain.finditer(reading, low, min(len(reading), end + CONTEXT_CHARS)):
        if match.start() > start:
            break
        found = _rule_finding(rule, 0, match)
        if found is not None and found.start <= start and end <= found.end:
            return True
    return False


@dataclass(frozen=True)
class _StreamIndex:
    """The scanners a stream runs and, per ASCII character, which of them can start a match there
    (the rest for non-ASCII). Built once per redactor, shared by all its channels."""

    scanners: tuple[_Scanner, ...]
    by_char: dict[str, frozenset[int]]
    non_ascii: frozenset[int]
    # index -> (literal prefixes one of which starts every match, their proper heads): a
    # scanner whose first character arrived is skipped when neither a whole prefix nor, at
    # the end of the buffer, the head of one did (see `rules.literal_prefixes`).
    prefixes: dict[int, tuple[tuple[str, ...], tuple[str, ...]]]

    @classmethod
    def build(cls, compiled: _Compiled, literal_scanner: _Scanner | None) -> _StreamIndex:
        scanners = (
            compiled.scanners
            if literal_scanner is None
            else (
                *compiled.scanners,
                literal_scanner,
            )
        )
        by_char: dict[str, list[int]] = {}
        non_ascii: list[int] = []
        for index, scanner in enumerate(scanners):
            for char in scanner.first.ascii:
                by_char.setdefault(char, []).append(index)
            if scanner.first.non_ascii:
                non_ascii.append(index)
        prefixes: dict[int, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        for index, scanner in enumerate(scanners):
            if scanner.rule is None or scanner.pattern.flags & regex.IGNORECASE:
                continue
            found = literal_prefixes(scanner.pattern.pattern, _PREFIX_LIMIT)
            if found is not None and len(found) <= 8:
                heads = {p[:k] for p in found for k in range(1, len(p))}
                prefixes[index] = (tuple(sorted(found)), tuple(sorted(heads)))
        return cls(
            scanners,
            {char: frozenset(indexes) for char, indexes in by_char.items()},
            frozenset(non_ascii),
            prefixes,
        )


class StreamRedactor:
    """Incremental redaction of one text channel (see the module docstring).

    Released text that holds a tag the stream wrote is read again as whole text reads its
    later passes (`reread`), with the released text before it as context: a tag can reveal a
    neighbour its secret hid (`sdk-<uuid>AGE-SECRET-KEY-1...`, or a quoted `"api_key": "..."`
    value holding another secret). So that such a neighbour is still held, text is released
    no nearer to a held position than the start of its non-space run or of the quoted value
    it is in (at most `_GLUE_CHARS` back).
    """

    def __init__(
        self,
        index: _StreamIndex,
        tagger: Tagger,
        max_hold: int,
        reread: Callable[[str], RedactionResult] | None = None,
        *,
        segments: bool = False,
        budget: tuple[float, float] = (STREAM_BUDGET_SECONDS, STREAM_BUDGET_PER_CHAR),
    ) -> None:
        if max_hold < 1:
            raise ValueError("max_hold must be positive")
        self._budget = budget  # (seconds per call, seconds per character fed): CPU time
        self._deadline = float("inf")
        self._wall_deadline = float("inf")
        self._fed = 0  # characters fed so far
        self._calls = 0
        self._spent = 0.0  # CPU seconds spent so far
        self._reread = reread
        self._released_tail = ""  # the last CONTEXT_CHARS released, as released
        self.counts: dict[str, int] = {}
        self._scanners = index.scanners
        self._by_char = index.by_char
        self._non_ascii = index.non_ascii
        self._prefixes = index.prefixes
        self._tagger = tagger
        self._max_hold = max_hold
        self._buf = ""
        # The buffer as rules see it: existing tags blanked out (see `_neutralize`), and once a
        # tag was seen, a second reading with the tags' brackets kept (see `_findings_beside`).
        self._scan_buf = ""
        self._bracket_buf = ""
        self._two_views = False
        self._rescanned_at = -1  # where the last tag (or tag-to-be) made the rules look again
        self._emit = 0  # everything before this index has been released
        # Scanners that may still match from a position before the end: index -> position.
        # Every other scanner cannot start a match anywhere before the end of the buffer.
        self._holding: dict[int, int] = {}
        self._bracket_holding: dict[int, int] = {}  # the same for the second reading
        self._findings: list[_Finding] = []
        self._protected: list[tuple[int, int]] = []
        self._closed = False
        # Segments (see `mark`): where the buffer starts in the whole stream, the segment ends
        # not released yet (stream positions), the released text of every finished segment not
        # taken yet and of the open one, and the rules of findings that crossed a segment end.
        self._base = 0
        self._marks: list[int] = []
        self._segmented = segments
        self._done: list[str] = []
        self._open = ""
        self.crossings: list[str] = []

    @property
    def held(self) -> int:
        """Characters received but not released yet."""
        return len(self._buf) - self._emit

    def feed(self, text: str) -> str:
        if self._closed:
            raise RuntimeError("feed() after flush()")
        if not text:
            return ""
        started = self._start_budget(len(text))
        try:
            return self._feed(text)
        finally:
            self._spent += work_time() - started

    def _start_budget(self, chars: int) -> float:
        """Start the CPU budget of one call redacting `chars` more characters (see
        `STREAM_BUDGET_SECONDS`); the CPU time it started at."""
        now = work_time()
        self._fed += chars
        self._calls += 1
        call = self._budget[0] + self._budget[1] * chars
        earned = STREAM_TOTAL_PER_CALL * self._calls + self._budget[1] * self._fed
        total = STREAM_TOTAL_SECONDS + earned - self._spent
        allowed = min(call, total)
        self._deadline = now + allowed
        # Wall time is never less than this thread's CPU time and far cheaper to read: the CPU
        # clock is read only once the wall clock says the budget may be spent.
        self._wall_deadline = time.perf_counter() + allowed
        return now

    def _over_budget(self) -> NoReturn:
        self._closed = True  # nothing held is released after this
        raise StreamTooSlow("the stream's text took longer than its budget")

    def _search(
        self, pattern: regex.Pattern[str], buf: str, pos: int, *, partial: bool
    ) -> regex.Match[str] | None:
        """`pattern.search(buf, pos)` within the budget. One search can be long too (partial
        matches that run to the end from every position), so it is stopped by the regex
        module's timeout (wall clock); a timeout the CPU budget does not confirm (the thread
        was not scheduled) searches again."""
        while True:
            remaining = self._wall_deadline - time.perf_counter()
            if remaining <= 0:
                remaining = self._deadline - work_time()
                if remaining <= 0:
                    self._over_budget()
                self._wall_deadline = time.perf_counter() + remaining
            if len(buf) - pos <= _UNTIMED_CHARS:  # short: bounded, and a timeout costs ~1 µs
                return pattern.search(buf, pos, partial=partial)
            try:
                return pattern.search(buf, pos, partial=partial, timeout=remaining + 0.01)
            except TimeoutError:
                continue

    def _feed(self, text: str) -> str:
        start = len(self._buf)
        self._buf += text
        self._scan_buf += text
        self._bracket_buf += text
        scans: set[int] = set()
        for char in set(text):
            found = self._by_char.get(char) if char < "\x80" else self._non_ascii
            if found:
                scans.update(found)
        if self._prefixes and scans:
            scans = self._gate(scans, start)
        holding = self._holding
        # Scanner 0 finds tags: it runs first so later scanners see them blanked out (and
        # rescan what a new tag changed, see `_protect`).
        if 0 in scans or 0 in holding:
            self._scan(0, holding.pop(0, start), final=False)
            pending = holding.get(0)
            if pending is not None and pending != self._rescanned_at:
                self._rescan_before(pending)
        for index in sorted((scans | holding.keys()) - {0}):
            self._scan(index, holding.pop(index, start), final=False)
        if self._two_views:
            holding = self._bracket_holding
            for index in sorted((scans | holding.keys()) - {0}):
                self._scan(index, holding.pop(index, start), final=False, view=1)
        return self._release(final=False)

    def mark(self) -> None:
        """What was fed so far ends a segment (one WebSocket message): released text is cut
        there (`take_segments`), and a finding across the cut is recorded in `crossings` (its
        parts on both sides are tagged, so neither releases a piece of it)."""
        if not self._segmented:
            raise RuntimeError("mark() on a stream made without segments")
        if not self._marks and self._emit == len(self._buf):  # all of it is out already
            self._done.append(self._open)
            self._open = ""
        else:
            self._marks.append(self._base + len(self._buf))

    def fork(self) -> StreamRedactor:
        """An independent copy of this stream as it is now: its `flush` says what this stream
        would release if it ended here, and this stream goes on."""
        twin = copy.copy(self)
        twin._holding = dict(self._holding)
        twin._bracket_holding = dict(self._bracket_holding)
        twin._findings = list(self._findings)
        twin._protected = list(self._protected)
        twin._marks = list(self._marks)
        twin._done = list(self._done)
        twin.counts = dict(self.counts)
        twin.crossings = list(self.crossings)
        return twin

    def take_segments(self) -> list[str]:
        """The released text of every segment finished since the last call, in order."""
        done, self._done = self._done, []
        return done

    def _gate(self, scans: set[int], start: int) -> set[int]:
        """`scans` without the scanners that cannot start a match at or after `start`: no
        literal prefix of theirs occurs there and the buffer does not end with the head of
        one. Tags in the buffer are blanked the same way rules see them."""
        region = self._scan_buf[max(0, start - _PREFIX_LIMIT + 1) :]
        prefixes = self._prefixes
        kept = set()
        for index in scans:
            gate = prefixes.get(index)
            if gate is None or region.endswith(gate[1]) or any(p in region for p in gate[0]):
                kept.add(index)
        return kept

    def flush(self) -> str:
        if self._closed:
            return ""
        self._closed = True
        self._start_budget(self.held)
        holding = self._holding
        for index in sorted(holding):
            self._scan(index, holding.pop(index), final=True)
        holding = self._bracket_holding
        for index in sorted(holding):
            self._scan(index, holding.pop(index), final=True, view=1)
        return self._release(final=True)

    def _scan(self, index: int, pos: int, *, final: bool, view: int = 0) -> None:
        """Record the scanner's decided matches from `pos`; remember where it must hold.

        A complete match is decided once it ends before the end of the buffer and no match
        attempt at or before its start runs into the end (more text could change those).
        The leftmost such attempt is found with the sentinel: `search(partial=True)` itself
        prefers a later complete match to an earlier partial one.
        """
        scanner = self._scanners[index]
        buf = self._bracket_buf if view else self._scan_buf
        holding = self._bracket_holding if view else self._holding
        size = len(buf)
        pending = None if final or index == 0 else self._holding.get(0)
        if pending is not None and pending < size:
            # What may become a tag reads as one already (decisions wait for it to end).
            rest = _FILLER * (size - pending)
            buf = buf[:pending] + ("[" + rest[1:] if view else rest)
        while pos <= size:
            if size - pos <= _UNTIMED_CHARS and time.perf_counter() < self._wall_deadline:
                match = scanner.pattern.search(buf, pos)  # short: the common case, kept cheap
                attempt = None if final else scanner.sentinel.search(buf, pos, partial=True)
            else:
                match = self._search(scanner.pattern, buf, pos, partial=False)
                attempt = None if final else self._search(scanner.sentinel, buf, pos, partial=True)
            if not final:
                hold = attempt.start() if attempt is not None and attempt.start() < size else None
                if index == 0 and match is not None and (hold is None or hold >= match.start()):
                    hold = None  # a tag is final at its `]`: no longer tag starts there
                elif match is not None and (
                    match.end() >= size or (hold is not None and hold <= match.start())
                ):
                    hold = match.start() if hold is None else min(hold, match.start())
                elif match is not None:
                    hold = None  # the match is decided; holds after it are found next round
                if hold is not None:
                    holding[index] = hold
                    return
            if match is None:
                return
            start, end = match.span()
            if scanner.rule is None and scanner.literals is None:
                self._protect(start, end)
                buf = self._scan_buf
            else:
                found = scanner.finding(match, self._protected)
                if found is not None and found.end > self._emit:
                    if found.start < self._emit:  # only after an overflow: the head is out
                        found = _Finding(self._emit, found.neg_end, found.order, found.rule_id)
                    if not _overlaps_any(found, self._protected):
                        self._findings.append(found)
                    elif scanner.rule is not None:
                        self._findings += _clipped(
                            found, scanner.rule, self._buf, self._protected, confirm=not view
                        )
            pos = end if end > start else start + 1

    def _rescan_before(self, start: int) -> None:
        """A tag starts (or may start) at `start`: it changes how the text before it reads (a
        value running into it), so every rule looks again from where a match reaching it could
        start, in both readings; the first tag starts the second reading, holding where the
        first one holds (the readings were the same until then)."""
        if not self._two_views:
            self._two_views = True
            self._bracket_holding = {i: p for i, p in self._holding.items() if i != 0}
        again = max(0, start - CONTEXT_CHARS)
        for holding in (self._holding, self._bracket_holding):
            for index in range(1, len(self._scanners)):
                holding[index] = min(holding.get(index, again), again)
        self._rescanned_at = start

    def _protect(self, start: int, end: int) -> None:
        """A tag found at [start, end): blanked in both readings."""
        if start != self._rescanned_at:
            self._rescan_before(start)
        self._protected.append((start, end))
        self._scan_buf = _neutralize(self._scan_buf, [(start, end)])
        self._bracket_buf = _neutralize(self._bracket_buf, [(start, end)], bracketed=True)

    def _release(self, *, final: bool) -> str:
        size = len(self._buf)
        holds = [*self._holding.values(), *self._bracket_holding.values()]
        point = size if final else min(holds, default=size)
        spans = [(f.start, f.end) for f in self._findings] + self._protected
        moved = True
        while moved:  # a span crossing the release point waits, with everything it touches
            moved = False
            for start, end in spans:
                if start < point < end:
                    point, moved = start, True
            if point < size:  # and so does the run of text glued to what is held
                glued = self._glued_start(point)
                if glued < point:
                    point, moved = glued, True
        point = max(point, self._emit)
        released = [f for f in self._findings if f.start < point]
        out = ""
        if point > self._emit or released:
            if self._segmented:
                out = self._render_segments(point, released)
            else:
                out = _render(
                    self._buf, self._emit, point, released, self._protected, self._tagger,
                    self.counts,
                )  # fmt: skip
                if released and self._reread is not None:
                    out = self._read_again(out)
            self._findings = [f for f in self._findings if f.start >= point]
            self._protected = [p for p in self._protected if p[1] > point]
            self._emit = point
        if not final and size - point > self._max_hold:
            out += self._overflow(point, min(holds, default=point))
        if out:
            self._released_tail = (self._released_tail + out)[-CONTEXT_CHARS:]
        self._trim()
        return out

    def _glued_start(self, point: int) -> int:
        """Where the text glued to `point` starts: its run of non-space characters, or the
        quoted value it is in (`"api_key": "some words <secret>`), not before what was
        released nor more than `_GLUE_CHARS` back."""
        low = max(self._emit, point - _GLUE_CHARS)
        value = _OPEN_VALUE.search(self._buf, low, point)
        if value is not None and value.end() == point:
            return value.end(1)
        space = _LAST_SPACE.search(self._buf, low, point)
        return space.end() if space is not None else low

    def _read_again(self, out: str) -> str:
        """`out` (released text holding new tags) after whole text's later passes, read
        after the text released before it; what those passes would change in text already
        released cannot be taken back, so then `out` is read again alone."""
        assert self._reread is not None
        tail = self._released_tail
        again = self._reread(tail + out)
        if not again.counts:
            return out
        if not again.text.startswith(tail):
            again = self._reread(out)
            if not again.counts:
                return out
            result = again.text
        else:
            result = again.text[len(tail) :]
        for rule_id, n in again.counts.items():
            self.counts[rule_id] = self.counts.get(rule_id, 0) + n
        return result

    def _render_segments(self, point: int, released: list[_Finding]) -> str:
        """`_render` of [emit, point) cut at the segment ends in it (see `mark`)."""
        pieces: list[str] = []
        cursor = self._emit
        while self._marks and self._marks[0] - self._base <= point:
            cut = max(self._marks.pop(0) - self._base, cursor)
            self.crossings += [f.rule_id for f in released if f.start < cut < f.end]
            piece = _render(
                self._buf, cursor, cut, released, self._protected, self._tagger, self.counts
            )
            pieces.append(piece)
            self._done.append(self._open + piece)
            self._open = ""
            cursor = cut
        if cursor < point:
            piece = _render(
                self._buf, cursor, point, released, self._protected, self._tagger, self.counts
            )
            pieces.append(piece)
            self._open += piece
        return "".join(pieces)

    def _overflow(self, point: int, restart: int) -> str:
        """Held text grew past max_hold: replace it by a tag, never release it raw.

        The head of the held match (from `restart`, where it started) stays in the buffer,
        counted as released, and the rest is dropped: rules then see that head followed by
        whatever comes next, so the rule that held the text keeps matching its continuation
        (e.g. the rest of a long private key) and the buffer stays bounded.
        """
        tag = self._tagger(OVERFLOW_RULE_ID, self._buf[point:])
        self.counts[OVERFLOW_RULE_ID] = self.counts.get(OVERFLOW_RULE_ID, 0) + 1
        end = max(point, restart + min(_OVERFLOW_SEED, self._max_hold // 2))
        self._buf = self._buf[:end]
        self._scan_buf = self._scan_buf[:end]
        self._bracket_buf = self._bracket_buf[:end]
        self._emit = end
        self._findings = []
        self._protected = [p for p in self._protected if p[1] <= point]
        self._holding = dict.fromkeys(range(len(self._scanners)), restart)
        if self._two_views:
            self._bracket_holding = dict.fromkeys(range(1, len(self._scanners)), restart)
        return tag

    def _trim(self) -> None:
        anchors = [
            self._emit,
            *self._holding.values(),
            *self._bracket_holding.values(),
            *(f.start for f in self._findings),
        ]
        cut = min(anchors) - CONTEXT_CHARS
        if cut <= 0:
            return
        self._base += cut
        self._buf = self._buf[cut:]
        self._scan_buf = self._scan_buf[cut:]
        self._bracket_buf = self._bracket_buf[cut:]
        self._emit -= cut
        self._holding = {i: p - cut for i, p in self._holding.items()}
        self._rescanned_at -= cut
        self._bracket_holding = {i: p - cut for i, p in self._bracket_holding.items()}
        self._findings = [
            _Finding(f.start - cut, f.neg_end + cut, f.order, f.rule_id) for f in self._findings
        ]
        self._protected = [(s - cut, e - cut) for s, e in self._protected if e - cut > 0]


# --- rule self-tests (`python -m sluicegate rules test`) ---------------------------------


@dataclass(frozen=True)
class ExampleFailure:
    """A rule that does not behave as its own examples say. Examples are fake data."""

    rule_id: str
    source: str
    example: str  # key path, e.g. "examples.positive[1]"
    problem: str

    def __str__(self) -> str:
        return f"{self.source}: {self.rule_id}: {self.example}: {self.problem}"


def check_rule_examples(rule: Rule) -> list[ExampleFailure]:
    """Run a rule alone on its examples: positives redacted, negatives untouched.

    Also checks the keyword contract (the prefiltered search finds what a full scan finds)
    and that streaming the positive one character at a time gives the whole-text result.
    """
    failures: list[ExampleFailure] = []

    def fail(example: str, problem: str) -> None:
        failures.append(ExampleFailure(rule.id, str(rule.source), example, problem))

    pack = RulePack(rules=(rule,), key_rules=(), profile="rule-test")
    redactor = Redactor(pack, min(rule.directions), decode=False)  # the rule's regex alone
    for index, example in enumerate(rule.positives):
        where = f"examples.positive[{index}]"
        result = redactor.redact_text(example.text)
        if example.secret is not None and example.secret in result.text:
            fail(where, "the secret survives redaction")
        elif not result.changed:
            fail(where, "nothing was redacted")
        full = sorted(redactor._findings(example.text, prefilter=False))
        if sorted(redactor._findings(example.text)) != full:
            fail(where, "a match starts outside the windows of its keyword occurrences")
    failures += check_stream_soundness(rule, redactor)
    for index, text in enumerate(rule.negatives):
        if redactor.redact_text(text).changed:
            fail(f"examples.negative[{index}]", "a negative example was redacted")
    return failures


def check_stream_soundness(rule: Rule, redactor: Redactor | None = None) -> list[ExampleFailure]:
    """Stream each positive example one character at a time: it must come out as whole-text
    redaction does, and every match must start with a character of the rule's computed first
    set (a stream only runs the rules that can start at the characters it received).

    Run on every rule when rule files are loaded (see `rules.load_rule_set`).
    """
    failures: list[ExampleFailure] = []
    if redactor is None:
        pack = RulePack(rules=(rule,), key_rules=(), profile="rule-test")
        redactor = Redactor(pack, min(rule.directions), decode=False)
    for index, example in enumerate(rule.positives):
        where = f"examples.positive[{index}]"
        for match in rule.pattern.finditer(example.text):
            if match.end() > match.start() and not rule.first.accepts(match.group()[0]):
                problem = "a match starts with a character outside the computed first set"
                failures.append(ExampleFailure(rule.id, str(rule.source), where, problem))
                break
        stream = redactor.stream(max_hold=len(example.text) + 1)
        streamed = "".join(stream.feed(c) for c in example.text) + stream.flush()
        if streamed != redactor.redact_text(example.text).text:
            problem = "streaming one character at a time differs from whole-text redaction"
            failures.append(ExampleFailure(rule.id, str(rule.source), where, problem))
    return failures


def check_key_rule_examples(rule: KeyRule) -> list[ExampleFailure]:
    failures: list[ExampleFailure] = []
    for index, name in enumerate(rule.positives):
        if not rule.matches(name):
            where = f"examples.positive[{index}]"
            failures.append(ExampleFailure(rule.id, str(rule.source), where, "key not matched"))
    for index, name in enumerate(rule.negatives):
        if rule.matches(name):
            where = f"examples.negative[{index}]"
            failures.append(ExampleFailure(rule.id, str(rule.source), where, "key matched"))
    for index, value in enumerate(rule.value_positives):
        if not rule.accepts_value(value):
            where = f"value_examples.positive[{index}]"
            failures.append(ExampleFailure(rule.id, str(rule.source), where, "value refused"))
    for index, value in enumerate(rule.value_negatives):
        if rule.accepts_value(value):
            where = f"value_examples.negative[{index}]"
            failures.append(ExampleFailure(rule.id, str(rule.source), where, "value accepted"))
    return failures


# Rule files are checked with it when they are loaded.
use_stream_check(check_stream_soundness)
