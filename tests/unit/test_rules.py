"""Rule files: strict loading, errors with key paths, profile selection, pattern helpers."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from sluicegate.redaction.rules import (
    Direction,
    RuleFileError,
    RuleSelectionError,
    first_chars,
    harden_lookbehinds,
    load_rule_pack,
    load_rule_set,
)

GOOD_RULE = """
  - id: demo-token
    description: demo
    pattern: '(?<![\\w-])demo_[a-z0-9]{8}'
    keywords: [demo_]
    profiles: [default]
    examples:
      positive: ['x demo_abcd1234 y']
      negative: ['demo_short']
"""


def write(tmp_path: Path, text: str, name: str = "rules.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load_error(tmp_path: Path, text: str) -> RuleFileError:
    path = write(tmp_path, text)
    with pytest.raises(RuleFileError) as info:
        load_rule_set([path])
    assert info.value.file == path
    return info.value


def test_loads_a_valid_rule(tmp_path: Path) -> None:
    rule_set = load_rule_set([write(tmp_path, "rules:" + GOOD_RULE)])
    (rule,) = rule_set.rules
    assert rule.id == "demo-token"
    assert rule.keywords == ("demo_",)
    assert rule.followed_by is None
    assert rule.directions == frozenset(Direction)
    assert rule.pattern.search("x demo_abcd1234") is not None
    assert rule.positives[0].text == "x demo_abcd1234 y"


@pytest.mark.parametrize(
    ("replace", "by", "key_path", "message"),
    [
        (
            "    profiles: [default]",
            "    profiles: [default]\n    colour: red",
            "rules[0]",
            "colour",
        ),
        ("'(?<![\\w-])demo_[a-z0-9]{8}'", "'demo_(['", "rules[0].pattern", "invalid pattern"),
        ("'(?<![\\w-])demo_[a-z0-9]{8}'", "'(a)\\1'", "rules[0].pattern", "backreference"),
        ("'(?<![\\w-])demo_[a-z0-9]{8}'", "'x?'", "rules[0].pattern", "empty string"),
        ("id: demo-token", "id: Demo_Token", "rules[0].id", "kebab-case"),
        ("    keywords: [demo_]", "    keywords: demo_", "rules[0].keywords", "list"),
        ("    profiles: [default]", "    profiles: []", "rules[0].profiles", "at least one"),
        (
            "    keywords: [demo_]",
            "    keywords: [demo_]\n    group: 3",
            "rules[0].group",
            "no group",
        ),
        (
            "    keywords: [demo_]",
            "    keywords: [demo_]\n    direction: up",
            "rules[0].direction",
            "",
        ),
        ("    keywords: [demo_]", "    keywords: [demo_]\n    window: [1]", "rules[0].window", ""),
        ("    keywords: [demo_]", "    window: [0, 4]", "rules[0].window", "needs keywords"),
        (
            "    keywords: [demo_]",
            "    followed_by: '[a-z]'",
            "rules[0].followed_by",
            "needs keywords",
        ),
        (
            "    keywords: [demo_]",
            "    keywords: [demo_]\n    followed_by: '[a-z'",
            "rules[0].followed_by",
            "invalid pattern",
        ),
        (
            "    keywords: [demo_]",
            "    keywords: [demo_]\n    followed_by: 'x(?i)y'",
            "rules[0].followed_by",
            "invalid pattern",
        ),
        (
            "    keywords: [demo_]",
            "    keywords: [demo_]\n    followed_by: '(?P<n>x)'",
            "rules[0].followed_by",
            "named groups",
        ),
        (
            "    keywords: [demo_]",
            "    keywords: [demo_]\n    validators: [nope]",
            "rules[0].validators[0]",
            "unknown validator",
        ),
        (
            "    keywords: [demo_]",
            "    keywords: [demo_]\n    validators: [{min_entropy: high}]",
            "rules[0].validators[0]",
            "float",
        ),
        (
            "      positive: ['x demo_abcd1234 y']",
            "      positive: []",
            "rules[0].examples.positive",
            "non-empty",
        ),
        (
            "      positive: ['x demo_abcd1234 y']",
            "      positive: [{text: 'abc', secret: 'zzz'}]",
            "rules[0].examples.positive[0].secret",
            "substring",
        ),
    ],
)
def test_rule_errors_name_the_key_path(
    tmp_path: Path, replace: str, by: str, key_path: str, message: str
) -> None:
    text = "rules:" + GOOD_RULE
    assert replace in text
    error = load_error(tmp_path, text.replace(replace, by))
    assert error.key_path == key_path
    assert message in error.message
    assert key_path in str(error)


def test_unknown_top_level_key_and_bad_yaml(tmp_path: Path) -> None:
    assert "unknown key" in load_error(tmp_path, "rulez: []").message
    assert "invalid YAML at line 3" in load_error(tmp_path, "rules:\n  - id: [unclosed\n").message


def test_duplicate_ids_across_files(tmp_path: Path) -> None:
    write(tmp_path, "rules:" + GOOD_RULE, "a.yaml")
    write(tmp_path, "rules:" + GOOD_RULE, "b.yaml")
    with pytest.raises(RuleFileError) as info:
        load_rule_set([tmp_path])
    assert info.value.file.name == "b.yaml"
    assert info.value.key_path == "rules[0].id"
    assert "duplicate id 'demo-token'" in info.value.message


def test_missing_path_and_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(RuleFileError, match="no such file"):
        load_rule_set([tmp_path / "missing.yaml"])
    with pytest.raises(RuleFileError, match="no rule files"):
        load_rule_set([tmp_path])


def test_key_rules_are_parsed_and_matched_whole(tmp_path: Path) -> None:
    text = """
    key_rules:
      - id: key-pin
        description: PIN fields
        key: '(?:.*_)?pin'
        profiles: [default]
        examples: {positive: [pin, card_pin], negative: [spinner]}
    """
    (rule,) = load_rule_set([write(tmp_path, text)]).key_rules
    assert rule.matches("PIN") and rule.matches("card_pin")
    assert not rule.matches("spinner") and not rule.matches("pinned")
    assert rule.accepts_value("1234") and not rule.accepts_value("")  # no value_validators


def test_key_rule_value_validators_and_their_examples(tmp_path: Path) -> None:
    text = """
    key_rules:
      - id: key-pin
        description: PIN fields
        key: 'pin'
        value_validators: [credential_field_token]
        profiles: [default]
        examples: {positive: [pin]}
        value_examples: {positive: ['4711'], negative: [NextPin, '~1.2.0']}
    """
    (rule,) = load_rule_set([write(tmp_path, text)]).key_rules
    assert rule.accepts_value("4711") and not rule.accepts_value("NextPin")
    assert (rule.value_positives, rule.value_negatives) == (("4711",), ("NextPin", "~1.2.0"))
    no_examples = "\n".join(line for line in text.split("\n") if "value_examples" not in line)
    with pytest.raises(RuleFileError, match="value_validators need positive value examples"):
        load_rule_set([write(tmp_path, no_examples)])
    unknown = text.replace("credential_field_token", "no_such_check")
    with pytest.raises(RuleFileError, match=r"value_validators\[0\]: unknown validator"):
        load_rule_set([write(tmp_path, unknown)])


def test_profiles_enable_and_disable(tmp_path: Path) -> None:
    strict_rule = GOOD_RULE.replace("demo-token", "demo-strict").replace("[default]", "[strict]")
    path = write(tmp_path, "rules:" + GOOD_RULE + strict_rule)
    assert [r.id for r in load_rule_pack([path]).rules] == ["demo-token"]
    assert [r.id for r in load_rule_pack([path], "strict").rules] == ["demo-strict"]
    both = load_rule_pack([path], enable=["demo-strict"])
    assert [r.id for r in both.rules] == ["demo-token", "demo-strict"]
    assert load_rule_pack([path], disable=["demo-token"]).rules == ()
    with pytest.raises(RuleSelectionError, match="unknown rule id"):
        load_rule_pack([path], enable=["nope"])
    with pytest.raises(RuleSelectionError, match="unknown profile 'stirct'"):
        load_rule_pack([path], "stirct")


def test_direction_filters_rules(tmp_path: Path) -> None:
    rule = GOOD_RULE.replace(
        "    keywords: [demo_]", "    keywords: [demo_]\n    direction: response"
    )
    pack = load_rule_pack([write(tmp_path, "rules:" + rule)])
    assert pack.rules_for(Direction.REQUEST) == ()
    assert len(pack.rules_for(Direction.RESPONSE)) == 1


def test_lowercase_and_exact_keywords_are_kept_as_written(tmp_path: Path) -> None:
    rule = GOOD_RULE.replace("keywords: [demo_]", "keywords: [demo_, DEMO]")
    (loaded,) = load_rule_set([write(tmp_path, "rules:" + rule)]).rules
    assert loaded.keywords == ("demo_", "DEMO")


def test_hardening_avoids_spurious_partial_matches() -> None:
    # A bug of the regex module: literal + repeat inside a lookbehind reports partial matches
    # that can never complete. The hardened pattern must not, and must match the same.
    source = r"(?<=secret[a-z]{0,30}):"
    raw, hard = regex.compile(source), regex.compile(harden_lookbehinds(source))
    assert raw.search(".....aaa:bbb", partial=True).partial  # the bug, still there
    assert hard.search(".....aaa:bbb", partial=True).span() == (12, 12)  # only "more text?"
    for text in ["secretkey: x", "my_secret:", "secret:", "nope: x", "secretsecret:"]:
        assert [m.span() for m in raw.finditer(text)] == [m.span() for m in hard.finditer(text)]


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="secrt:=_-x 1", max_size=30))
def test_hardening_never_changes_matches(text: str) -> None:
    source = r"[:=](?<=(?i:secret)[_.-]?[a-z]{0,5}\s?[:=])(?P<v>x+)"
    raw, hard = regex.compile(source), regex.compile(harden_lookbehinds(source))
    assert [m.span() for m in raw.finditer(text)] == [m.span() for m in hard.finditer(text)]


@pytest.mark.parametrize(
    ("source", "starts", "not_starts"),
    [
        (r"(?<![\w-])gh[pousr]_x", "g", "hp_ "),
        (r"(?i:sig)=", "sS", "i="),
        (r"[:=>](?<=token[:=])x", ":=>", "tx"),
        (r"(?:data|stringData):", "ds", "a:"),
        (r"x?[ab]", "xab", "c"),
        (r"\d{3}-", "0123456789", "-a"),
        (r"(?<=a)\.b", ".", "ab"),
    ],
)
def test_first_chars(source: str, starts: str, not_starts: str) -> None:
    first = first_chars(source, ignorecase=False)
    assert all(first.accepts(c) for c in starts)
    assert not any(first.accepts(c) for c in not_starts)


@settings(max_examples=80, deadline=None)
@given(st.text(alphabet="abcXY_-:=.0123 \n", max_size=24))
def test_first_chars_covers_every_match_start(text: str) -> None:
    sources = [
        r"(?:ab|[XY]c)+_?",
        r"(?i:ab)[0-3]{2}",
        r"(?<=[a-c])[-:=.]+\d",
        r"(?:a?b?)c|X",
        r"[^a\s]b",
    ]
    for source in sources:
        first = first_chars(source)
        for match in regex.finditer(source, text):
            assert first.accepts(match.group()[0]), (source, text)


# --- the rule files: strict YAML, fragments, verbose mode, stream soundness at load ----------


def test_duplicate_yaml_keys_are_errors(tmp_path: Path) -> None:
    text = "rules:" + GOOD_RULE.replace(
        "    profiles: [default]", "    profiles: [default]\n    profiles: [strict]"
    )
    error = load_error(tmp_path, text)
    assert "duplicate key 'profiles'" in str(error) and "line 7" in str(error)


def test_fragments_are_shared_by_all_files_and_expanded(tmp_path: Path) -> None:
    (tmp_path / "00-fragments.yaml").write_text(
        "fragments:\n  demo-head: 'demo_'\n  demo-token: '(?<![\\w-]){{demo-head}}[a-z0-9]{8}'\n"
    )
    rule = GOOD_RULE.replace("(?<![\\w-])demo_[a-z0-9]{8}", "{{demo-token}}")
    write(tmp_path, "rules:" + rule, "10-rules.yaml")
    (loaded,) = load_rule_set([tmp_path]).rules
    assert loaded.pattern.search("x demo_abcd1234") is not None
    assert "{{" not in loaded.plain.pattern


@pytest.mark.parametrize(
    ("fragments", "pattern", "message"),
    [
        ("", "{{nope}}", "unknown fragment {{nope}}"),
        ("  a: '{{b}}'\n  b: '{{a}}'\n", "{{a}}", "fragment cycle: a -> b -> a"),
        ("  a: '(unclosed'\n", "{{a}}", "invalid pattern"),
        ("  Bad_Name: 'x'\n", "demo", "kebab-case"),
    ],
)
def test_fragment_errors(tmp_path: Path, fragments: str, pattern: str, message: str) -> None:
    text = f"fragments:\n{fragments or '  unused: x'}\nrules:" + GOOD_RULE.replace(
        "(?<![\\w-])demo_[a-z0-9]{8}", pattern
    )
    assert message in str(load_error(tmp_path, text))


@pytest.mark.parametrize("flags", ["(?x)", "(?ix)", "(?x:", "(?i-x:"])
def test_verbose_mode_is_refused(tmp_path: Path, flags: str) -> None:
    pattern = f"{flags}demo_ [a-z0-9]{{8}}" + (")" if flags.endswith(":") else "")
    text = "rules:" + GOOD_RULE.replace("(?<![\\w-])demo_[a-z0-9]{8}", pattern)
    assert "verbose mode (?x) is not supported" in str(load_error(tmp_path, text))


def test_a_rule_unsound_in_streams_does_not_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sluicegate.redaction import rules as rules_module

    # A wrong first-character set: a stream would never run the rule, and leak the secret.
    monkeypatch.setattr(
        rules_module, "first_chars", lambda *a, **k: rules_module.FirstChars(frozenset("z"), False)
    )
    error = load_error(tmp_path, "rules:" + GOOD_RULE)
    assert error.key_path == "rules[0].examples.positive[0]"
    assert "demo-token" in error.message
    assert load_rule_set([write(tmp_path, "rules:" + GOOD_RULE)], check_streams=False).rules
