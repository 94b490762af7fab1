"""What a recorded flow's `metadata["sluicegate"]` says, in the words filters and views use.

Shared by the recorder (audit lines), `sessions flows` and the console; no mitmproxy here.
"""

from __future__ import annotations

from typing import Any

# Most telling first: a flow's decision is the most severe one any phase reached.
SEVERITY = ("blocked", "denied", "timeout", "cancelled", "held", "approved", "allowed")


def _phase_decision(phase: dict[str, Any]) -> str:
    """The policy addon's per-phase facts (`action`, `approval.outcome`) in one word."""
    action = phase.get("action")
    if action == "block":
        return "blocked"
    if action == "hold":
        approval = phase.get("approval")
        outcome = approval.get("outcome") if isinstance(approval, dict) else None
        return outcome if outcome in SEVERITY else "held"
    return "allowed"


def decision(sg: dict[str, Any], errored: bool) -> str:
    """The flow's outcome in one word, for the audit log and filters."""
    policy = sg.get("policy")
    if isinstance(policy, dict):
        if isinstance(decided := policy.get("decision"), str):
            return decided
        phases = [
            _phase_decision(policy[p])
            for p in ("request", "response")
            if isinstance(policy.get(p), dict)
        ]
        worst = min(phases, key=SEVERITY.index, default="allowed")
        if worst != "allowed":
            return worst
    if sg.get("refusal"):
        return "refused"
    if errored:
        return "error"
    return "allowed"


def rules_fired(sg: dict[str, Any]) -> dict[str, int]:
    """Counts per rule id: redaction in both directions plus the policy rules that acted."""
    counts: dict[str, int] = {}

    def add(rule: Any, n: Any = 1) -> None:
        if isinstance(rule, str) and isinstance(n, int) and not isinstance(n, bool):
            counts[rule] = counts.get(rule, 0) + n

    redaction = sg.get("redaction")
    if isinstance(redaction, dict):
        for direction in redaction.values():
            if isinstance(direction, dict):
                for rule, n in direction.items():
                    add(rule, n)
    policy = sg.get("policy")
    if isinstance(policy, dict):
        if isinstance(policy.get("rules"), dict):
            for rule, n in policy["rules"].items():
                add(rule, n)
        elif isinstance(policy.get("rule"), str):
            add(policy["rule"])
        for phase in ("request", "response"):
            facts = policy.get(phase)
            if isinstance(facts, dict) and (facts.get("action") != "allow" or "grant" in facts):
                add(facts.get("rule"))
    return counts
