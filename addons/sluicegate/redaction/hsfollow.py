"""A keyword and its `followed_by` pattern as one Hyperscan expression: a gate, never a verdict.

Most occurrences of a keyword with a follow pattern are not followed by it (`token` in prose,
`.` in every sentence, `key` in code), and checking each one in Python is most of what the
keyword prefilter costs on such text. Here `keyword` + `followed_by` is translated into a
Hyperscan expression whose matches start wherever (at least) the keyword is followed by its
pattern, so only those occurrences come back to Python, where the follow pattern itself is
matched as before: which occurrences count and where their follows end are still decided by
Python's `re`, on the same copy of the text.

The translation only has to be *generous*: on ASCII text (the only text the prefilter scans),
every start at which `keyword` + `followed_by` matches in Python must be the start of a match
of the expression; extra matches only cost a Python check. It is built from the pattern's parse
tree (`re._parser`):

- each character atom (a literal, a class, `.`) becomes the exact set of ASCII characters
  Python's engine accepts there (found by running that atom, compiled alone with the
  pattern's flags and ignoring case, on each of the 128 characters), so no class, escape or
  case-folding rule of Hyperscan has to agree with Python's (`\\s` takes `\\x1c`-`\\x1f` in
  Python, not in Hyperscan);
- sequences, groups, alternatives and repeats are kept (lazy, possessive and atomic forms
  become plain ones: they can only match less);
- zero-width assertions (anchors, `\\b`, lookbehinds, negative lookaheads, a lookahead in
  the middle) are dropped: they only ever remove matches; a lookahead at the very end of the
  pattern (`(?=[a-z0-9]{40})`, most follows are one) is read as what it looks for, so the
  expression then matches past the follow's end, which the gate does not mind;
- anything else (backreferences, conditionals, an atom no ASCII character matches) gives
  None: that follow stays with the plain keyword occurrence and the check in Python.

The keyword is matched as the keyword index matches it: a lowercase keyword in any ASCII case,
one with a capital exactly.
"""

from __future__ import annotations

import functools
import importlib
import re
from typing import Any

try:  # CPython's own regex parser (3.11+); without it no follow is compiled (still exact)
    _parser: Any = importlib.import_module("re._parser")
    _compiler: Any = importlib.import_module("re._compiler")
    _constants: Any = importlib.import_module("re._constants")
except ImportError:  # pragma: no cover - other Pythons: every follow is checked in Python
    _parser = _compiler = _constants = None

_ASCII = tuple(chr(code) for code in range(128))
_FOLDED = tuple(char.lower() for char in _ASCII)  # what the lowercased text holds instead
# Carried with the regex flags through a translation: the follow is matched in the
# lowercased text (a bit no `re` flag uses).
_IN_FOLDED = 1 << 30
_REPEATS = (
    ()
    if _constants is None
    else (_constants.MAX_REPEAT, _constants.MIN_REPEAT, _constants.POSSESSIVE_REPEAT)
)


@functools.cache
def ignoring_case(follow: re.Pattern[str]) -> re.Pattern[str]:
    """The follow as the keyword index matches it: always ignoring case."""
    return re.compile(follow.pattern, follow.flags | re.IGNORECASE)


def keyword_source(keyword: str) -> str:
    """A Hyperscan expression for an ASCII keyword: any case if it is in lowercase (as
    `text.lower()` folds ASCII: A-Z only), else exactly."""
    folded = keyword == keyword.lower()
    out = []
    for char in keyword:
        if folded and char != char.upper():
            out.append(_char_class({ord(char), ord(char.upper())}))
        else:
            out.append(f"\\x{ord(char):02x}")
    return "".join(out)


@functools.cache
def follow_source(keyword: str, follow: re.Pattern[str], in_folded: bool) -> str | None:
    """A Hyperscan expression matching (at least) at every start in an ASCII text where
    `keyword` is followed by a match of `follow` (ignoring case), the follow being matched in
    the lowercased text if `in_folded` (as the keyword index does), else in the text; None if
    the follow cannot be translated (see the module docstring)."""
    if _parser is None or not keyword.isascii():
        return None
    try:
        parsed = _parser.parse(follow.pattern, follow.flags | re.IGNORECASE)
        body = _tail(_items(parsed, parsed.state.flags | (_IN_FOLDED if in_folded else 0)))
    except (re.error, ValueError, TypeError, AttributeError, RecursionError):
        return None
    if body is None:
        return None
    return keyword_source(keyword) + body


# An unbounded repeat at the end of the pattern is split at this many iterations (see `_tail`).
_SPLIT = 16

# A parsed item with the flags in force where it stands (groups may change them).
_Item = tuple[Any, Any, int]


def _items(parsed: Any, flags: int) -> list[_Item]:
    return [(op, argument, flags) for op, argument in parsed]


