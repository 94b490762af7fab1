"""Webhook payloads for approval events: generic JSON, Slack (Block Kit) and Microsoft Teams
(an Adaptive Card in a message), each with a link to the approval when one is configured.

Events: `approval_pending` (one per approval, however many retries joined it), then one of
`approval_approved`, `approval_denied`, `approval_expired` (nobody decided in time) and
`approval_cancelled` (the request was withdrawn and not retried). Each says what happens, or
happened, to the agent. Nothing here holds a body, a header value or a query string.

Slack: an incoming-webhook message, `{"text": fallback, "blocks": [...]}`, within Block Kit's
documented limits (header text 150 characters, section text 3000, at most 10 fields of 2000).
Teams: `{"type": "message", "attachments": [{"contentType":
"application/vnd.microsoft.card.adaptive", "contentUrl": null, "content": <AdaptiveCard 1.4>}]}`,
as Teams incoming webhooks and Workflows accept it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from sluicegate.state.model import Approval, Resolution, iso

Format = Literal["json", "slack", "teams"]
FORMATS: tuple[Format, ...] = ("json", "slack", "teams")

_EVENT_FOR_OUTCOME = {
    "approved": "approval_approved",
    "denied": "approval_denied",
    "timeout": "approval_expired",
    "cancelled": "approval_cancelled",
}
_TITLES = {
    "approval_pending": "Approval needed",
    "approval_approved": "Approved",
    "approval_denied": "Denied",
    "approval_expired": "Expired: nobody decided",
    "approval_cancelled": "Cancelled: the agent withdrew the request",
}


@dataclasses.dataclass(frozen=True)
class Notice:
    """One thing to tell approvers about one approval."""

    approval: Approval
    resolution: Resolution | None = None
    link: str | None = None  # the approval in a console, if configured
    retry_grace_seconds: float = 0.0

    @property
    def event(self) -> str:
        if self.resolution is None:
            return "approval_pending"
        return _EVENT_FOR_OUTCOME[self.resolution.outcome]

    @property
    def title(self) -> str:
        r = self.approval.request
        where = r.route or f"{r.host}:{r.port}"
        return f"{_TITLES[self.event]}: {r.method} {where}{r.path}"

    @property
    def agent(self) -> str:
        """What happens (pending) or happened to the agent's request."""
        a = self.approval
        res = self.resolution
        if res is None:
            return (
                f"The agent's request waits. If nobody decides by {iso(a.expires_at)}, the agent "
                "gets 403 approval_timeout and nothing is forwarded; retries of the same request "
                "join this approval."
            )
        if res.outcome == "approved":
            grant = (
                f" The caller may pass this rule on this route for {res.grant_minutes:g} minutes."
                if res.grant_minutes
                else ""
            )
            return (
                "The request goes on to the upstream (if the agent had stopped waiting, its next "
                f"retry of the same request passes).{grant}"
            )
        if res.outcome == "denied":
            return "The agent got 403 approval_denied with the reason; nothing was forwarded."
        if res.outcome == "timeout":
            return (
                "The agent got 403 approval_timeout; nothing was forwarded. If it retries, the "
                "request is held for approval again."
            )
        return (
            "The agent's client disconnected and did not retry within "
            f"{self.retry_grace_seconds:g} seconds; nothing was forwarded."
        )

    def facts(self) -> list[tuple[str, str]]:
        r = self.approval.request
        facts = [
            ("Caller", r.subject or "anonymous"),
            ("Groups", ", ".join(r.groups) or "-"),
            ("Destination", f"{r.route or '-'} ({r.host}:{r.port})"),
            ("Request", f"{r.method} {r.path}"),
            ("Rule", f"{r.rule_id} ({r.phase})"),
            ("Approval", self.approval.id),
        ]
        if r.patterns:
            facts.append(("Matched", ", ".join(r.patterns)))
        if self.approval.attempts > 1:
            facts.append(("Attempts", str(self.approval.attempts)))
        if self.resolution is None:
            facts.append(("Expires", iso(self.approval.expires_at)))
        else:
            res = self.resolution
            facts.append(("Decided", f"{iso(res.at)}" + (f" by {res.by}" if res.by else "")))
            if res.reason:
                facts.append(("Reason", res.reason))
        return facts


