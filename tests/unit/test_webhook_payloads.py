"""Webhook payloads: generic JSON, Slack Block Kit (checked by Slack's own SDK models, which
enforce Block Kit's documented limits) and Teams Adaptive Cards (checked against the official
Adaptive Card JSON schema)."""

from __future__ import annotations

import copy
import importlib.resources
import json
from typing import Any

import jsonschema
import pytest
from slack_sdk.models.blocks import Block

from sluicegate.approvals.payloads import Notice, payload
from sluicegate.state import Approval, ApprovalRequest, Resolution

REQUEST = ApprovalRequest(
    request_id="req-1",
    rule_id="deletes",
    message="Deleting needs a human.",
    phase="request",
    subject="alice",
    issuer="https://idp",
    groups=("agents",),
    route="openai",
    host="api.openai.com",
    port=443,
    method="DELETE",
    path="/v1/files/x",
    patterns=("private-key",),
    grant_key=("https://idp|alice", "route:openai", "deletes"),
)
APPROVAL = Approval("a1b2c3d4", REQUEST, 1_700_000_000.0, 1_700_000_300.0, "replica-a", 3, 1)
LINK = "https://console.example.com/approvals/a1b2c3d4"
NOTICES = {
    "pending": Notice(APPROVAL, link=LINK),
    "pending-no-link": Notice(APPROVAL),
    "approved": Notice(
        APPROVAL,
        Resolution("a1b2c3d4", "approved", 1_700_000_100.0, "bob", "ticket 42", 30.0),
        link=LINK,
    ),
    "denied": Notice(APPROVAL, Resolution("a1b2c3d4", "denied", 1_700_000_100.0, "bob", "no")),
    "expired": Notice(APPROVAL, Resolution("a1b2c3d4", "timeout", 1_700_000_300.0)),
    "cancelled": Notice(
        APPROVAL,
        Resolution("a1b2c3d4", "cancelled", 1_700_000_050.0, reason="withdrawn"),
        retry_grace_seconds=30,
    ),
    "hostile": Notice(
        Approval(
            "a1b2c3d4",
            ApprovalRequest(
                **{
                    **REQUEST.__dict__,
                    "path": "/<!channel>/" + "x" * 5000,
                    "subject": "<https://evil|click> & *bold*",
                    "message": "m" * 4000,
                }
            ),
            1_700_000_000.0,
            1_700_000_300.0,
            "r",
        )
    ),
}


def adaptive_card_schema() -> dict[str, Any]:
    schema = importlib.resources.files("adaptive_cards") / "schemas" / "schema-1.4.json"
    return json.loads(schema.read_text(encoding="utf-8"))


def validate_card(card: dict[str, Any]) -> None:
    validator = jsonschema.Draft6Validator(adaptive_card_schema())
    errors = sorted(validator.iter_errors(card), key=str)
    assert not errors, "\n".join(e.message for e in errors)


@pytest.mark.parametrize("name", sorted(NOTICES))
def test_slack_payloads_are_valid_block_kit(name: str) -> None:
    body = payload(NOTICES[name], "slack")
    assert set(body) == {"text", "blocks"} and body["text"]
    blocks = Block.parse_all(body["blocks"])
    assert len(blocks) == len(body["blocks"]) <= 50
    for block in blocks:
        block.validate_json()  # raises on anything over Block Kit's limits
    # Nothing the models do not know (a misspelt field would be dropped here).
    assert [b.to_dict() for b in blocks] == body["blocks"]
    text = json.dumps(body)
    assert "<!channel>" not in text and "<https://evil" not in text


def test_slack_validation_catches_a_broken_block() -> None:
    body = payload(NOTICES["pending"], "slack")
    broken = copy.deepcopy(body["blocks"])
    broken[0]["text"]["text"] = "x" * 200  # header over 150 characters
    with pytest.raises(Exception, match="150"):
        for block in Block.parse_all(broken):
            block.validate_json()


@pytest.mark.parametrize("name", sorted(NOTICES))
def test_teams_payloads_are_adaptive_cards_in_a_message(name: str) -> None:
    body = payload(NOTICES[name], "teams")
    assert body["type"] == "message"
    [attachment] = body["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    assert attachment["contentUrl"] is None
    card = attachment["content"]
    assert (card["type"], card["version"]) == ("AdaptiveCard", "1.4")
    validate_card(card)
    if NOTICES[name].link:
        assert card["actions"] == [
            {"type": "Action.OpenUrl", "title": "Open approval", "url": LINK}
        ]


def test_the_schema_check_catches_a_broken_card() -> None:
    card = payload(NOTICES["pending"], "teams")["attachments"][0]["content"]
    broken = copy.deepcopy(card)
    broken["body"][0]["size"] = "Enormous"
    with pytest.raises(AssertionError):
        validate_card(broken)
    broken = copy.deepcopy(card)
    del broken["body"][3]["facts"][0]["value"]
    with pytest.raises(AssertionError):
        validate_card(broken)


def test_generic_payloads_say_what_happens_to_the_agent() -> None:
    pending = payload(NOTICES["pending"], "json")
    assert pending["event"] == "approval_pending"
    assert pending["link"] == LINK and pending["approval"]["attempts"] == 3
    assert (
        "403 approval_timeout" in pending["agent"]
        and "approvals approve a1b2c3d4" in (pending["approve"])
    )
    events = {name: payload(n, "json")["event"] for name, n in NOTICES.items()}
    assert events["approved"] == "approval_approved"
    assert events["expired"] == "approval_expired"
    assert events["cancelled"] == "approval_cancelled"
    cancelled = payload(NOTICES["cancelled"], "json")
    assert "did not retry within 30 seconds" in cancelled["agent"]
    assert cancelled["resolution"]["outcome"] == "cancelled"
    for name in ("pending", "slack", "teams"):
        fmt = name if name != "pending" else "json"
        assert "grant_key" not in json.dumps(payload(NOTICES["pending"], fmt))  # type: ignore[arg-type]
