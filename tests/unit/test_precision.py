"""False-positive classes of issue 15 (precision): each class keeps its positives and leaves its
clean cases untouched. The clean cases are taken from real package sources, lock files and API
specs (see bench/clean_corpus.yaml); the positives are fake credentials."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sluicegate.redaction.json_redact import redact_json_text
from sluicegate.redaction.redactor import Redactor
from sluicegate.redaction.rules import Direction, load_rule_pack

RULES = Path(__file__).resolve().parents[2] / "rules"
PROFILES = ("default", "strict", "pii", "strict-pii")
REDACTORS = {p: Redactor(load_rule_pack([RULES], p), Direction.REQUEST) for p in PROFILES}
DEFAULT = REDACTORS["default"]


def unchanged_json(document: object, profile: str = "default") -> bool:
    text = json.dumps(document)
    result = redact_json_text(text, REDACTORS[profile])
    return not result.changed and result.text is text


# --- 1, 2: key rules: strings only, and only credential-looking ones -------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_key_rules_never_touch_schemas_or_tool_definitions(profile: str) -> None:
    login_tool = {
        "type": "function",
        "function": {
            "name": "login",
            "parameters": {
                "type": "object",
                "properties": {
                    "username": {"type": "string"},
                    "password": {"type": "string", "description": "The user's password."},
                    "api_key": {"type": "string", "format": "password", "writeOnly": True},
                    "token": {"type": "integer", "minimum": 0},
                    "cookie": {"$ref": "#/components/schemas/Cookie"},
                },
            },
        },
    }
    assert unchanged_json({"tools": [login_tool], "token": 42, "secret": True}, profile)


@pytest.mark.parametrize("profile", PROFILES)
def test_key_rules_leave_dependency_maps_paginators_and_docs(profile: str) -> None:
    lock = {"node_modules/express": {"version": "4.21.2", "dependencies": {
        "cookie": "0.7.1", "cookie-signature": "1.0.6", "cookies": "~0.9.1"}}}  # fmt: skip
    paginator = {"pagination": {"ListSecrets": {
        "input_token": "NextToken", "output_token": "NextToken", "limit_key": "MaxResults"}},
        "token": "nextPageToken", "secret": "SecretString"}  # fmt: skip
    discovery = {"parameters": {"password": "The password to use to connect to a resource.",
                                "credentials": "https://example.com/docs/credentials",
                                "secret": "https://github.githubassets.com/unicode/3299.png?v8",
                                "api_key": "XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX-us2"}}  # fmt: skip
    for document in (lock, paginator, discovery):
        assert unchanged_json(document, profile)


def test_key_rules_do_not_apply_in_documented_examples() -> None:
    spec = {"responses": {"201": {"content": {"application/json": {"examples": {"default": {
        "value": {"client_secret": "1726be1638095a19edd134c77bde3aa2ece1e5d8"}}}}}}}}  # fmt: skip
    botocore = {"version": "1.0", "examples": {"ChangePassword": [{"input": {
        "NewPassword": "]35d/{pB9Fo9wJ", "OldPassword": "3s0K_;xh4~8XXI"}}]}}  # fmt: skip
    assert unchanged_json(spec) and unchanged_json(botocore)


def test_key_rules_still_mask_credential_strings() -> None:
    document = {
        "password": "Tr0ub4dor&3",
        "db": {"passphrase": "correct horse battery staple", "dsn": "postgres://a:b3@h/d"},
        "client_secret": "9f8e7d6c5b4a39281706f5e4",
        "token": ["t0k3n-a", 7],
        "headers": {"Cookie": "session=abc123; theme=dark"},
    }
    result = redact_json_text(json.dumps(document), DEFAULT)
    data = json.loads(result.text)
    assert "Tr0ub4dor" not in result.text and "b3@" not in result.text
    assert data["password"] == "[REDACTED:key-password]"
    assert data["db"]["passphrase"] == "[REDACTED:key-password]"
    assert data["token"] == ["[REDACTED:key-token]", 7]
    assert data["headers"]["Cookie"] == "[REDACTED:key-authorization]"
    assert result.counts["key-secret"] == 1


def test_text_rules_still_run_where_key_rules_do_not() -> None:
    gh = "ghp_C3J27XDCG2LmlZGEONYlgCtjfIZ4SOcMz9CP"
    document = {"examples": {"x": {"token": gh}}, "cookie": f"see the token {gh} in the docs"}
    result = redact_json_text(json.dumps(document), DEFAULT)
    assert "ghp_" not in result.text and result.counts == {"github-token": 2}