def payload(notice: Notice, fmt: Format) -> dict[str, Any]:
    if fmt == "slack":
        return slack(notice)
    if fmt == "teams":
        return teams(notice)
    return generic(notice)


def _commands(approval_id: str) -> dict[str, str]:
    return {
        "approve": f"python -m sluicegate approvals approve {approval_id} --reason ...",
        "deny": f"python -m sluicegate approvals deny {approval_id} --reason ...",
    }


def generic(notice: Notice) -> dict[str, Any]:
    body: dict[str, Any] = {
        "event": notice.event,
        # Not the body preview: chat channels are a wider audience than the console.
        "approval": {k: v for k, v in notice.approval.as_json().items() if k != "preview"},
        "link": notice.link,
        "agent": notice.agent,
    }
    if notice.resolution is None:
        body.update(_commands(notice.approval.id))
    else:
        body["resolution"] = notice.resolution.as_metadata()
    return body


# -- Slack ------------------------------------------------------------------------------------


def _mrkdwn(text: str) -> str:
    """Slack's escaping: `&`, `<` and `>` only (so no @channel, link or mention gets in)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _plain(text: str) -> str:
    """plain_text shows `&lt;` as typed: keep angle brackets out instead of escaping them."""
    return text.replace("<", "\u2039").replace(">", "\u203a")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def slack(notice: Notice) -> dict[str, Any]:
    message = notice.approval.request.message
    intro = _mrkdwn(notice.agent)
    if message:
        intro = f"*{_mrkdwn(message)}*\n{intro}"
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _cut(_plain(notice.title), 150)}},
        {"type": "section", "text": {"type": "mrkdwn", "text": _cut(intro, 3000)}},
        {
            "type": "section",
            "fields": [
                {"type": "mrkdwn", "text": _cut(f"*{name}*\n{_mrkdwn(value)}", 2000)}
                for name, value in notice.facts()[:10]
            ],
        },
    ]
    if notice.resolution is None:
        commands = _commands(notice.approval.id)
        blocks.append(
            {
                "type": "context",
                "elements": [
                    {
                        "type": "mrkdwn",
                        "text": _cut(f"`{commands['approve']}`\n`{commands['deny']}`", 3000),
                    }
                ],
            }
        )
    if notice.link:
        blocks.append(
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "text": {"type": "plain_text", "text": "Open approval"},
                        "url": notice.link,
                        "action_id": "open-approval",
                    }
                ],
            }
        )
    fallback = _mrkdwn(f"{notice.title}. {notice.agent}")
    return {"text": _cut(fallback, 3000), "blocks": blocks}


# -- Microsoft Teams --------------------------------------------------------------------------


def teams(notice: Notice) -> dict[str, Any]:
    body: list[dict[str, Any]] = [
        {
            "type": "TextBlock",
            "text": notice.title,
            "weight": "Bolder",
            "size": "Medium",
            "wrap": True,
        },
    ]
    message = notice.approval.request.message
    if message:
        body.append({"type": "TextBlock", "text": message, "wrap": True})
    body += [
        {"type": "TextBlock", "text": notice.agent, "wrap": True, "isSubtle": True},
        {
            "type": "FactSet",
            "facts": [{"title": name, "value": value} for name, value in notice.facts()],
        },
    ]
    if notice.resolution is None:
        commands = _commands(notice.approval.id)
        body.append(
            {
                "type": "TextBlock",
                "text": f"{commands['approve']}\n\n{commands['deny']}",
                "wrap": True,
                "fontType": "Monospace",
                "size": "Small",
            }
        )
    card: dict[str, Any] = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": body,
    }
    if notice.link:
        card["actions"] = [{"type": "Action.OpenUrl", "title": "Open approval", "url": notice.link}]
    return {
        "type": "message",
        "attachments": [
            {
                "contentType": "application/vnd.microsoft.card.adaptive",
                "contentUrl": None,
                "content": card,
            }
        ],
    }
