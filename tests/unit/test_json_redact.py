"""JSON-aware redaction: decoded strings, key rules, duplicates, nested JSON, fallbacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluicegate.redaction.json_redact import MAX_DEPTH, JsonRedactionError, redact_json_text
from sluicegate.redaction.redactor import Redactor
from sluicegate.redaction.rules import Direction, load_rule_pack

RULES = Path(__file__).resolve().parents[2] / "rules"
REDACTOR = Redactor(load_rule_pack([RULES]), Direction.REQUEST)
GH = "ghp_C3J27XDCG2LmlZGEONYlgCtjfIZ4SOcMz9CP"


def test_unchanged_document_is_returned_byte_for_byte() -> None:
    text = '{ "model" : "x",\n  "n": 1.50, "big": 12345678901234567890, "e": 1e400 }'
    result = redact_json_text(text, REDACTOR)
    assert result.text is text and not result.changed and result.parsed


def test_escapes_cannot_hide_a_secret() -> None:
    hidden = GH.replace("p", "\\u0070").replace("_", "\\u005f")
    text = '{"content": "use ' + hidden + ' here", "url": "https:\\/\\/x.example\\/a"}'
    result = redact_json_text(text, REDACTOR)
    assert json.loads(result.text) == {
        "content": "use [REDACTED:github-token] here",
        "url": "https://x.example/a",
    }
    assert result.counts == {"github-token": 1}


def test_key_rules_mask_string_values_at_any_depth_and_keep_other_types() -> None:
    text = json.dumps(
        {
            "a": [{"b": {"password": "x9-Hunter2", "api_key": 42, "token": ["t0k3n-a", 7]}}],
            "headers": {"Authorization": "Bearer abc", "Accept": "*/*"},
            "max_tokens": 256,
            "token_type": "bearer",
            "client_secret": None,
            "secret": {"value": "sk9-f00", "rotation": {"days": 30}},
        }
    )
    result = redact_json_text(text, REDACTOR)
    data = json.loads(result.text)
    assert data["a"][0]["b"] == {
        "password": "[REDACTED:key-password]",
        "api_key": 42,  # a key rule only ever replaces a string
        "token": ["[REDACTED:key-token]", 7],
    }
    assert data["headers"] == {"Authorization": "[REDACTED:key-authorization]", "Accept": "*/*"}
    assert data["max_tokens"] == 256 and data["token_type"] == "bearer"
    assert data["client_secret"] is None  # nothing to hide
    assert data["secret"] == {"value": "sk9-f00", "rotation": {"days": 30}}  # walked, not masked
    assert result.counts == {"key-password": 1, "key-token": 1, "key-authorization": 1}


def test_key_rules_leave_schemas_versions_and_descriptions_alone() -> None:
    schema = {
        "type": "function",
        "function": {
            "name": "login",
            "parameters": {
                "type": "object",
                "properties": {
                    "password": {"type": "string", "description": "The user's password."},
                    "token": {"type": "string", "format": "password"},
                    "credentials": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["password"],
            },
        },
    }
    lock = {"packages": {"node_modules/express": {"dependencies": {"cookie": "0.7.1"}}},
            "dependencies": {"cookie": "~0.7.1", "cookies": "^0.9.0"}}  # fmt: skip
    paginator = {"ListSecrets": {"input_token": "NextToken", "output_token": "NextToken",
                                 "token": "NextToken", "secret": "SecretString"}}  # fmt: skip
    for document in (schema, lock, paginator):
        text = json.dumps(document)
        result = redact_json_text(text, REDACTOR)
        assert not result.changed and result.text is text


def test_duplicate_keys_are_all_scanned_and_kept() -> None:
    text = '{"password": "one", "note": "x", "password": "two", "t": "' + GH + '", "t": "ok"}'
    result = redact_json_text(text, REDACTOR)
    assert result.text == (
        '{"password":"[REDACTED:key-password]","note":"x",'
        '"password":"[REDACTED:key-password]","t":"[REDACTED:github-token]","t":"ok"}'
    )


def test_json_nested_in_strings_is_redacted_recursively() -> None:
    arguments = json.dumps({"command": f"export GITHUB_TOKEN={GH}", "db": {"password": "x9"}})
    text = json.dumps({"tool_calls": [{"function": {"name": "sh", "arguments": arguments}}]})
    result = redact_json_text(text, REDACTOR)
    inner = json.loads(json.loads(result.text)["tool_calls"][0]["function"]["arguments"])
    assert inner == {
        "command": "export GITHUB_TOKEN=[REDACTED:github-token]",
        "db": {"password": "[REDACTED:key-password]"},
    }


def test_keys_themselves_are_redacted() -> None:
    result = redact_json_text(json.dumps({GH: 1}), REDACTOR)
    assert json.loads(result.text) == {"[REDACTED:github-token]": 1}


def test_numbers_keep_their_text_when_reserialized() -> None:
    text = '{"a": 1.10, "b": -0.0, "c": 1E+2, "d": 1e400, "password": "p1"}'
    result = redact_json_text(text, REDACTOR)
    assert (
        result.text == '{"a":1.10,"b":-0.0,"c":1E+2,"d":1e400,"password":"[REDACTED:key-password]"}'
    )


def test_invalid_json_falls_back_to_text() -> None:
    text = '{"truncated": "' + GH
    result = redact_json_text(text, REDACTOR)
    assert not result.parsed and result.text == '{"truncated": "[REDACTED:github-token]'


def test_too_deep_documents_are_refused() -> None:
    text = "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5)
    with pytest.raises(JsonRedactionError) as info:
        redact_json_text(text, REDACTOR)
    assert info.value.code == "json_too_deep"


def test_redacting_twice_changes_nothing_more() -> None:
    text = json.dumps({"password": "x", "m": GH, "args": json.dumps({"api_key": "k"})})
    once = redact_json_text(text, REDACTOR)
    twice = redact_json_text(once.text, REDACTOR)
    assert twice.text == once.text and twice.counts == {}


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.just(GH),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["a", "password", "note", "key"]), children, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=100, deadline=None)
@given(JSON_VALUES)
def test_output_is_valid_json_without_the_secret(value: object) -> None:
    text = json.dumps(value)
    result = redact_json_text(text, REDACTOR)
    assert result.parsed
    json.loads(result.text)
    assert GH not in result.text


def test_lone_surrogate_escapes_survive_reserialization() -> None:
    # Valid JSON (RFC 8259 grammar; Python's json.dumps writes it for lone surrogates): once a
    # secret forces re-serialization, the output must still encode as UTF-8 and mean the same.
    text = '{"a": "\\ud800 ' + GH + '", "b": "\\udc00x"}'
    result = redact_json_text(text, REDACTOR)
    body = result.text.encode("utf-8")
    assert json.loads(body) == {"a": "\ud800 [REDACTED:github-token]", "b": "\udc00x"}
    assert GH.encode() not in body
