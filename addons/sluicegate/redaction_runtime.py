"""The redaction objects a config asks for, shared by the buffered and the streaming addons.

Built once per config version from `config.redaction` (whose rule pack was compiled while the config
was validated). Per flow, the response redactor gains the flow's scrub literals (the injected
credential in all its encodings) so upstream echoes of it never reach the agent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from sluicegate.config import Config
from sluicegate.engine.bodies import BodyPolicy
from sluicegate.engine.redactor import KeyedTagger, LiteralSecret, Redactor, Tagger
from sluicegate.engine.rules import Direction, RulePack, load_rule_pack
from sluicegate.flowstate import ScrubLiteral


@dataclasses.dataclass(frozen=True)
class RedactionRuntime:
    request: Redactor | None  # None: request redaction switched off
    response: Redactor | None  # None: response redaction switched off (scrub literals still apply)
    response_scrub_only: Redactor  # no rules, only a flow's scrub literals
    body_policy: BodyPolicy
    max_hold: int
    max_body_bytes: int

    def for_response(self, scrub: Iterable[ScrubLiteral]) -> Redactor:
        """The response redactor for one flow: rules plus that flow's scrub literals."""
        literals = [LiteralSecret(s.rule_id, s.value) for s in scrub]
        base = self.response if self.response is not None else self.response_scrub_only
        return base.with_literals(literals) if literals else base


def build_redaction(config: Config) -> RedactionRuntime:
    section = config.redaction
    pack = section.pack
    if pack is None:  # a config built without validation (tests)
        pack = load_rule_pack(
            list(section.rules), section.profile, enable=section.enable, disable=section.disable
        )
    tagger: Tagger | None = None
    if section.tag == "keyed":
        assert section.tag_key is not None
        tagger = KeyedTagger(section.tag_key.read().encode())
    no_rules = RulePack(rules=(), key_rules=(), profile="none")
    return RedactionRuntime(
        request=Redactor(pack, Direction.REQUEST, tagger=tagger) if section.requests else None,
        response=Redactor(pack, Direction.RESPONSE, tagger=tagger) if section.responses else None,
        response_scrub_only=Redactor(no_rules, Direction.RESPONSE, tagger=tagger),
        body_policy=BodyPolicy(binary=section.binary_bodies, unknown=section.unknown_content_types),
        max_hold=section.max_hold_chars,
        max_body_bytes=config.gateway.max_body_bytes,
    )
