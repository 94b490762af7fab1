"""Follows compiled into the Hyperscan prefilter (hsfollow.py): the translation of a keyword and
its `followed_by` pattern matches at least wherever Python's `re` does, so the prefilter finds
the same occurrences and the redactor the same findings as the plain path, on the rule pack's
examples, the public secrets corpus and generated texts."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import hyperscan
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sluicegate.redaction import hsfollow, prefilter
from sluicegate.redaction.keywords import Key, KeywordIndex
from sluicegate.redaction.redactor import Redactor, _Compiled, _first_literal, _windowed_matches
from sluicegate.redaction.rules import Direction, Rule, load_rule_pack, load_rule_set
from tests.unit.test_keywords import PACK_KEYS, naive

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "rules"
CORPUS = ROOT / "tests" / "data" / "secrets-corpus"
RULE_SET = load_rule_set([RULES])
PACK_FOLLOWS = [(keyword, follow) for keyword, follow in PACK_KEYS if follow is not None]

# Shapes the translation must get right: lookaheads at the end and in the middle, negative
# ones, lookbehinds, anchors and boundaries (dropped), Python's `\s` (it takes \x1c-\x1f),
# unbounded repeats after bounded ones and inside optional groups (split at the end),
# alternatives followed by more items (distributed), lazy / possessive / atomic forms, a
# case-sensitive group (the follow is matched in the lowercased text), `.` with and without
# DOTALL.
TRICKY_FOLLOWS = [
    r"(?=[a-z]{3})",
    r"[\w.-]{0,64}[ \t]+['\"]",
    r"[\w.-]{0,8}[ \t]+(?:-[ \t]+)?['\"]?[a-z0-9]{3}",
    r"\w{0,8}(?:[ \t]+|=)['\"]?[^\s'\"$<{\[(-][^\s'\"]{2}",
    r"\s*:",
    r"\s{0,3}=\b",
    r"(?!ab)[a-z]+=",
    r"[a-z]*(?<=n)\s*=",
    r"a+?b",
    r"a*+b",
    r"(?>ab|a)c",
    r"(?-i:x)=",
    r"(?-i:X)=",
    r"[A-Z]{2}:",
    r".{0,4}=",
    r"(?s:.){0,4}=",
    r"=$",
    r"^=",
    r"(?:=|:)(?=\s*['\"])",
    r"(?:ab|cd)*:",
    r"[^\s:/@'\"<>]{0,10}:[^\s/@'\"<>]{3,20}@",
    r"(?=[0-9a-f]{4}-[0-9a-f]{4}(?![\w-]))",
    r"x{2,}y",
    r"",
]
TRICKY_KEYS: list[Key] = [
    (keyword, re.compile(follow)) for follow in TRICKY_FOLLOWS for keyword in ("key", "Key", "tok_")
]
ALPHABET = "aAbBcdnNxXyYkKeE_=:-'\" \t\n\x1c\x1f.@/0123456789fF<"
TEXT = st.lists(
    st.one_of(
        st.sampled_from(["key", "KEY", "Key", "tok_", "TOK_", "token", "password", "pwd"]),
        st.sampled_from([" = ", ": ", " - ", "='", '"', "\x1c:", "ab", "abc", "nn =", "x=", "X="]),
        st.text(alphabet=ALPHABET, max_size=8),
    ),
    max_size=16,
).map("".join)


def test_every_follow_of_the_pack_is_compiled() -> None:
    """All of the pack's follows translate and Hyperscan takes them with start-of-match
    tracking; the index gates every one (none left to a Python check per keyword)."""
    for keyword, follow in PACK_FOLLOWS:
        source = hsfollow.follow_source(keyword, follow, True)
        assert source is not None, (keyword, follow.pattern)
        assert prefilter._compiles(source), (keyword, follow.pattern)
    fast = KeywordIndex(PACK_KEYS)._prefilter()
    assert fast is not None
    assert fast.gated == len(PACK_FOLLOWS)


def test_untranslatable_follows_stay_with_python() -> None:
    """A conditional group has no translation: that follow is checked after each keyword
    occurrence in Python, as before, and the hits are still the reference's."""
    conditional = re.compile(r"(a)?(?(1)b|c)=")
    assert hsfollow.follow_source("key", conditional, True) is None
    keys: list[Key] = [("key", conditional), ("key", re.compile("[ =]+x")), ("ghp_", None)]
    index = KeywordIndex([*keys, ("token", None), ("xoxb-", None)])
    fast = index._prefilter()
    assert fast is not None and fast.gated == 1
    for text in ("key ab= keyc= KEY = x keyb=", "ghp_ key=x token", "nothing here"):
        assert index.hits(text, text.lower()) == index.python_hits(text, text.lower())


