"""The memory backend: this process's own state (one replica; lost on restart).

The embedded default, and what a Redis deployment falls back to with `on_unavailable: local`.
Same behaviour as the Redis backend, minus sharing and durability.
"""

from __future__ import annotations

import collections
import dataclasses
import secrets
import time
from collections.abc import Callable, Iterable, Sequence

from sluicegate.policy.ratelimit import Denied, Limit, RateLimiter
from sluicegate.state.base import (
    AlreadyResolved,
    Hold,
    LimitLike,
    SharedState,
    StillWaiting,
    UnknownApproval,
    UnknownGrant,
)
from sluicegate.state.model import (
    Approval,
    ApprovalRequest,
    Grant,
    GrantKey,
    HistoryEntry,
    Outcome,
    Resolution,
    StateEvent,
    grant_id,
)

# Decided approvals are kept this long past their expiry, for look-ups by id.
RETENTION_SECONDS = 3600.0


@dataclasses.dataclass
class _Record:
    approval: Approval
    dedupe: str
    claimable: bool = False


class MemoryState(SharedState):
    kind = "memory"
    durable = False

    def __init__(
        self,
        replica: str = "local",
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        history_size: int = 1000,
    ) -> None:
        super().__init__(replica)
        self._clock = clock
        self._limiter = RateLimiter(monotonic)
        self._records: dict[str, _Record] = {}
        self._dedupe: dict[str, str] = {}
        self._grants: dict[str, Grant] = {}
        self._history: collections.deque[HistoryEntry] = collections.deque(maxlen=history_size)

    # -- rate limits ----------------------------------------------------------------------------

    async def acquire(self, hits: Sequence[tuple[LimitLike, str]]) -> Denied | None:
        return self._limiter.acquire(
            [
                (
                    limit
                    if isinstance(limit, Limit)
                    else Limit(limit.id, limit.requests, limit.window_seconds),
                    key,
                )
                for limit, key in hits
            ]
        )

    # -- approvals ----------------------------------------------------------------------------

    async def hold(self, request: ApprovalRequest, *, dedupe: str, timeout: float) -> Hold:
        now = self._clock()
        self._forget_old(now)
        existing = self._records.get(self._dedupe.get(dedupe, ""))
        if existing is not None and existing.approval.expires_at > now:
            approval = existing.approval
            if approval.resolution is None:
                existing.approval = dataclasses.replace(
                    approval, attempts=approval.attempts + 1, waiting=approval.waiting + 1
                )
                hold = Hold(self, existing.approval, created=False)
                self._register(hold)
                self._emit(StateEvent("approval_joined", approval.id, replica=self.replica))
                return hold
            if approval.resolution.approved and existing.claimable:
                existing.claimable = False
                self._dedupe.pop(dedupe, None)
                existing.approval = dataclasses.replace(approval, attempts=approval.attempts + 1)
                return Hold(self, existing.approval, created=False, claimed=approval.resolution)
        approval_id = secrets.token_hex(4)
        while approval_id in self._records:
            approval_id = secrets.token_hex(4)
        approval = Approval(
            approval_id, request, created_at=now, expires_at=now + timeout, replica=self.replica
        )
        self._records[approval_id] = _Record(approval, dedupe)
        self._dedupe[dedupe] = approval_id
        hold = Hold(self, approval, created=True)
        self._register(hold)
        self._emit(StateEvent("approval_pending", approval_id, replica=self.replica))
        return hold

    async def withdraw(self, hold: Hold) -> bool:
        if hold.withdrawn:
            return False
        hold.withdrawn = True
        self._unregister(hold)
        record = self._records.get(hold.id)
        if record is None or record.approval.resolution is not None:
            return False
        waiting = max(record.approval.waiting - 1, 0)
        record.approval = dataclasses.replace(record.approval, waiting=waiting)
        self._emit(StateEvent("approval_withdrawn", hold.id, replica=self.replica))
        return waiting == 0

    async def resolve(
        self,
        approval_id: str,
        outcome: Outcome,
        *,
        by: str | None = None,
        reason: str = "",
        grant_minutes: float | None = None,
        only_if_abandoned: bool = False,
    ) -> Resolution:
        record = self._records.get(approval_id)
        if record is None:
            raise UnknownApproval(approval_id)
        approval = record.approval
        if approval.resolution is not None:
            raise AlreadyResolved(approval.resolution)
        if only_if_abandoned and approval.waiting > 0:
            raise StillWaiting(approval_id)
        now = self._clock()
        granting = outcome == "approved" and bool(grant_minutes)
        resolution = Resolution(
            approval_id,
            outcome,
            now,
            by=by,
            reason=reason,
            grant_minutes=grant_minutes if granting else None,
        )
        self._finish(record, resolution, claimable=outcome == "approved" and approval.waiting == 0)
        if granting:
            assert grant_minutes is not None
            key = approval.request.grant_key
            grant = Grant(key, approval_id, by or "", now + grant_minutes * 60, now, reason)
            self._grants[grant.id] = grant
            self._emit(StateEvent("grant_created", approval_id, grant.id, replica=self.replica))
            for other in list(self._records.values()):
                if other.approval.resolution is None and other.approval.request.grant_key == key:
                    covered = Resolution(
                        other.approval.id,
                        "approved",
                        now,
                        by=by,
                        reason=f"covered by the grant of approval {approval_id}",
                    )
                    self._finish(other, covered, claimable=other.approval.waiting == 0)
        return resolution

    def _finish(self, record: _Record, resolution: Resolution, *, claimable: bool) -> None:
        record.approval = dataclasses.replace(record.approval, resolution=resolution)
        record.claimable = claimable
        if not claimable and self._dedupe.get(record.dedupe) == record.approval.id:
            del self._dedupe[record.dedupe]
        self._history.appendleft(HistoryEntry.decision(resolution, record.approval.request))
        self._emit(
            StateEvent(
                "approval_resolved",
                record.approval.id,
                resolution=resolution,
                replica=self.replica,
            )
        )

    async def pending(self) -> list[Approval]:
        self._forget_old(self._clock())
        return sorted(
            (r.approval for r in self._records.values() if r.approval.resolution is None),
            key=lambda a: a.created_at,
        )

    async def approval(self, approval_id: str) -> Approval | None:
        record = self._records.get(approval_id)
        return None if record is None else record.approval

    async def history(self, limit: int = 100) -> list[HistoryEntry]:
        return list(self._history)[: max(limit, 0)]

    def _forget_old(self, now: float) -> None:
        for approval_id, record in list(self._records.items()):
            approval = record.approval
            if approval.resolution is None:
                # Nobody waits and it expired (its holder stopped): it timed out.
                if approval.expires_at <= now and approval.waiting == 0:
                    resolution = Resolution(
                        approval_id, "timeout", now, reason="expired with no request waiting"
                    )
                    self._finish(record, resolution, claimable=False)
            elif approval.expires_at + RETENTION_SECONDS <= now:
                del self._records[approval_id]
                if self._dedupe.get(record.dedupe) == approval_id:
                    del self._dedupe[record.dedupe]

    # -- grants -------------------------------------------------------------------------------

    async def grant(self, key: GrantKey) -> Grant | None:
        return self._active(grant_id(key))

    def _active(self, gid: str) -> Grant | None:
        grant = self._grants.get(gid)
        if grant is not None and grant.expires_at <= self._clock():
            del self._grants[gid]
            return None
        return grant

    async def granted(self, identity: str, destination: str, rules: Iterable[str]) -> list[str]:
        return [r for r in rules if self._active(grant_id((identity, destination, r)))]

    async def grants(self) -> list[Grant]:
        active = [g for g in (self._active(gid) for gid in list(self._grants)) if g]
        return sorted(active, key=lambda g: g.expires_at)

    async def revoke(self, grant_id: str, *, by: str, reason: str) -> Grant:
        grant = self._active(grant_id)
        if grant is None:
            raise UnknownGrant(grant_id)
        del self._grants[grant_id]
        self._history.appendleft(HistoryEntry.revocation(grant, self._clock(), by, reason))
        self._emit(StateEvent("grant_revoked", grant.approval_id, grant_id, replica=self.replica))
        return grant

    def owns(self, approval_id: str) -> bool:
        return approval_id in self._records

    def owns_grant(self, grant_id: str) -> bool:
        return grant_id in self._grants
