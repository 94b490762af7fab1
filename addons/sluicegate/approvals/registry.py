"""Held flows waiting for an approver, and grants: the pending registry (no I/O).

A flow held by policy waits on a future in `ApprovalRegistry` (its own hook awaits it; other
flows keep flowing) until an approver approves or denies it through the control API, the
timeout denies it, or its client goes away. The registry is module-level state of the package,
which survives hot reloads of the `-s` script, so flows held across a reload can still be decided.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, Literal

logger = logging.getLogger("sluicegate.approvals")

Outcome = Literal["approved", "denied", "timeout", "cancelled"]
GrantKey = tuple[str, str, str]  # identity, destination, rule id


def iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True)
class ApprovalRequest:
    """What an approver decides on: who wants what, and which rule held it.

    Never a body, a header value or a query string (they may carry secrets).
    """

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
    client_id: str | None = None  # the client connection, to cancel on disconnect

    def as_json(self) -> dict[str, Any]:
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
        }


@dataclasses.dataclass(frozen=True)
class Resolution:
    """How a held flow ended. Recorded with the flow (who, when, why)."""

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


@dataclasses.dataclass
class Pending:
    id: str
    request: ApprovalRequest
    created_at: float
    expires_at: float
    future: asyncio.Future[Resolution]

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            **self.request.as_json(),
        }


@dataclasses.dataclass(frozen=True)
class Grant:
    """An allowance: the same identity may pass the same hold rule on the same destination."""

    key: GrantKey
    approval_id: str
    by: str
    expires_at: float

    def as_metadata(self) -> dict[str, Any]:
        return {"approval_id": self.approval_id, "by": self.by, "expires_at": iso(self.expires_at)}


class UnknownApproval(KeyError):
    """No pending approval has this id (never existed, already decided, timed out, cancelled)."""


class ApprovalRegistry:
    """Pending approvals and active grants. Event-loop confined: no locks needed."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._pending: dict[str, Pending] = {}
        self._grants: dict[GrantKey, Grant] = {}

    # -- held flows ----------------------------------------------------------------------------

    def open(self, request: ApprovalRequest, timeout: float) -> Pending:
        """Register a held flow. Must be called on the event loop that will await it."""
        approval_id = secrets.token_hex(4)
        while approval_id in self._pending:
            approval_id = secrets.token_hex(4)
        now = self._clock()
        pending = Pending(
            approval_id,
            request,
            created_at=now,
            expires_at=now + timeout,
            future=asyncio.get_running_loop().create_future(),
        )
        self._pending[approval_id] = pending
        return pending

    async def wait(self, pending: Pending) -> Resolution:
        """Wait for a decision; the timeout denies. Always leaves the registry clean."""
        remaining = max(pending.expires_at - self._clock(), 0.0)
        try:
            return await asyncio.wait_for(asyncio.shield(pending.future), remaining)
        except TimeoutError:
            timeout = pending.expires_at - pending.created_at
            self._resolve(
                pending,
                Resolution(
                    pending.id,
                    "timeout",
                    self._clock(),
                    reason=f"no approver decided within {timeout:g} seconds",
                ),
            )
            return pending.future.result()  # a decision that raced the timeout wins
        finally:
            if not pending.future.done():  # our hook was cancelled (shutdown)
                self._resolve(
                    pending, Resolution(pending.id, "cancelled", self._clock(), reason="shutdown")
                )
            self._pending.pop(pending.id, None)

    def decide(
        self,
        approval_id: str,
        *,
        approve: bool,
        by: str,
        reason: str,
        grant_minutes: float | None = None,
    ) -> Resolution:
        """Approve or deny a pending flow. A grant also releases other flows it covers."""
        pending = self._pending.get(approval_id)
        if pending is None:
            raise UnknownApproval(approval_id)
        now = self._clock()
        resolution = Resolution(
            approval_id,
            "approved" if approve else "denied",
            now,
            by=by,
            reason=reason,
            grant_minutes=grant_minutes if approve else None,
        )
        self._resolve(pending, resolution)
        if approve and grant_minutes:
            key = pending.request.grant_key
            self._grants[key] = Grant(key, approval_id, by, now + grant_minutes * 60)
            for other in list(self._pending.values()):
                if other.request.grant_key == key:
                    self._resolve(
                        other,
                        Resolution(
                            other.id,
                            "approved",
                            now,
                            by=by,
                            reason=f"covered by the grant of approval {approval_id}",
                        ),
                    )
        return resolution

    def cancel_client(self, client_id: str) -> int:
        """The client of these flows disconnected: nobody is waiting for an answer any more."""
        gone = [p for p in self._pending.values() if p.request.client_id == client_id]
        for pending in gone:
            self._resolve(
                pending,
                Resolution(pending.id, "cancelled", self._clock(), reason="client disconnected"),
            )
        return len(gone)

    def pending(self) -> list[Pending]:
        return sorted(self._pending.values(), key=lambda p: p.created_at)

    def _resolve(self, pending: Pending, resolution: Resolution) -> None:
        self._pending.pop(pending.id, None)
        if not pending.future.done():
            pending.future.set_result(resolution)
            logger.info(
                "sluicegate: approval %s %s%s (rule %s, request %s)",
                pending.id,
                resolution.outcome,
                f" by {resolution.by}" if resolution.by else "",
                pending.request.rule_id,
                pending.request.request_id,
            )

    # -- grants ------------------------------------------------------------------------------

    def grant_for(self, key: GrantKey) -> Grant | None:
        grant = self._grants.get(key)
        if grant is not None and grant.expires_at <= self._clock():
            del self._grants[key]
            return None
        return grant

    def granted_rules(self, identity: str, destination: str) -> list[str]:
        return [
            key[2]
            for key in list(self._grants)
            if key[:2] == (identity, destination) and self.grant_for(key) is not None
        ]


# -- the control API ------------------------------------------------------------------------------
