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


# mitmproxy marks (emoji shortcodes mitmweb shows beside a flow) by decision; allowed: none.
MARKS = {
    "blocked": ":no_entry:",
    "denied": ":no_entry:",
    "timeout": ":no_entry:",
    "refused": ":no_entry:",
    "cancelled": ":hourglass:",
    "held": ":hourglass:",
    "approved": ":hourglass:",
    "error": ":warning:",
}
MAX_COMMENT = 1000


def mark(outcome: str) -> str:
    """The mark of a recorded flow: refusals, holds and errors stand out in mitmweb."""
    return MARKS.get(outcome, "")


def comment(sg: dict[str, Any], errored: bool) -> str:
    """Who did what, in one line, for mitmweb's comment field (no values, only names and counts):
    caller and groups, route, decision, the refusal or policy rule and its approval, redaction
    counts per direction and rule, a stream cut."""
    found = sg.get("caller")
    caller: dict[str, Any] = found if isinstance(found, dict) else {}
    who = str(caller.get("subject") or "anonymous")
    groups = caller.get("groups")
    if isinstance(groups, list) and groups:
        who += f" ({', '.join(map(str, groups))})"
    route = sg.get("route") or "no route"
    if isinstance(sg.get("base_url"), str):
        route = f"{route} (base URL {sg['base_url']})"
    outcome = decision(sg, errored)
    parts = [f"{who} via {route}: {outcome}"]
    refusal = sg.get("refusal")
    if isinstance(refusal, dict) and refusal.get("code"):
        parts.append(f"{refusal.get('status')} {refusal['code']}: {refusal.get('message', '')}")
    policy = sg.get("policy")
    if isinstance(policy, dict):
        for phase in ("request", "response"):
            facts = policy.get(phase)
            if not isinstance(facts, dict) or facts.get("action") in (None, "allow"):
                continue
            text = f"{phase} rule {facts.get('rule')} ({facts.get('action')})"
            approval = facts.get("approval")
            if isinstance(approval, dict) and approval.get("outcome"):
                text += f", {approval['outcome']} by {approval.get('by')}"
                if approval.get("reason"):
                    text += f": {approval['reason']}"
            parts.append(text)
    redaction = sg.get("redaction")
    if isinstance(redaction, dict):
        for direction in ("request", "response"):
            counts = redaction.get(direction)
            if isinstance(counts, dict) and counts:
                listed = ", ".join(f"{rule} x{n}" for rule, n in sorted(counts.items()))
                parts.append(f"redacted in {direction}: {listed}")
    stream = sg.get("stream")
    if isinstance(stream, dict) and stream.get("cut"):
        parts.append(f"stream cut: {stream['cut']}")
    if sg.get("request_id"):
        parts.append(f"request {sg['request_id']}")
    text = "sluicegate: " + "; ".join(parts)
    return text if len(text) <= MAX_COMMENT else text[: MAX_COMMENT - 3] + "..."


def decided_by(sg: dict[str, Any]) -> dict[str, Any]:
    """The policy rule that acted on the flow, who approved or denied it and why (audit-line
    fields `policy_rule`, `approval`, `approver`, `approval_reason`; None when nobody did)."""
    rule = approver = reason = outcome = None
    policy = sg.get("policy")
    if isinstance(policy, dict):
        for phase in ("request", "response"):
            facts = policy.get(phase)
            if not isinstance(facts, dict) or facts.get("action") in (None, "allow"):
                continue
            rule = rule or facts.get("rule")
            approval = facts.get("approval")
            if isinstance(approval, dict) and approval.get("outcome") and outcome is None:
                outcome = approval.get("outcome")
                approver, reason = approval.get("by"), approval.get("reason")
        if rule is None and isinstance(policy.get("rule"), str):
            rule = policy["rule"]
    return {
        "policy_rule": rule,
        "approval": outcome,
        "approver": approver,
        "approval_reason": reason,
    }
