"""Memoised redaction: remembered clean texts never change what is redacted, per caller, bounded."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from sluicegate.auth.caller import Caller
from sluicegate.redaction.bodies import BodyPolicy, redact_body
from sluicegate.redaction.memo import CleanTexts, MemoRedactor, key_rule_for
from sluicegate.redaction.redactor import LiteralSecret, Redactor
from sluicegate.redaction.redactor import LiteralSecret as ScrubLiteral
from sluicegate.redaction.rules import Direction, load_rule_pack
from sluicegate.redaction.runtime import RedactionRuntime

RULES = Path(__file__).resolve().parents[2] / "rules"
PACK = load_rule_pack([RULES])
REQUEST = Redactor(PACK, Direction.REQUEST)
RESPONSE = Redactor(PACK, Direction.RESPONSE)
GH = "ghp_C3J27XDCG2LmlZGEONYlgCtjfIZ4SOcMz9CP"
INJECTED = "sk-injected-0123456789abcdefghijklmnopqrst"
TEXTS = [
    "gpt-4o",
    "You are a careful coding assistant.",
    f"my token is {GH}, keep it",
    f"the key {INJECTED} came back",
    "password: hunter2hunter2",
    "[REDACTED:github-token] stays a tag",
    "",
    "assistant",
]


def memo_redactor(
    memo: CleanTexts, scope: str = "alice", literals: tuple[str, ...] = ()
) -> MemoRedactor:
    redactor = (
        RESPONSE.with_literals([LiteralSecret("injected-credential:r", v) for v in literals])
        if literals
        else RESPONSE
    )
    return MemoRedactor(redactor, PACK, Direction.RESPONSE, memo, scope, literals)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(TEXTS) | st.text(max_size=40),
            st.sampled_from(["alice", "bob"]),
            st.booleans(),
        ),
        max_size=30,
    )
)
def test_memoised_redaction_equals_plain_redaction(
    calls: list[tuple[str, str, bool]],
) -> None:
    """Whatever was remembered before, each text redacts exactly as the plain redactor would,
    with or without the flow's literal (an injected credential the rules do not know)."""
    memo = CleanTexts()
    with_literal = RESPONSE.with_literals([LiteralSecret("injected-credential:r", INJECTED)])
    for text, scope, has_literal in calls:
        plain = with_literal if has_literal else RESPONSE
        literals = (INJECTED,) if has_literal else ()
        assert memo_redactor(memo, scope, literals).redact_text(text) == plain.redact_text(text)


def test_a_remembered_text_holding_the_flows_literal_is_redacted() -> None:
    memo = CleanTexts()
    text = f"the key {INJECTED} came back"
    assert memo_redactor(memo).redact_text(text).text == text  # no rule knows this value
    assert memo.seen("alice", text)
    result = memo_redactor(memo, literals=(INJECTED,)).redact_text(text)
    assert result.text == "the key [REDACTED:injected-credential:r] came back"
    assert result.counts == {"injected-credential:r": 1}


def test_texts_with_findings_are_never_remembered() -> None:
    memo = CleanTexts()
    redactor = memo_redactor(memo)
    for _ in range(2):
        assert redactor.redact_text(f"my token is {GH}").counts == {"github-token": 1}
    assert len(memo) == 0 and memo.chars == 0


def test_remembered_texts_are_per_caller() -> None:
    memo = CleanTexts()
    memo_redactor(memo, "alice").redact_text("a shared system prompt")
    assert memo.seen("alice", "a shared system prompt")
    assert not memo.seen("bob", "a shared system prompt")


def test_memory_is_bounded_least_recently_used_first() -> None:
    memo = CleanTexts(max_chars=30, max_text_chars=12)
    redactor = memo_redactor(memo)
    redactor.redact_text("x" * 13)  # longer than one remembered text may be
    assert len(memo) == 0
    for word in ("aaaaaaaaaa", "bbbbbbbbbb", "cccccccccc"):
        redactor.redact_text(word)
    assert memo.chars == 30
    assert memo.seen("alice", "aaaaaaaaaa")  # now the most recently used
    redactor.redact_text("dddddddddd")
    assert memo.chars == 30
    assert not memo.seen("alice", "bbbbbbbbbb")
    assert all(memo.seen("alice", w) for w in ("aaaaaaaaaa", "cccccccccc", "dddddddddd"))
    few = CleanTexts(max_texts=2)
    for word in ("a", "b", "c"):
        memo_redactor(few).redact_text(word)
    assert len(few) == 2 and not few.seen("alice", "a") and few.seen("alice", "c")


def test_json_bodies_redact_the_same_with_a_memo() -> None:
    policy = BodyPolicy()
    memo = CleanTexts()
    body = json.dumps(
        {
            "model": "gpt-4o",
            "messages": [
                {"role": "system", "content": "You are a careful coding assistant."},
                {"role": "user", "content": f"deploy with {GH}"},
            ],
            "api_key": "nr-9f3k2-key",
        }
    ).encode()
    expected = redact_body(body, "application/json", REQUEST, policy)
    for _ in range(3):
        redactor = MemoRedactor(REQUEST, PACK, Direction.REQUEST, memo, "alice")
        assert redact_body(body, "application/json", redactor, policy) == expected
    assert expected.counts == {"github-token": 1, "key-api-key": 1}
    assert memo.seen("alice", "You are a careful coding assistant.")


def test_key_rule_lookups_are_remembered_and_bounded() -> None:
    names = ["password", "api_key", "model", "Authorization", "x" * 300]
    for name in names * 2:
        expected = next((r for r in REQUEST.key_rules if r.matches(name)), None)
        assert key_rule_for(REQUEST, name) is expected
    cache = PACK.cache[("memo.key_rule", Direction.REQUEST)]
    assert "x" * 300 not in cache and "model" in cache and cache["model"] is None


def make_runtime() -> RedactionRuntime:
    return RedactionRuntime(
        request=REQUEST,
        response=RESPONSE,
        response_scrub_only=RESPONSE,
        body_policy=BodyPolicy(),
        max_hold=4096,
        max_body_bytes=1 << 20,
    )


def test_runtime_keeps_redactors_per_literal_set_and_masks_new_literals() -> None:
    runtime = make_runtime()
    caller = Caller("alice", (), "https://idp", None, "fp")
    first = (ScrubLiteral("injected-credential:r", INJECTED),)
    rotated = (ScrubLiteral("injected-credential:r", INJECTED[::-1]),)
    assert runtime.for_response(first) is runtime.for_response(first)
    assert runtime.for_response(rotated) is not runtime.for_response(first)
    text = f"echo {INJECTED[::-1]}"
    assert runtime.response_text_redactor(caller, first).redact_text(text).text == text
    masked = runtime.response_text_redactor(caller, rotated).redact_text(text)
    assert masked.text == "echo [REDACTED:injected-credential:r]"