def _tail(items: list[_Item]) -> str | None:
    """Items ending the pattern: only where a match *starts* matters, not where it ends,
    which allows what a whole expression could not do (Hyperscan refuses start-of-match
    tracking for some shapes, such as a bounded repeat followed by an unbounded one):

    - a group is opened into the items around it, an alternative followed by more items is
      distributed over them (`(a|b)c` -> `(ac|bc)`), so these rules see the last items;
    - an unbounded repeat followed by more items, `x{n,}rest`, becomes
      `(?:x{n,16}rest|x{17})`: with more than 16 iterations, its first 17 already start a
      match there; an optional one, `x?rest`, becomes `(?:x rest|rest)`;
    - a lookahead that is the last item is read as what it looks for."""
    out: list[str] = []
    c = _constants
    for index, (op, argument, flags) in enumerate(items):
        rest = items[index + 1 :]
        if op is c.SUBPATTERN:
            _group, add, remove, inner = argument
            return _join(out, _tail(_items(inner, (flags | add) & ~remove) + rest))
        if op is c.ATOMIC_GROUP:
            return _join(out, _tail(_items(argument, flags) + rest))
        if op is c.BRANCH and rest:
            _, branches = argument
            alternatives = [_tail(_items(branch, flags) + rest) for branch in branches]
            return _join(out, _alternation(alternatives))
        if op in _REPEATS and argument[1] == c.MAXREPEAT and rest:
            low, _high, inner = argument
            repeated = _sequence(_items(inner, flags))
            followed = _tail(rest)
            if repeated is None or followed is None:
                return None
            split = max(low, _SPLIT)
            return _join(
                out,
                f"(?:(?:{repeated}){{{low},{split}}}{followed}|(?:{repeated}){{{split + 1}}})",
            )
        if op in _REPEATS and argument[1] == 1 and rest:  # `x?rest` -> `(?:x rest|rest)`
            low, _high, inner = argument
            once = _tail(_items(inner, flags) + rest)
            return _join(out, once if low else _alternation([once, _tail(rest)]))
        if op is c.ASSERT and argument[0] == 1 and not rest:
            return _join(out, _tail(_items(argument[1], flags)))
        part = _item(op, argument, flags)
        if part is None:
            return None
        out.append(part)
    return "".join(out)


def _join(done: list[str], last: str | None) -> str | None:
    return None if last is None else "".join(done) + last


def _alternation(alternatives: list[str | None]) -> str | None:
    if any(alternative is None for alternative in alternatives):
        return None
    return "(?:" + "|".join(a for a in alternatives if a is not None) + ")"


def _sequence(items: list[_Item]) -> str | None:
    """Items matched one after the other, anywhere in the pattern."""
    out = []
    for op, argument, flags in items:
        part = _item(op, argument, flags)
        if part is None:
            return None
        out.append(part)
    return "".join(out)


def _item(op: Any, argument: Any, flags: int) -> str | None:
    """One item, matching at least what Python's engine matches there."""
    c = _constants
    if op in (c.LITERAL, c.NOT_LITERAL, c.IN, c.ANY):
        chars = _atom_chars(op, argument, flags)
        return _char_class(chars) if chars else None
    if op is c.SUBPATTERN:
        _group, add, remove, inner = argument
        return _group_of(_sequence(_items(inner, (flags | add) & ~remove)))
    if op is c.ATOMIC_GROUP:  # matches less than the same group without the atomicity
        return _group_of(_sequence(_items(argument, flags)))
    if op in _REPEATS:  # lazy and possessive repeats match less than greedy ones
        low, high, inner = argument
        repeated = _sequence(_items(inner, flags))
        if repeated is None:
            return None
        bound = f"{{{low},}}" if high == c.MAXREPEAT else f"{{{low},{high}}}"
        return f"(?:{repeated}){bound}"
    if op is c.BRANCH:
        _, branches = argument
        return _alternation([_sequence(_items(branch, flags)) for branch in branches])
    if op in (c.ASSERT, c.ASSERT_NOT, c.AT):
        return ""  # a zero-width constraint dropped: only more matches
    return None  # backreferences, conditionals, anything unknown: not translated


def _group_of(inner: str | None) -> str | None:
    return None if inner is None else f"(?:{inner})"


def _atom_chars(op: Any, argument: Any, flags: int) -> frozenset[int]:
    """The ASCII characters of the text Python's engine accepts for one character atom (with
    `flags`), where the engine sees the lowercased text if the follow is matched there (so a
    case-sensitive `x` accepts `X` too, and `X` nothing)."""
    folding = bool(flags & _IN_FOLDED)
    return _atom_chars_cached(op, _freeze(argument), flags & ~_IN_FOLDED, folding)


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(item) for item in value)
    if isinstance(value, tuple):
        return tuple(_freeze(item) for item in value)
    return value


@functools.cache
def _atom_chars_cached(op: Any, argument: Any, flags: int, folding: bool) -> frozenset[int]:
    state = _parser.State()
    state.flags = flags
    if op is _constants.IN:
        argument = list(argument)
    atom = _parser.SubPattern(state, [(op, argument)])
    pattern = _compiler.compile(atom, flags)
    seen = _FOLDED if folding else _ASCII
    return frozenset(code for code, char in enumerate(seen) if pattern.fullmatch(char) is not None)


def _char_class(chars: set[int] | frozenset[int]) -> str:
    """A Hyperscan character class of exactly these bytes."""
    ranges: list[tuple[int, int]] = []
    for code in sorted(chars):
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1] = (ranges[-1][0], code)
        else:
            ranges.append((code, code))
    parts = [
        f"\\x{low:02x}" if low == high else f"\\x{low:02x}-\\x{high:02x}" for low, high in ranges
    ]
    return "[" + "".join(parts) + "]"
