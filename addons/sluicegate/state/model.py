"""Plain types of the shared state: what is held, decided, granted, and what changed.

Every type converts to JSON-safe dicts (`as_json`, shown to approvers and consoles) and to the
records the backends store (`to_record` / `from_record`). Nothing here holds a header value, a
query string or a body as it was sent: they may carry secrets. The one exception is
`ApprovalRequest.preview`, the start of the held body AFTER redaction (bounded), so an approver
sees what they approve.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from collections.abc import Mapping
from typing import Any, Literal

Outcome = Literal["approved", "denied", "timeout", "cancelled"]
GrantKey = tuple[str, str, str]  # identity, destination, rule id
EventKind = Literal[
    "activity",  # finished flows were published to the activity feed (see SharedState)
    "approval_pending",  # a new approval (one per distinct held request)
    "approval_joined",  # a retry of the same request joined a pending approval
    "approval_withdrawn",  # a waiting request went away (the approval stays pending)
    "approval_resolved",  # approved, denied, timed out or cancelled
    "grant_created",
    "grant_revoked",
]
OUTCOMES: tuple[Outcome, ...] = ("approved", "denied", "timeout", "cancelled")


def iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(timespec="seconds")


def grant_id(key: GrantKey) -> str:
    """A grant's stable id: one grant per (identity, destination, rule); a new one replaces it."""
    return hashlib.sha256("\0".join(key).encode()).hexdigest()[:16]


