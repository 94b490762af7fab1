"""Whole-text redaction: tags, merging, literals, idempotence, prefilter = full scan."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sluicegate.redaction.redactor import (
    KeyedTagger,
    LiteralSecret,
    Redactor,
    check_rule_examples,
    plain_tag,
)
from sluicegate.redaction.rules import Direction, load_rule_pack, load_rule_set

RULES = Path(__file__).resolve().parents[2] / "rules"
PACK = load_rule_pack([RULES], "strict-pii")
REDACTOR = Redactor(PACK, Direction.REQUEST)
GH = "ghp_C3J27XDCG2LmlZGEONYlgCtjfIZ4SOcMz9CP"
EXAMPLES = [p.text for rule in load_rule_set([RULES]).rules for p in rule.positives]
PROSE = st.sampled_from(
    ["", " ", "\n", "The token is ", "password = ", "see: ", "export X=", '{"key": "', ". And "]
)


def pack_from(tmp_path: Path, rules: str):
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent(rules))
    return load_rule_pack([path])


OVERLAP_RULES = """
rules:
  - id: aaa-rule
    description: matches abc-123
    pattern: 'abc-\\d{3}'
    profiles: [default]
    examples: {positive: ['abc-123']}
  - id: bbb-rule
    description: matches 123-xyz
    pattern: '\\d{3}-xyz'
    profiles: [default]
    examples: {positive: ['123-xyz']}
  - id: ccc-rule
    description: matches abc-1234 (same start, longer)
    pattern: 'abc-\\d{4}'
    profiles: [default]
    examples: {positive: ['abc-1234']}
  - id: ddd-rule
    description: matches abc-123 again (same span, later in the pack)
    pattern: 'abc-\\d{3}'
    direction: response
    profiles: [default]
    examples: {positive: ['abc-123']}
