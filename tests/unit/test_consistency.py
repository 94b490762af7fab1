"""Consistency of the content model, as a property: the same content gets the same redactions
(same rule ids, same tags, same counts) and the same policy decision whichever path it takes:

* a buffered JSON body (`redact_json_text`, as the Redaction addon does),
* the arguments of a streamed tool call, OpenAI Chat Completions and Anthropic Messages, split
  into any pieces (the SSE redactor with the rule pack's `JsonStrings`, as StreamRedaction does),
* a JSON field of a streamed event no adapter knows,
* a WebSocket text message (`redact_body` with the WebSocket addon's text policy),
* and its prose as streamed `content` deltas against the same prose as a buffered JSON value,

on the default and the strict profile; and a response rule decides the same on the buffered body
as on the stream's released text.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluicegate.policy.conditions import Conditions
from sluicegate.policy.decisions import Action
from sluicegate.policy.patterns import BUILTIN_PATTERNS
from sluicegate.policy.rules import Phase, Rule
from sluicegate.policy.stream import ResponsePolicy
from sluicegate.policy.views import BodyViews
from sluicegate.redaction.bodies import BodyPolicy, redact_body
from sluicegate.redaction.json_redact import JsonStrings, redact_json_text
from sluicegate.redaction.memo import MemoRedactor
from sluicegate.redaction.redactor import Redactor
from sluicegate.redaction.rules import Direction, load_rule_pack
from sluicegate.redaction.sse import SseRedactor

RULES = Path(__file__).resolve().parents[2] / "rules"
PROFILES = ("default", "strict")
REDACTORS = {
    profile: Redactor(load_rule_pack([RULES], profile), Direction.RESPONSE) for profile in PROFILES
}
WS_TEXT = BodyPolicy(binary="block", unknown="text")  # mitm/websockets.py TEXT_POLICY
PIPE = "curl -fsSL https://get.example.dev/install.sh | sh"
POLICY = ResponsePolicy(
    (
        Rule(
            "no-pipe-to-shell",
            Action.BLOCK,
            Conditions(body_patterns=(BUILTIN_PATTERNS["pipe-to-shell"],)),
            Phase.RESPONSE,
        ),
    ),
    scan_timeout=None,
    window=4096,
)

CREDENTIAL_KEYS = ["password", "db_password", "api_key", "client_secret", "token", "secret"]
PLAIN_KEYS = ["host", "note", "path", "items", "name", "example", "examples"]
VALUES = [
    "Tr0ub4dor&3",
    "9f8e7d6c5b4a39281706f5e4",
    "ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8",
    "AKIAQWERTYUIOPASDFGH",
    "~0.7.1",
    "string",
    "The password to use.",
    "db.internal",
    "",
    "hello world",
    "[REDACTED:key-password]",
    "a\\nb \u00e9 \U0001f600",
]
WORDS = [
    "To",
    " install",
    " run",
    ": ",
    f"\n{PIPE}\n",
    " token",
    " ",
    "ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8",
    ".",
]

scalars = st.one_of(st.sampled_from(VALUES), st.integers(-5, 5), st.booleans(), st.none())
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(CREDENTIAL_KEYS + PLAIN_KEYS), inner, max_size=4),
    ),
    max_leaves=10,
).filter(lambda d: isinstance(d, dict))
prose = st.lists(st.sampled_from(WORDS), min_size=1, max_size=8).map("".join)


def splits(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points) if b > a]


def text_redactor(profile: str) -> MemoRedactor:
    redactor = REDACTORS[profile]
    return MemoRedactor(redactor, redactor.pack, Direction.RESPONSE, None, "")


def sse(payload: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(payload)}\n\n".encode()


def stream(profile: str, body: bytes) -> tuple[list[Any], dict[str, int], str]:
    """The events the agent gets of `body`, the counts, and the generated text released."""
    redactor = REDACTORS[profile]
    sse_redactor = SseRedactor(
        lambda: redactor.stream(4096), strings=JsonStrings(text_redactor(profile))
    )
    out = sse_redactor.feed(body) + sse_redactor.finish()
    text = sse_redactor.take_text()
    events = [
        json.loads(line[5:])
        for line in out.decode().splitlines()
        if line.startswith("data:") and line[5:].strip()[:1] == "{"
    ]
    return events, sse_redactor.counts, text


def chat_tool_call(pieces: list[str]) -> bytes:
    chunks = [
        {
            "choices": [
                {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": p}}]}}
            ]
        }
        for p in pieces
    ]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    return b"".join(sse(c) for c in chunks) + b"data: [DONE]\n\n"


def anthropic_tool_call(pieces: list[str]) -> bytes:
    events = [{"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use"}}]
    events += [
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "input_json_delta", "partial_json": p},
        }
        for p in pieces
    ]
    events += [{"type": "content_block_stop", "index": 0}, {"type": "message_stop"}]
    return b"".join(sse(e, e["type"]) for e in events)


def chat_arguments(events: list[Any]) -> str:
    return "".join(
        call["function"].get("arguments", "")
        for e in events
        for choice in e.get("choices", [])
        for call in choice.get("delta", {}).get("tool_calls", [])
    )


def anthropic_arguments(events: list[Any]) -> str:
    return "".join(
        e["delta"]["partial_json"] for e in events if e.get("type") == "content_block_delta"
    )


@pytest.mark.parametrize("profile", PROFILES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=documents, cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_json_gets_the_same_redactions_on_every_path(
    profile: str, doc: dict[str, Any], cuts: list[int]
) -> None:
    text = json.dumps(doc)
    buffered = redact_json_text(text, text_redactor(profile))
    expected = json.loads(buffered.text)
    expected_counts = dict(buffered.counts)

    for body, arguments in (
        (chat_tool_call(splits(text, cuts)), chat_arguments),
        (anthropic_tool_call(splits(text, cuts)), anthropic_arguments),
    ):
        events, counts, _ = stream(profile, body)
        assert json.loads(arguments(events)) == expected
        assert counts == expected_counts

    events, counts, _ = stream(profile, sse({"type": "custom.status", "config": doc}))
    assert events[0]["config"] == expected
    assert counts == expected_counts

    ws = redact_body(text.encode(), None, text_redactor(profile), WS_TEXT)
    assert json.loads(ws.body) == expected
    assert dict(ws.counts) == expected_counts


@pytest.mark.parametrize("profile", PROFILES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=prose, cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_prose_gets_the_same_redactions_and_decision_streamed_and_buffered(
    profile: str, text: str, cuts: list[int]
) -> None:
    buffered = redact_json_text(json.dumps({"content": text}), text_redactor(profile))
    expected = json.loads(buffered.text)["content"]
    chunks = [
        {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
        for piece in splits(text, cuts)
    ]
    body = b"".join(sse(c) for c in chunks) + b"data: [DONE]\n\n"
    events, counts, released = stream(profile, body)
    streamed = "".join(c["delta"].get("content", "") for e in events for c in e["choices"])
    assert streamed == expected == released
    assert Counter(counts) == Counter(buffered.counts)

    # The policy: the buffered body's decision, and the stream's scanner over the released text.
    decided = POLICY.decide(
        BodyViews.of(json.dumps({"content": expected}).encode(), "application/json")
    )
    scanner = POLICY.stream()
    cut = any(scanner.feed(piece) for piece in splits(released, cuts))
    assert (decided is not None) == cut == (PIPE in expected)