def request_digest(*parts: str | bytes) -> str:
    """The identity of a held request for joining retries (callers pass caller, route, method,
    path and the body's digest)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class ApprovalRequest:
    """What an approver decides on: who wants what, and which rule held it."""

    request_id: str
    rule_id: str
    message: str
    phase: str
    subject: str | None
    issuer: str | None
    groups: tuple[str, ...]
    route: str | None
    host: str
    port: int
    method: str
    path: str
    patterns: tuple[str, ...] = ()
    grant_key: GrantKey = ("", "", "")
    # The held body's start, already redacted (see module docstring); "" when none was kept.
    preview: str = ""
    body_bytes: int = 0

    def as_json(self) -> dict[str, Any]:
        """What approvers see (not the grant key, an internal detail)."""
        return {
            "request_id": self.request_id,
            "rule": self.rule_id,
            "message": self.message,
            "phase": self.phase,
            "subject": self.subject,
            "issuer": self.issuer,
            "groups": list(self.groups),
            "route": self.route,
            "host": self.host,
            "port": self.port,
            "method": self.method,
            "path": self.path,
            "patterns": list(self.patterns),
            "preview": self.preview,
            "body_bytes": self.body_bytes,
        }

    def to_record(self) -> dict[str, Any]:
        return {**self.as_json(), "grant_key": list(self.grant_key)}

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> ApprovalRequest:
        key = tuple(str(k) for k in data.get("grant_key") or ("", "", ""))
        return cls(
            request_id=str(data["request_id"]),
            rule_id=str(data["rule"]),
            message=str(data.get("message") or ""),
            phase=str(data.get("phase") or "request"),
            subject=data.get("subject"),
            issuer=data.get("issuer"),
            groups=tuple(data.get("groups") or ()),
            route=data.get("route"),
            host=str(data.get("host") or ""),
            port=int(data.get("port") or 0),
            method=str(data.get("method") or ""),
            path=str(data.get("path") or ""),
            patterns=tuple(data.get("patterns") or ()),
            grant_key=(key[0], key[1], key[2]) if len(key) == 3 else ("", "", ""),
            preview=str(data.get("preview") or ""),
            body_bytes=int(data.get("body_bytes") or 0),
        )


@dataclasses.dataclass(frozen=True)
class Resolution:
    """How an approval ended. Recorded with the flow (who, when, why)."""

    approval_id: str
    outcome: Outcome
    at: float
    by: str | None = None
    reason: str = ""
    grant_minutes: float | None = None

    @property
    def approved(self) -> bool:
        return self.outcome == "approved"

    def as_metadata(self) -> dict[str, Any]:
        return {
            "id": self.approval_id,
            "outcome": self.outcome,
            "by": self.by,
            "reason": self.reason,
            "at": iso(self.at),
            "grant_minutes": self.grant_minutes,
        }

    def to_record(self) -> dict[str, Any]:
        return {
            "approval_id": self.approval_id,
            "outcome": self.outcome,
            "at": self.at,
            "by": self.by,
            "reason": self.reason,
            "grant_minutes": self.grant_minutes,
        }

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Resolution:
        outcome = data.get("outcome")
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        grant = data.get("grant_minutes")
        return cls(
            approval_id=str(data["approval_id"]),
            outcome=outcome,
            at=float(data["at"]),
            by=data.get("by") or None,
            reason=str(data.get("reason") or ""),
            grant_minutes=float(grant) if grant else None,
        )


@dataclasses.dataclass(frozen=True)
class Approval:
    """One approval as the state holds it: pending, or decided (kept a while for look-ups and
    for a retry that comes after an approval nobody was waiting for)."""

    id: str
    request: ApprovalRequest
    created_at: float
    expires_at: float
    replica: str  # where the first request was held
    attempts: int = 1  # requests that were held for it (the first and its retries)
    waiting: int = 1  # of those, waiting right now (on any replica)
    resolution: Resolution | None = None

    @property
    def status(self) -> str:
        return "pending" if self.resolution is None else self.resolution.outcome

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "replica": self.replica,
            "attempts": self.attempts,
            "waiting": self.waiting,
            **self.request.as_json(),
            "resolution": None if self.resolution is None else self.resolution.as_metadata(),
        }


@dataclasses.dataclass(frozen=True)
class Grant:
    """An allowance: the same identity may pass the same hold rule on the same destination."""

    key: GrantKey
    approval_id: str
    by: str
    expires_at: float
    created_at: float = 0.0
    reason: str = ""

    @property
    def id(self) -> str:
        return grant_id(self.key)

    def as_metadata(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "approval_id": self.approval_id,
            "by": self.by,
            "expires_at": iso(self.expires_at),
        }

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "identity": self.key[0],
            "destination": self.key[1],
            "rule": self.key[2],
            "approval_id": self.approval_id,
            "by": self.by,
            "reason": self.reason,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
        }

    def to_record(self) -> dict[str, Any]:
        return {
            "key": list(self.key),
            "approval_id": self.approval_id,
            "by": self.by,
            "reason": self.reason,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
        }

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Grant:
        key = [str(k) for k in data["key"]]
        return cls(
            key=(key[0], key[1], key[2]),
            approval_id=str(data["approval_id"]),
            by=str(data.get("by") or ""),
            expires_at=float(data["expires_at"]),
            created_at=float(data.get("created_at") or 0.0),
            reason=str(data.get("reason") or ""),
        )


@dataclasses.dataclass(frozen=True)
class HistoryEntry:
    """One decision or revocation, newest first in `SharedState.history()`."""

    at: float
    kind: Literal["decision", "revocation"]
    outcome: str  # approved | denied | timeout | cancelled | revoked
    by: str | None
    reason: str
    approval_id: str | None = None
    grant_id: str | None = None
    grant_minutes: float | None = None
    request: ApprovalRequest | None = None
    grant: Grant | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "at": iso(self.at),
            "kind": self.kind,
            "outcome": self.outcome,
            "by": self.by,
            "reason": self.reason,
            "approval_id": self.approval_id,
            "grant_id": self.grant_id,
            "grant_minutes": self.grant_minutes,
            "request": None if self.request is None else self.request.as_json(),
            "grant": None if self.grant is None else self.grant.as_json(),
        }

    @classmethod
    def decision(cls, resolution: Resolution, request: ApprovalRequest) -> HistoryEntry:
        granted = resolution.approved and bool(resolution.grant_minutes)
        return cls(
            at=resolution.at,
            kind="decision",
            outcome=resolution.outcome,
            by=resolution.by,
            reason=resolution.reason,
            approval_id=resolution.approval_id,
            grant_id=grant_id(request.grant_key) if granted else None,
            grant_minutes=resolution.grant_minutes,
            request=request,
        )

    @classmethod
    def revocation(cls, grant: Grant, at: float, by: str, reason: str) -> HistoryEntry:
        return cls(
            at=at,
            kind="revocation",
            outcome="revoked",
            by=by,
            reason=reason,
            approval_id=grant.approval_id,
            grant_id=grant.id,
            grant=grant,
        )


@dataclasses.dataclass(frozen=True)
class StateEvent:
    """A change, as `SharedState.subscribe()` delivers it (from every replica on Redis)."""

    kind: EventKind
    approval_id: str | None = None
    grant_id: str | None = None
    resolution: Resolution | None = None
    replica: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "approval_id": self.approval_id,
            "grant_id": self.grant_id,
            "resolution": None if self.resolution is None else self.resolution.as_metadata(),
            "replica": self.replica,
        }

    def to_wire(self) -> str:
        return json.dumps(
            {
                "kind": self.kind,
                "approval_id": self.approval_id,
                "grant_id": self.grant_id,
                "resolution": None if self.resolution is None else self.resolution.to_record(),
                "replica": self.replica,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_wire(cls, text: str | bytes) -> StateEvent:
        data = json.loads(text)
        resolution = data.get("resolution")
        return cls(
            kind=data["kind"],
            approval_id=data.get("approval_id"),
            grant_id=data.get("grant_id"),
            resolution=Resolution.from_record(resolution) if resolution else None,
            replica=data.get("replica"),
        )