"""


def test_redacts_with_rule_tag_and_counts() -> None:
    result = REDACTOR.redact_text(f"token {GH} and {GH}.")
    assert result.text == "token [REDACTED:github-token] and [REDACTED:github-token]."
    assert result.counts == {"github-token": 2}
    assert result.changed


def test_only_the_group_is_masked() -> None:
    result = REDACTOR.redact_text("DATABASE_URL=postgres://app:s3cr3t-Pa55@db:5432/app")
    assert result.text == "DATABASE_URL=postgres://app:[REDACTED:url-credentials]@db:5432/app"


def test_clean_text_is_returned_unchanged() -> None:
    text = "Nothing to see here: just prose, 42 numbers and code like x = y + 1."
    result = REDACTOR.redact_text(text)
    assert result.text is text or result.text == text
    assert result.counts == {} and not result.changed


def test_overlapping_findings_merge_into_one_tag_chosen_deterministically(
    tmp_path: Path,
) -> None:
    pack = pack_from(tmp_path, OVERLAP_RULES)
    request = Redactor(pack, Direction.REQUEST)
    # Overlap: the earliest finding names the merged span.
    assert request.redact_text("x abc-123-xyz y").text == "x [REDACTED:aaa-rule] y"
    # Same start: the longest finding wins.
    assert request.redact_text("abc-1234").text == "[REDACTED:ccc-rule]"
    # Same span: pack order wins (ddd-rule only applies to responses).
    response = Redactor(pack, Direction.RESPONSE)
    assert response.redact_text("abc-123").text == "[REDACTED:aaa-rule]"
    assert response.redact_text("abc-123").counts == {"aaa-rule": 1}


def test_adjacent_findings_are_not_merged(tmp_path: Path) -> None:
    rules = """
    rules:
      - id: foo-rule
        description: foo and a digit
        pattern: 'foo\\d'
        profiles: [default]
        examples: {positive: [foo1]}
      - id: bar-rule
        description: bar and a digit
        pattern: 'bar\\d'
        profiles: [default]
        examples: {positive: [bar1]}
    """
    redactor = Redactor(pack_from(tmp_path, rules), Direction.REQUEST)
    assert redactor.redact_text("foo1bar2").text == "[REDACTED:foo-rule][REDACTED:bar-rule]"


def test_keyed_tags_are_stable_per_secret_and_key() -> None:
    tagger = KeyedTagger(b"k" * 32)
    redactor = Redactor(PACK, Direction.REQUEST, tagger=tagger)
    other = "ghp_" + "Z" * 36
    text = redactor.redact_text(f"{GH} {GH} {other}").text
    tags = re.findall(r"\[REDACTED:github-token:([0-9a-f]{8})\]", text)
    assert len(tags) == 3 and tags[0] == tags[1] != tags[2]
    assert GH[:10] not in text
    other_key = Redactor(PACK, Direction.REQUEST, tagger=KeyedTagger(b"q" * 32))
    assert other_key.redact_text(GH).text != redactor.redact_text(GH).text
    assert plain_tag("x-rule", GH) == "[REDACTED:x-rule]"
    with pytest.raises(ValueError, match="16 bytes") as info:
        KeyedTagger(b"short")
    assert "short" not in str(info.value)


def test_existing_tags_are_never_redacted_again() -> None:
    for text in [
        "password = [REDACTED:generic-password]",
        "Authorization: Bearer [REDACTED:jwt:0a1b2c3d]",
        '{"token": "[REDACTED:key-token]"}',
    ]:
        result = REDACTOR.redact_text(text)
        assert result.text == text and result.counts == {}


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(EXAMPLES), PROSE), max_size=4))
@example(["pay to GB82WEST12345698765432", "AGE-SECRET-KEY-1PS7GV2SFZ8JUR9JSNCSZPJYR3JK7DX"])
@example(
    [
        "-----BEGIN OPENSSH PRIVATE KEY-----\npGFj1Nz9UqBtLk34XtsvO/K0iEvtE2P4qKF/GyVapQ/j3lWFvj",
        "password = ",
        "DB_PASSWORD=Sup3r-Secret!",
    ]
)
def test_redaction_is_idempotent(parts: list[str]) -> None:
    once = REDACTOR.redact_text("".join(parts))
    twice = REDACTOR.redact_text(once.text)
    assert twice.text == once.text and twice.counts == {}


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(EXAMPLES), PROSE, st.text(max_size=12)), max_size=4))
def test_keyword_prefilter_finds_what_a_full_scan_finds(parts: list[str]) -> None:
    text = "".join(parts)
    assert REDACTOR._findings(text) == REDACTOR._findings(text, prefilter=False)


# Keys, separators and values as context rules see them, to check their keyword windows
# and follows (`followed_by`) against a full scan in every combination.
KEYS = st.sampled_from(
    ["password", "DB_PASS", "pwd", "passphrase", "client_secret", "secrete", "AUTH_TOKEN",
     "token_value", "token_2", "credentials2", "api_key", "apiKey", "HEROKU_KEY", "AccountKey",
     "storage_key", "aws_secret_access_key", "x-api-key", "Authorization", "auth",
     "MessageBirdToken", "SONAR_TOKEN", "okta_api_token", "spring.datasource.password",
     "CLOUDFLARE_KEY", "sumo_access_id", "<password>", '"auth"', "--token", "-ClientSecret"]
)  # fmt: skip
SEPARATORS = st.sampled_from(
    ["=", " = ", ":", ": ", " := ", "==", " !== ", "=>", ":::=", '": ', "'] = ", "\t=\t", " ",
     ", ", ">", "  ", '", "', "\t"]
)  # fmt: skip
VALUES = st.sampled_from(
    ['"S3cr3t-V4lue!"', "'abc def ghi';", "Xy7.vQ2-pL9_zR4", "correct horse battery staple",
     "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "00abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN",
     "Bearer cfcabd11c7ed9a41b1a3e063c32d5114", '"YnJvd3Nlcjo="', "Xk2pQ9vR4tL7mN1bC8dF3gH6j",
     "${X}", "</password>"]
)  # fmt: skip
AROUND = st.sampled_from(["", " ", "\n", "(", '("', "<", '{"', "export ", ";", ")", "\n  "])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(AROUND, KEYS, SEPARATORS, VALUES, AROUND), min_size=1, max_size=3))
def test_context_rules_find_what_a_full_scan_finds(
    parts: list[tuple[str, str, str, str, str]],
) -> None:
    text = "".join("".join(part) for part in parts)
    assert REDACTOR._findings(text) == REDACTOR._findings(text, prefilter=False)


FOLLOWED_RULE = """
rules:
  - id: demo-assignment
    description: value of demo_key
    pattern: '=(?<=demo_key[ ]{0,3}=)[ ]*(?P<v>[a-z0-9]{6,})'
    group: v
    keywords: [demo_key]
    followed_by: '%s'
    window: [1, 0]
    profiles: [default]
    examples: {positive: [{text: 'demo_key = abc123', secret: abc123}]}