def test_follows_hyperscan_refuses_stay_with_python() -> None:
    """A translation Hyperscan will not compile with start-of-match tracking (a bounded repeat
    then an unbounded one, repeated) fails the one-compilation attempt; the index is then built
    follow by follow, and that follow is checked in Python."""
    refused = re.compile(r"(?:[\w.-]{0,64}[ \t]+['\"]){2}z")
    source = hsfollow.follow_source("key", refused, True)
    assert source is not None and not prefilter._compiles(source)
    keys: list[Key] = [("key", refused), ("key", re.compile("[ =]+x")), ("ghp_", None)]
    index = KeywordIndex([*keys, ("token", None), ("xoxb-", None)])
    fast = index._prefilter()
    assert fast is not None and fast.gated == 1
    for text in ("key  ' a 'z key = x", "KEY.a '  b'z", "ghp_ key  x"):
        assert index.hits(text, text.lower()) == index.python_hits(text, text.lower())


def _anchored_match(source: str, data: bytes) -> bool:
    database = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    database.compile(expressions=[b"^" + source.encode("ascii")], ids=[0], elements=1)
    found: list[int] = []

    def on_match(*_args: object) -> None:
        found.append(1)

    database.scan(data, match_event_handler=on_match)
    return bool(found)


@settings(max_examples=200, deadline=None)
@given(TEXT, st.sampled_from(TRICKY_KEYS + PACK_FOLLOWS), st.booleans())
@example("key\x1c:", ("key", re.compile(r"\s*:")), True)
@example("KeyX=", ("key", re.compile(r"(?-i:x)=")), True)
@example("keyab=", ("key", re.compile(r"(?!ab)[a-z]+=")), True)
@example("tok_ \t -  'abc", ("tok_", re.compile(TRICKY_FOLLOWS[2])), True)
def test_translation_matches_wherever_python_does(
    text: str, key: tuple[str, re.Pattern[str]], in_folded: bool
) -> None:
    """At every occurrence of the keyword whose follow Python matches (in the lowercased text
    or in the text), the translated expression matches from there too."""
    keyword, follow = key
    source = hsfollow.follow_source(keyword, follow, in_folded)
    if source is None or not prefilter._compiles(source):
        return
    folded = keyword == keyword.lower()
    find_in = text.lower() if folded else text
    match_in = text.lower() if in_folded else text
    check = hsfollow.ignoring_case(follow)
    for start in range(len(text)):
        if not find_in.startswith(keyword, start):
            continue
        if check.match(match_in, start + len(keyword)) is not None:
            assert _anchored_match(source, text[start:].encode("ascii")), (text, start)


TRICKY_INDEX = KeywordIndex([*TRICKY_KEYS, ("tok_", None), ("key", None), ("ghp_", None)])
PACK_INDEX = KeywordIndex(PACK_KEYS)


@settings(max_examples=300, deadline=None)
@given(TEXT)
@example("key\x1c: Key X= keyx= tok_ \t - 'abc KEYab=")
def test_gated_hits_are_the_reference_hits(text: str) -> None:
    folded = text.lower()
    for index in (TRICKY_INDEX, PACK_INDEX):
        assert index.accelerated
        assert index.hits(text, folded) == index.python_hits(text, folded)
    assert PACK_INDEX.hits(text, folded) == naive(PACK_KEYS, text)


def test_switched_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICEGATE_HS_FOLLOW", "0")
    fast = KeywordIndex(PACK_KEYS)._prefilter()
    assert fast is not None and fast.gated == 0
    text = "password = 'x' token: y key=z"
    assert KeywordIndex(PACK_KEYS).hits(text, text.lower()) == PACK_INDEX.hits(text, text.lower())


