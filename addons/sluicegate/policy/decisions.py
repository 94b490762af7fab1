"""What policy decides: actions, phases, decisions, and the errors of evaluation."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

# Decisions taken by `default_action` (no rule matched) carry this id; it is not a valid rule id.
DEFAULT_RULE_ID = "(default)"


class Action(enum.StrEnum):
    ALLOW = "allow"
    BLOCK = "block"
    HOLD = "hold"
    REDACT_ONLY = "redact_only"


class Phase(enum.StrEnum):
    REQUEST = "request"
    RESPONSE = "response"


class PolicyError(Exception):
    """A body the policy cannot evaluate or rewrite safely. `code` is stable, the text is safe."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ScanTimeout(PolicyError):
    """A pattern took longer than the scan budget: the body is treated as uninspectable."""


@dataclasses.dataclass(frozen=True)
class Decision:
    """What to do with a flow, and which rule said so. Safe to show and to record."""

    action: Action
    rule_id: str
    message: str
    phase: Phase
    patterns: tuple[str, ...] = ()

    @property
    def is_default(self) -> bool:
        return self.rule_id == DEFAULT_RULE_ID

    def describe(self) -> str:
        """One sentence for the agent: the rule and its message."""
        rule = "the default policy" if self.is_default else f"policy rule {self.rule_id!r}"
        return f"{rule}: {self.message}" if self.message else rule

    def as_metadata(self) -> dict[str, Any]:
        return {
            "action": str(self.action),
            "rule": self.rule_id,
            "message": self.message,
            "phase": str(self.phase),
            "patterns": list(self.patterns),
        }


DEFAULT_MESSAGES = {
    Action.ALLOW: "",
    Action.BLOCK: "This request is not allowed by the gateway's policy.",
    Action.HOLD: "This request needs a human approver's decision.",
    Action.REDACT_ONLY: "Matching content was redacted.",
}
