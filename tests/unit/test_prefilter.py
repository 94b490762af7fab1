"""Hyperscan keyword prefilter: the same occurrences and the same redactions as the pure-Python
keyword index (the reference), on the real rule pack and on synthetic keyword sets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sluicegate.redaction import prefilter
from sluicegate.redaction.keywords import KeywordIndex
from sluicegate.redaction.redactor import LiteralSecret, Redactor, _Compiled
from sluicegate.redaction.rules import Direction, load_rule_pack, load_rule_set, select
from tests.unit.test_keywords import FRAGMENTS, PACK_KEYS, SYNTHETIC_KEYS, TEXT, naive

RULES = Path(__file__).resolve().parents[2] / "rules"
POSITIVES = sorted(
    {e.text for r in load_rule_set([RULES]).rules for e in r.positives if e.text.isascii()}
)
ASCII_TEXT = st.lists(
    st.one_of(
        st.sampled_from([f for f in FRAGMENTS if f.isascii()]),
        st.sampled_from([f for f in FRAGMENTS if f.isascii()]).map(str.upper),
        st.sampled_from([" = ", ": ", "abc", '"', "'", "\n", "_", "-", ".", "\\u00e9", "\t"]),
        st.text(alphabet="aekKtAQ_-.:=~ \"'0123", max_size=5),
    ),
    max_size=14,
).map("".join)
DOCUMENT = st.lists(
    st.one_of(
        st.sampled_from(POSITIVES),
        st.sampled_from(POSITIVES).map(lambda s: s[: len(s) // 2]),
        ASCII_TEXT,
        st.sampled_from(["É", "ß", "İ", "\u212a"]),  # non-ASCII: the reference path
    ),
    max_size=8,
).map(" ".join)


def test_hyperscan_is_installed_for_the_tests() -> None:
    """The test extras install it, so the fast path is what these tests compare."""
    assert prefilter.available()


PACK = KeywordIndex(PACK_KEYS)
SYNTHETIC = KeywordIndex(SYNTHETIC_KEYS)


def test_indexes_are_accelerated() -> None:
    assert PACK.accelerated and SYNTHETIC.accelerated
    # A keyword Hyperscan is not given (not ASCII): the whole index stays pure Python.
    assert not KeywordIndex(
        [("clé", None), ("ghp_", None), ("xoxb-", None), ("AKIA", None)]
    ).accelerated
    # One or two passes: not worth a database.
    assert not KeywordIndex([("ghp_", None)]).accelerated


@settings(max_examples=400, deadline=None)
@given(st.one_of(TEXT, ASCII_TEXT))
@example("KEY = x Key: token=abc AKIA akia")
@example("\"'aaa")
def test_pack_keywords_same_as_the_reference(text: str) -> None:
    folded = text.lower()
    assert len(folded) == len(text)
    expected = PACK.python_hits(text, folded)
    assert PACK.hits(text, folded) == expected
    assert PACK.hits(text, None if not PACK.needs_folding else folded) == expected
    assert expected == naive(PACK_KEYS, text)


@settings(max_examples=400, deadline=None)
@given(st.one_of(TEXT, ASCII_TEXT))
@example("sk-ant-ask-Q~q~EAAAA")
def test_synthetic_keywords_same_as_the_reference(text: str) -> None:
    assert SYNTHETIC.hits(text, text.lower()) == SYNTHETIC.python_hits(text, text.lower())
    assert SYNTHETIC.hits(text, text.lower()) == naive(SYNTHETIC_KEYS, text)


@pytest.fixture(scope="module")
def redactors() -> dict[str, tuple[Redactor, Redactor]]:
    """Per profile: a redactor with the prefilter and one forced onto the pure-Python index."""
    out = {}
    for profile in sorted(load_rule_set([RULES]).profiles):
        fast = Redactor(load_rule_pack([RULES], profile), Direction.REQUEST)
        pure_pack = load_rule_pack([RULES], profile)
        keywords = _Compiled.of(pure_pack, Direction.REQUEST).keywords
        keywords._fast, keywords._fast_pending = None, False
        pure = Redactor(pure_pack, Direction.REQUEST)
        assert _Compiled.of(fast.pack, Direction.REQUEST).keywords.accelerated
        out[profile] = (fast, pure)
    return out


@settings(max_examples=300, deadline=None)
@given(DOCUMENT)
def test_redaction_output_is_identical(
    redactors: dict[str, tuple[Redactor, Redactor]], document: str
) -> None:
    for fast, pure in redactors.values():
        got, want = fast.redact_text(document), pure.redact_text(document)
        assert (got.text, got.counts) == (want.text, want.counts)


def test_every_positive_example_is_redacted_the_same(
    redactors: dict[str, tuple[Redactor, Redactor]],
) -> None:
    for fast, pure in redactors.values():
        for text in POSITIVES:
            assert fast.redact_text(text) == pure.redact_text(text)


def test_switch_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICEGATE_PURE_PYTHON", "1")
    assert not prefilter.available()
    assert not KeywordIndex(SYNTHETIC_KEYS).accelerated


def test_threads_scan_concurrently_with_their_own_scratch() -> None:
    """Large bodies are redacted on worker threads: each thread gets its own scratch space."""
    import random
    import threading

    rng = random.Random(7)
    words = [f for f in FRAGMENTS if f.isascii()] + ["abc", " = ", "x", "\n"]
    texts = [" ".join(rng.choices(words, k=rng.randint(50, 2000))) for _ in range(40)]
    expected = [PACK.python_hits(t, t.lower()) for t in texts]
    mismatches: list[int] = []

    def scan() -> None:
        for _ in range(3):
            mismatches.extend(
                i for i, t in enumerate(texts) if PACK.hits(t, t.lower()) != expected[i]
            )

    threads = [threading.Thread(target=scan) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert mismatches == []
    assert PACK._fast is not None and PACK._fast._prototype is not None


def _count_builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Hyperscan databases built from now on (their keyword counts)."""
    builds: list[int] = []
    real = prefilter.HyperscanKeywords.build

    def counting(cls: type, words: Sequence[prefilter.Word]) -> Any:
        builds.append(len(words))
        return real(words)

    monkeypatch.setattr(prefilter.HyperscanKeywords, "build", classmethod(counting))
    return builds


