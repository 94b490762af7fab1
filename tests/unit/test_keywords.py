"""Keyword index: the occurrences a naive search finds, in a few passes over the text."""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from sluicegate.redaction.keywords import Key, KeywordIndex
from sluicegate.redaction.rules import load_rule_set

RULES = Path(__file__).resolve().parents[2] / "rules"
PACK_KEYS: list[Key] = sorted(
    {(k, r.followed_by) for r in load_rule_set([RULES]).rules for k in r.keywords},
    key=lambda key: (key[0], key[1].pattern if key[1] else ""),
)
SEPARATED = re.compile(r"[\w.-]*[ \t]{0,3}[:=]")
LETTERS = re.compile(r"(?=[a-z]{3})")
# Prefixes of each other, shared suffixes, exact and folded spellings, one character,
# rare anchors, the same keyword with and without a follow.
SYNTHETIC_KEYS: list[Key] = [
    ("sk-", None),
    ("sk-ant-", None),
    ("ask-", None),
    ("ghp_", None),
    ("gho_", None),
    ("AKIA", None),
    ("EAA", None),
    ("EAAA", None),
    ("key", None),
    ("key", SEPARATED),
    ("apikey", None),
    ("key-", None),
    ("token", SEPARATED),
    ("token", LETTERS),
    ('"', LETTERS),
    (".", None),
    ("q~", None),
    ("Q~", None),
    ("x", None),
]
FRAGMENTS = sorted({k for k, _ in PACK_KEYS + SYNTHETIC_KEYS})
TEXT = st.lists(
    st.one_of(
        st.sampled_from(FRAGMENTS),
        st.sampled_from(FRAGMENTS).map(str.upper),
        st.sampled_from(FRAGMENTS).map(str.title),
        st.sampled_from([" = ", ": ", "abc", '"', "'", "\n", "_", "-", ".", "É", "ß"]),
        st.text(alphabet="aekKtAQ_-.:=~ \"'0123", max_size=5),
    ),
    max_size=14,
).map("".join)


def naive(keys: list[Key], text: str) -> dict[Key, list[int]]:
    """Every occurrence (overlapping too); a follow is matched ignoring case."""
    folded = text.lower()
    found: dict[Key, list[int]] = {}
    for keyword, follow in keys:
        haystack = folded if keyword == keyword.lower() else text
        starts = [i for i in range(len(text)) if haystack.startswith(keyword, i)]
        if follow is None:
            positions = starts
        else:
            check = re.compile(follow.pattern, re.IGNORECASE)
            ends = (check.match(folded, start + len(keyword)) for start in starts)
            positions = sorted(match.end() for match in ends if match is not None)
        if positions:
            found[(keyword, follow)] = positions
    return found


PACK_INDEX = KeywordIndex(PACK_KEYS)
SYNTHETIC_INDEX = KeywordIndex(SYNTHETIC_KEYS)


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_pack_keywords_are_found_like_a_naive_search(text: str) -> None:
    assert len(text.lower()) == len(text)
    assert PACK_INDEX.hits(text, text.lower()) == naive(PACK_KEYS, text)


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_overlapping_and_exact_keywords_are_found_like_a_naive_search(text: str) -> None:
    assert SYNTHETIC_INDEX.hits(text, text.lower()) == naive(SYNTHETIC_KEYS, text)


def test_keywords_share_passes() -> None:
    # The point of the index: far fewer passes over the text than keywords.
    assert PACK_INDEX.passes * 4 <= len({k for k, _ in PACK_KEYS})


def test_exact_keywords_alone_need_no_lowercased_copy() -> None:
    index = KeywordIndex([("AKIA", None), ("ghp_", None)])
    assert index.needs_folding
    exact = KeywordIndex([("AKIA", None), ("ASIA", None)])
    assert not exact.needs_folding
    assert exact.hits("x AKIA akia ASIAKIA", None) == {
        ("AKIA", None): [2, 15],
        ("ASIA", None): [12],
    }