"""


def test_followed_by_windows_start_where_the_follow_ends(tmp_path: Path) -> None:
    pack = pack_from(tmp_path, FOLLOWED_RULE % "[ ]*=")
    redactor = Redactor(pack, Direction.REQUEST)
    text = "demo_key = abc123, DEMO_KEY= zzz999, demo_key: abc123 = qqq999"
    assert redactor.redact_text(text).text == (
        "demo_key = [REDACTED:demo-assignment], DEMO_KEY= zzz999, demo_key: abc123 = qqq999"
    )
    assert check_rule_examples(pack.rules[0]) == []
    # A follow that does not reach the match start is caught by the examples check.
    (wrong,) = pack_from(tmp_path, FOLLOWED_RULE % "[ ]*=[ ]*").rules
    problems = [failure.problem for failure in check_rule_examples(wrong)]
    assert any("outside the windows" in problem for problem in problems)


def test_text_whose_lowercase_changes_length_is_still_scanned() -> None:
    # "İ".lower() is two characters: keyword offsets would shift, so the prefilter is off.
    text = f"İstanbul İ token={GH}"
    assert "İ".lower() != "i" and len(text.lower()) != len(text)
    assert REDACTOR.redact_text(text).text == "İstanbul İ token=[REDACTED:github-token]"


def test_literal_secrets_are_masked_with_their_rule_id() -> None:
    secret = "corp-internal-key-9f8e7d6c"
    redactor = REDACTOR.with_literals([LiteralSecret("injected-credential", secret)])
    result = redactor.redact_text(f"echo: {secret}, again {secret}")
    assert result.text == (
        "echo: [REDACTED:injected-credential], again [REDACTED:injected-credential]"
    )
    assert REDACTOR.redact_text(secret).text == secret  # the original redactor is unchanged


def test_literal_wins_over_a_rule_on_the_same_span() -> None:
    redactor = REDACTOR.with_literals([LiteralSecret("injected-credential", GH)])
    assert redactor.redact_text(GH).text == "[REDACTED:injected-credential]"


def test_with_literals_keeps_earlier_literals_and_prefers_longest() -> None:
    first = REDACTOR.with_literals([LiteralSecret("one", "alpha-secret-1")])
    both = first.with_literals([LiteralSecret("two", "alpha-secret-12345")])
    text = "alpha-secret-1 alpha-secret-12345"
    assert both.redact_text(text).text == "[REDACTED:one] [REDACTED:two]"


def test_direction_selects_rules(tmp_path: Path) -> None:
    pack = pack_from(tmp_path, OVERLAP_RULES)
    assert Redactor(pack, Direction.REQUEST).redact_text("abc-123").counts == {"aaa-rule": 1}
    assert Redactor(pack, "response").direction is Direction.RESPONSE
