"""The default rule pack in rules/: every rule's own examples, coverage, stream friendliness."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sluicegate.redaction.redactor import (
    OVERFLOW_RULE_ID,
    Redactor,
    check_key_rule_examples,
    check_rule_examples,
)
from sluicegate.redaction.rules import Direction, RulePack, load_rule_pack, load_rule_set

RULES = Path(__file__).resolve().parents[2] / "rules"
RULE_SET = load_rule_set([RULES])

PROSE = """\
Sure! Here is how the gateway works. A request arrives with a token in the Authorization
header; the proxy verifies it, then injects the upstream key and forwards the call. If the
model answers with a secret, it is redacted before the agent sees it. You can set the
password policy in config.yaml: passwords must be rotated every 90 days, and the key
manager keeps 3 versions. Note: a 404 means the route is missing, 429 means slow down.
- Step 1: run `make test` and check that all 1337 tests pass.
- Step 2: deploy to staging, then to production at 10:30 on 2024-05-01.
The API returns {"status": "ok", "count": 12, "id": "3fa85f64-5717-4562-b3fc-2c963f66afa6"}.
Use `max_tokens=1024` and `temperature=0.2`; the secret sauce is good caching, really.
"""
CODE = """\
def load(config_path: str, *, retries: int = 3) -> dict[str, str]:
    token = os.environ.get("API_TOKEN")  # never hard-code it
    password = getpass.getpass("password: ")
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    for attempt in range(retries):
        response = session.get(f"https://api.example.com/v1/items?page={attempt}", timeout=10)
        if response.status_code == 200:
            return {"key": response.headers.get("etag", ""), "value": response.text}
    raise RuntimeError(f"failed after {retries} attempts: {response.status_code}")

const client = new Client({ apiKey: process.env.OPENAI_API_KEY, maxRetries: 2 });
SELECT id, email, created_at FROM users WHERE id = $1 AND deleted_at IS NULL;
"""


def rule_ids(rules: tuple) -> list[str]:
    return [rule.id for rule in rules]


@pytest.mark.parametrize("rule", RULE_SET.rules, ids=rule_ids(RULE_SET.rules))
def test_rule_passes_its_own_examples(rule) -> None:
    assert [str(f) for f in check_rule_examples(rule)] == []


@pytest.mark.parametrize("rule", RULE_SET.key_rules, ids=rule_ids(RULE_SET.key_rules))
def test_key_rule_passes_its_own_examples(rule) -> None:
    assert [str(f) for f in check_key_rule_examples(rule)] == []


def test_default_pack_covers_at_least_60_credential_rules_and_no_pii() -> None:
    default = load_rule_pack([RULES], "default")
    assert len(default.rules) >= 60
    pii = {"credit-card-number", "iban", "us-ssn", "email-address"}
    assert pii.isdisjoint(rule_ids(default.rules))
    assert pii <= set(rule_ids(load_rule_pack([RULES], "pii").rules))
    strict = set(rule_ids(load_rule_pack([RULES], "strict").rules))
    assert set(rule_ids(default.rules)) < strict and pii.isdisjoint(strict)


def test_every_rule_is_described_and_in_a_known_profile() -> None:
    known = {"default", "strict", "pii", "strict-pii"}
    for rule in (*RULE_SET.rules, *RULE_SET.key_rules):
        assert len(rule.description) > 20, rule.id
        assert rule.profiles <= known, rule.id
        assert "strict-pii" in rule.profiles, f"{rule.id}: the widest profile has every rule"


def stream_tokens(redactor: Redactor, text: str) -> tuple[str, float, int, dict[str, int]]:
    """Stream `text` as LLM-like tokens: (output, share of feeds holding, longest hold, counts)."""
    tokens = re.findall(r"\s*\w{1,6}|\s*[^\w\s]+|\s+", text)
    stream = redactor.stream(max_hold=256)
    held = largest = 0
    out = []
    for token in tokens:
        out.append(stream.feed(token))
        held += stream.held > 0
        largest = max(largest, stream.held)
    out.append(stream.flush())
    return "".join(out), held / len(tokens), largest, stream.counts


# Share of feeds that may hold something back. PII rules must hold each word until the next
# one shows it is not the local part of an e-mail address, and numbers until they end. In
# `default`, Mailchimp keys start with plain hex (a hex word or number is held
# until the next token) and padded URL-safe base64 keys start at a quote opening a value (a
# JSON string in an answer is held until it closes): this prose, dense in numbers and JSON,
# holds ~21 % of its tokens, each for one more token at most.
HOLD_LIMITS = [("default", 0.25), ("strict", 0.3), ("pii", 1.0), ("strict-pii", 1.0)]


@pytest.mark.parametrize(("profile", "limit"), HOLD_LIMITS)
def test_clean_prose_streams_token_by_token(profile: str, limit: float) -> None:
    """Prose is released as it comes, at most a word late."""
    redactor = Redactor(load_rule_pack([RULES], profile), Direction.RESPONSE, decode=False)
    output, hold_rate, largest, counts = stream_tokens(redactor, PROSE * 3)
    assert output == redactor.redact_text(PROSE * 3).text
    assert OVERFLOW_RULE_ID not in counts
    assert hold_rate < limit
    assert largest < 64


@pytest.mark.parametrize("profile", ["default", "strict-pii"])
def test_code_streams_without_overflow(profile: str) -> None:
    """`password = getpass(...)` is held until the value is known, never past max_hold."""
    redactor = Redactor(load_rule_pack([RULES], profile), Direction.RESPONSE, decode=False)
    output, _, largest, counts = stream_tokens(redactor, CODE * 3)
    assert output == redactor.redact_text(CODE * 3).text
    assert OVERFLOW_RULE_ID not in counts
    assert largest < 120


def test_each_rule_alone_streams_prose_and_code_without_overflow() -> None:
    """A rule whose partial matches never resolve would hold text until max_hold."""
    text = PROSE + CODE
    for rule in RULE_SET.rules:
        redactor = Redactor(RulePack((rule,), (), "probe"), min(rule.directions))
        stream = redactor.stream(max_hold=300)
        for start in range(0, len(text), 3):
            stream.feed(text[start : start + 3])
        stream.flush()
        assert OVERFLOW_RULE_ID not in stream.counts, rule.id


def test_specific_formats_win_over_generic_context_rules() -> None:
    redactor = Redactor(load_rule_pack([RULES]), Direction.REQUEST)
    text = "export GITHUB_TOKEN=ghp_C3J27XDCG2LmlZGEONYlgCtjfIZ4SOcMz9CP"
    assert redactor.redact_text(text).text == "export GITHUB_TOKEN=[REDACTED:github-token]"
