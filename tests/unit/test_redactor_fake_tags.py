"""A tag written next to a secret must not protect it; our own tags stay idempotent.

Tags are read two ways by the rules (as letters, like the secret a tag replaced, and with their
brackets, as a boundary), so `ghp_...[REDACTED:a]` is found while redacting redacted output still
changes nothing. Checked for every positive example of the default and strict-pii packs, whole and
streamed in any split.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sluicegate.redaction.redactor import Redactor
from sluicegate.redaction.rules import Direction, load_rule_pack

RULES = Path(__file__).resolve().parents[2] / "rules"
REDACTORS = {
    profile: Redactor(load_rule_pack([RULES], profile), Direction.REQUEST)
    for profile in ("default", "strict-pii")
}


def cases(profile: str) -> list[tuple[str, str, str]]:
    """(rule id, example text, secret) of the examples the pack redacts."""
    redactor = REDACTORS[profile]
    out = []
    for rule in redactor.pack.rules:
        for positive in rule.positives:
            secret = positive.secret
            found = secret and secret in positive.text
            if found and secret not in redactor.redact_text(positive.text).text:
                out.append((rule.id, positive.text, secret))
    return out


CASES = {profile: cases(profile) for profile in REDACTORS}
FAKE_TAGS = st.sampled_from(
    ["[REDACTED:a]", "[REDACTED:github-token]", "[REDACTED:x:0123abcd]", "[REDACTED:a][REDACTED:b]"]
)


def with_tag(text: str, secret: str, tag: str, where: str) -> str:
    at = text.index(secret) + (len(secret) if where == "after" else 0)
    return text[:at] + tag + text[at:]


def streamed(redactor: Redactor, text: str, rng: random.Random) -> str:
    stream = redactor.stream(max_hold=1 << 20)
    out, position = [], 0
    while position < len(text):
        step = rng.randint(1, 9)
        out.append(stream.feed(text[position : position + step]))
        position += step
    return "".join(out) + stream.flush()


@pytest.mark.parametrize("profile", sorted(REDACTORS))
@pytest.mark.parametrize("where", ["before", "after"])
def test_a_fake_tag_beside_any_example_secret_does_not_protect_it(profile: str, where: str) -> None:
    redactor = REDACTORS[profile]
    leaks = []
    for rule_id, text, secret in CASES[profile]:
        if where == "before" and secret in redactor.redact_text(secret).text:
            continue  # found only by its context, which the tag then separates from it
        tagged = with_tag(text, secret, "[REDACTED:a]", where)
        if secret in redactor.redact_text(tagged).text:
            leaks.append(rule_id)
    assert leaks == []


@settings(max_examples=150, deadline=None)
@given(
    profile=st.sampled_from(sorted(REDACTORS)),
    index=st.integers(min_value=0),
    tag=FAKE_TAGS,
    where=st.sampled_from(["before", "after"]),
    prose=st.sampled_from(["", "see ", "key: ", "\n", '{"v": "']),
    rng=st.randoms(use_true_random=False),
)
@example(
    profile="default",
    index=0,
    tag="[REDACTED:a]",
    where="after",
    prose="",
    rng=random.Random(0),
)
def test_fake_tags_whole_and_streamed_never_release_a_secret_and_stay_idempotent(
    profile: str, index: int, tag: str, where: str, prose: str, rng: random.Random
) -> None:
    redactor = REDACTORS[profile]
    rule_id, text, secret = CASES[profile][index % len(CASES[profile])]
    tagged = prose + with_tag(text, secret, tag, where)
    whole = redactor.redact_text(tagged)
    found_without = secret not in redactor.redact_text(prose + text).text
    if found_without and (where == "after" or secret not in redactor.redact_text(secret).text):
        assert secret not in whole.text, rule_id
    assert secret not in streamed(redactor, tagged, rng) or secret in whole.text
    again = redactor.redact_text(whole.text)
    assert (again.text, again.counts) == (whole.text, {})


def test_github_token_with_a_fake_tag_is_redacted_both_sides() -> None:
    redactor = REDACTORS["default"]
    token = "ghp_C3J27XDCG2LmlZGEONYlgCtjfIZ4SOcMz9CP"
    for text in [f"{token}[REDACTED:a]", f"[REDACTED:a]{token}", f"x [REDACTED:a]{token}[b]"]:
        assert token not in redactor.redact_text(text).text
        assert token not in streamed(redactor, text, random.Random(1))