def _redactors(monkeypatch: pytest.MonkeyPatch, profile: str) -> dict[str, Redactor]:
    """Per variant, a redactor on its own pack: follows compiled into Hyperscan (gated),
    Hyperscan on keywords only with follows checked in Python (keywords), the pure-Python
    index (plain)."""
    out: dict[str, Redactor] = {}
    for name, env in (("gated", "1"), ("keywords", "0"), ("plain", None)):
        monkeypatch.setenv("SLUICEGATE_HS_FOLLOW", env or "1")
        pack = load_rule_pack([RULES], profile)
        index = _Compiled.of(pack, Direction.REQUEST).keywords
        if env is None:
            index._fast, index._fast_pending = None, False
        fast = index._prefilter()
        assert (fast is not None) == (env is not None)
        assert fast is None or (fast.gated > 0) == (env == "1")
        out[name] = Redactor(pack, Direction.REQUEST)
    return out


def _texts() -> list[str]:
    texts = [e.text for rule in RULE_SET.rules for e in rule.positives]
    texts += [n for rule in RULE_SET.rules for n in rule.negatives]
    for name in ("positives.jsonl", "negatives.jsonl"):
        lines = (CORPUS / name).read_text(encoding="utf-8").splitlines()
        texts += [json.loads(line)["text"] for line in lines if line]
    return texts


@pytest.mark.parametrize("profile", sorted(RULE_SET.profiles))
def test_same_findings_on_examples_and_corpus(
    monkeypatch: pytest.MonkeyPatch, profile: str
) -> None:
    """Every rule's examples and every record of the public secrets corpus are redacted the
    same (text and per-rule counts) with follows compiled, with keywords only in Hyperscan,
    and by the pure-Python index; and each variant's keyword hits are the reference's."""
    redactors = _redactors(monkeypatch, profile)
    texts = _texts()
    assert len(texts) > 1000
    ascii_texts = 0
    for text in texts:
        results: dict[str, Any] = {}
        for name, redactor in redactors.items():
            result = redactor.redact_text(text)
            results[name] = (result.text, result.counts)
        assert results["gated"] == results["plain"], text[:80]
        assert results["keywords"] == results["plain"], text[:80]
        folded = text.lower()
        if len(folded) == len(text):
            gated = _Compiled.of(redactors["gated"].pack, Direction.REQUEST).keywords
            assert gated.hits(text, folded) == gated.python_hits(text, folded)
            ascii_texts += text.isascii()
    assert ascii_texts > 1000  # the gated path was the one taken


# --- rules tried where their literal prefix is ---------------------------------------------

PREFIXED = [
    (rule, prefix)
    for rule in RULE_SET.rules
    if rule.keywords and (prefix := _first_literal(rule)) is not None and len(prefix) > 1
]


OTHER_TEXTS = [e.text for r in RULE_SET.rules for e in r.positives]


def test_some_rules_have_a_literal_prefix() -> None:
    assert len(PREFIXED) >= 20
    assert any(prefix == "re_" for _, prefix in PREFIXED)


@pytest.mark.parametrize("rule_prefix", PREFIXED, ids=lambda rp: rp[0].id)
def test_windowed_matches_by_prefix_are_those_by_first_character(
    rule_prefix: tuple[Rule, str],
) -> None:
    """A rule tried only where its literal prefix occurs finds, around any anchors, the
    matches it finds when tried at every occurrence of its first character."""
    rule, prefix = rule_prefix
    own = [e.text for e in rule.positives] + list(rule.negatives)
    own += [f"{prefix[0]} {e.text}{prefix[0]}{prefix}" for e in rule.positives]
    before, after = rule.window
    for text in own + OTHER_TEXTS:
        # windows merged over the whole text, or in runs
        grids = [list(range(0, len(text) + 1, step)) for step in (1, 40, 300)]
        if text in own:  # one window ending and starting everywhere
            grids += [[at] for at in range(-after, len(text) + before + 1)]
        for anchors in grids:
            by_prefix = _windowed_matches(rule, prefix, text, anchors)
            by_char = _windowed_matches(rule, prefix[0], text, anchors)
            assert [m.span() for m in by_prefix] == [m.span() for m in by_char], text
