"""Real-looking secrets for tests, taken from the default rule pack's own positive examples.

A test that plants `example(rule_id).text` in a body and then asserts `example(rule_id).secret` is
gone proves the secret value itself was removed (not just that some tag appeared), with secrets
shaped exactly like the formats the default pack claims to catch.
"""

from __future__ import annotations

import dataclasses
import functools

from sluicegate.redaction.redactor import Redactor
from sluicegate.redaction.rules import Direction, RulePack, load_rule_pack
from tests.support.gateway import REPO


@dataclasses.dataclass(frozen=True)
class Example:
    rule_id: str
    text: str  # the positive example as the rule file gives it (the secret in its context)
    secret: str  # the part of `text` redaction replaces


@functools.cache
def default_pack() -> RulePack:
    return load_rule_pack([REPO / "rules"])


@functools.cache
def example(rule_id: str) -> Example:
    """The first positive example of `rule_id` and the secret in it.

    When the rule file does not name the secret, it is what the redactor replaced: the text
    between the longest common prefix and suffix of the example and its redaction.
    """
    pack = default_pack()
    rule = next(r for r in pack.rules if r.id == rule_id)
    positive = rule.positives[0]
    if positive.secret is not None:
        return Example(rule_id, positive.text, positive.secret)
    text = positive.text
    redacted = Redactor(pack, Direction.REQUEST).redact_text(text).text
    assert redacted != text, f"{rule_id}: its own example is not redacted"
    prefix = 0
    while prefix < min(len(text), len(redacted)) and text[prefix] == redacted[prefix]:
        prefix += 1
    suffix = 0
    while (
        suffix < min(len(text), len(redacted)) - prefix
        and text[-1 - suffix] == redacted[-1 - suffix]
    ):
        suffix += 1
    secret = text[prefix : len(text) - suffix]
    assert len(secret) >= 8, f"{rule_id}: no usable secret in its example"
    return Example(rule_id, text, secret)