def test_warm_builds_the_database_so_no_scan_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway warms its redactors when it applies a config: the first request then finds
    the database built (it took 0.2-0.4 s on whatever thread scanned first)."""
    builds = _count_builds(monkeypatch)
    pack = select(load_rule_set([RULES]), "default")  # a new pack: nothing compiled yet
    redactor = Redactor(pack, Direction.REQUEST)
    assert builds == []
    redactor.warm()
    assert len(builds) == 1
    keywords = _Compiled.of(pack, Direction.REQUEST).keywords
    assert keywords._fast is not None and not keywords._fast_pending
    # The first scans, and a flow's redactor with literals (same compiled rules), build nothing.
    redactor.redact_text("token=" + "a" * 20)
    flow = redactor.with_literals([LiteralSecret("injected", "sk-literal-value-1234")])
    assert "sk-literal-value-1234" not in flow.redact_text("x sk-literal-value-1234 y").text
    flow.stream(4096).feed("api_key=abc")
    assert len(builds) == 1
    # The other direction is its own database, built when that direction's redactor warms.
    Redactor(pack, Direction.RESPONSE).warm()
    assert len(builds) == 2


def test_warm_raises_what_building_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """A database Hyperscan refuses leaves the pure-Python passes (exact); any other failure
    comes out of `warm`, where the gateway applies the config, not out of a request."""

    def broken(cls: type, words: Sequence[prefilter.Word]) -> Any:
        raise MemoryError("no memory for the database")

    monkeypatch.setattr(prefilter.HyperscanKeywords, "build", classmethod(broken))
    redactor = Redactor(select(load_rule_set([RULES]), "default"), Direction.REQUEST)
    with pytest.raises(MemoryError):
        redactor.warm()
