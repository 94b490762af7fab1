"""Policy evaluation: may a request (or a response) pass, must it be blocked, or wait for a human?

Pure (no mitmproxy): the Policy addon describes a flow as a `FlowContext` plus `BodyViews` and acts
on the `Decision` it gets back. Streaming code calls `ResponsePolicy.stream()` on released text.

Precedence, the same for both phases (see docs/POLICY.md):

1. Rules of the phase, in config order. The FIRST rule whose conditions all hold decides
   (`allow`, `block`, `hold`, `redact_only`). Put exceptions (narrow allows) before the general
   rule they carve out of, as in a firewall.
2. No rule matched: `policy.default_action` for requests, `allow` for responses.
3. A `hold` covered by an approver's active grant (same identity, destination and rule) passes.
4. Requests only: anything not blocked is counted against every matching rate limit.

Matched text never leaves the engine: decisions name rules and patterns, never what matched.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sluicegate.policy.conditions import FlowContext
from sluicegate.policy.decisions import DEFAULT_RULE_ID, Action, Decision, Phase
from sluicegate.policy.ratelimit import Limit
from sluicegate.policy.rules import BodyLoader, RateLimitRule, Rule, first_match
from sluicegate.policy.stream import ResponsePolicy
from sluicegate.policy.views import BodyViews

# -- the policy ---------------------------------------------------------------------------------


class Policy:
    """The compiled `policy:` section: rules of both phases, default action, rate limits."""

    def __init__(
        self,
        rules: Sequence[Rule] = (),
        *,
        default_action: Action = Action.ALLOW,
        default_message: str = "",
        rate_limits: Sequence[RateLimitRule] = (),
        scan_timeout: float | None = 2.0,
        stream_window: int = 8192,
    ) -> None:
        if default_action is Action.REDACT_ONLY:
            raise ValueError("default_action cannot be redact_only (it needs patterns)")
        self.request_rules = tuple(r for r in rules if r.phase is Phase.REQUEST)
        self.response_rules = tuple(r for r in rules if r.phase is Phase.RESPONSE)
        self.default = Rule(DEFAULT_RULE_ID, default_action, message=default_message)
        self.rate_limits = tuple(rate_limits)
        self.scan_timeout = scan_timeout
        self.stream_window = stream_window
        # Whether any rule or rate limit has MCP conditions (then JSON-RPC bodies are read).
        conditions = [r.when for r in rules] + [r.when for r in self.rate_limits]
        self.uses_mcp = any(c.uses_mcp for c in conditions)

    @property
    def uses_hold(self) -> bool:
        rules = (*self.request_rules, *self.response_rules, self.default)
        return any(r.action is Action.HOLD for r in rules)

    def mcp_may_apply(self, ctx: FlowContext) -> bool:
        """Whether a rule or rate limit with MCP conditions could apply to this flow (its other
        conditions hold), so a JSON-RPC body must be read whatever its content type says."""
        if not self.uses_mcp:
            return False
        conditions = [r.when for r in (*self.request_rules, *self.response_rules)]
        conditions += [r.when for r in self.rate_limits]
        return any(c.uses_mcp and c.context_matches(ctx, ignore_mcp=True) for c in conditions)

    def request_needs_body(self, ctx: FlowContext) -> bool:
        """Whether deciding this request may look at its body (to skip decoding it if not)."""
        for rule in self.request_rules:
            if rule.when.context_matches(ctx):
                # A rule without body conditions decides before any later body rule is reached.
                return rule.when.needs_body
        return False

    def decide_request(self, ctx: FlowContext, body: BodyViews | BodyLoader) -> Decision:
        """First matching request rule, else the default action.

        `body` may be a loader, called only once a rule with body conditions is reached.
        """
        decision = first_match(self.request_rules, ctx, body, self.scan_timeout)
        return decision or self.default.decision()

    def rule(self, rule_id: str) -> Rule:
        """The rule behind a decision (the default rule for DEFAULT_RULE_ID)."""
        if rule_id == DEFAULT_RULE_ID:
            return self.default
        return next(r for r in (*self.request_rules, *self.response_rules) if r.id == rule_id)

    def rate_limit_hits(self, ctx: FlowContext) -> list[tuple[Limit, str]]:
        return [(r.limit, r.key(ctx)) for r in self.rate_limits if r.when.context_matches(ctx)]

    def rate_limit(self, limit_id: str) -> RateLimitRule:
        return next(r for r in self.rate_limits if r.limit.id == limit_id)

    def response_policy(
        self, ctx: FlowContext, exempt: Iterable[str] = ()
    ) -> ResponsePolicy | None:
        """The response rules that can apply to this flow, or None when no response rule can.

        `exempt`: rule ids the caller holds a grant for (their `hold` no longer applies).
        """
        skip = frozenset(exempt)
        applicable: list[Rule] = []
        for rule in self.response_rules:
            if not rule.when.context_matches(ctx):
                continue
            if rule.action is Action.HOLD and rule.id in skip:
                continue
            applicable.append(rule)
            if not rule.when.needs_body:
                break  # decides every response; later rules are unreachable
        while applicable and applicable[-1].action is Action.ALLOW:
            applicable.pop()  # a trailing allow changes nothing: no match is allow too
        if not applicable:
            return None
        return ResponsePolicy(tuple(applicable), self.scan_timeout, self.stream_window)
