"""Rules: an action, its conditions and phase; the first matching rule of a phase decides."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

from sluicegate.policy.conditions import Conditions, FlowContext
from sluicegate.policy.decisions import DEFAULT_MESSAGES, Action, Decision, Phase
from sluicegate.policy.ratelimit import Limit
from sluicegate.policy.views import BodyViews

BodyLoader = Callable[[], BodyViews]


@dataclasses.dataclass(frozen=True)
class Rule:
    id: str
    action: Action
    when: Conditions = Conditions()
    phase: Phase = Phase.REQUEST
    message: str = ""

    def __post_init__(self) -> None:
        if self.action is Action.REDACT_ONLY and not self.when.body_patterns:
            raise ValueError(f"rule {self.id!r}: redact_only needs body_patterns")

    def decision(self, patterns: tuple[str, ...] = ()) -> Decision:
        message = self.message or DEFAULT_MESSAGES[self.action]
        return Decision(self.action, self.id, message, self.phase, patterns)


@dataclasses.dataclass(frozen=True)
class RateLimitRule:
    """A rate limit and whom it applies to. `per`: what is counted separately."""

    limit: Limit
    when: Conditions = Conditions()
    per: str = "caller_and_route"  # "caller" | "caller_and_route" | "route"
    message: str = ""

    def __post_init__(self) -> None:
        if self.when.needs_body:
            raise ValueError(f"rate limit {self.limit.id!r}: body conditions are not supported")
        if self.per not in ("caller", "caller_and_route", "route"):
            raise ValueError(f"rate limit {self.limit.id!r}: unknown per {self.per!r}")

    def key(self, ctx: FlowContext) -> str:
        if self.per == "caller":
            return ctx.identity
        if self.per == "route":
            return ctx.destination
        return f"{ctx.identity}@{ctx.destination}"


def first_match(
    rules: Iterable[Rule],
    ctx: FlowContext | None,
    body: BodyViews | BodyLoader,
    timeout: float | None,
) -> Decision | None:
    loaded: BodyViews | None = body if isinstance(body, BodyViews) else None
    for rule in rules:
        if ctx is not None and not rule.when.context_matches(ctx):
            continue
        if not rule.when.needs_body:
            return rule.decision()
        if loaded is None:
            assert callable(body)
            loaded = body()
        found = rule.when.body_matches(loaded, timeout)
        if found is not None:
            return rule.decision(found)
    return None
