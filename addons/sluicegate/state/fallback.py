"""`on_unavailable: local`: the shared store, or this replica's own state while it is down.

Every operation goes to the shared backend first; when it raises `StateUnavailable`, it goes to a
memory backend instead, and a warning is logged (at most once per `warn_every` seconds) saying
that approvals, grants and rate limits are per replica until the store returns. Approvals and
grants made locally stay local (their ids are only known here) until decided or expired; the
lists show both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from sluicegate.policy.ratelimit import Denied
from sluicegate.state.base import (
    Hold,
    LimitLike,
    SharedState,
    StateUnavailable,
    Subscription,
    ToolPins,
    UnknownApproval,
    UnknownGrant,
)
from sluicegate.state.memory import MemoryState
from sluicegate.state.model import (
    Approval,
    ApprovalRequest,
    Grant,
    GrantKey,
    HistoryEntry,
    Outcome,
    Resolution,
)

logger = logging.getLogger("sluicegate.state")
T = TypeVar("T")


class LocalFallback(SharedState):
    def __init__(
        self,
        shared: SharedState,
        local: MemoryState | None = None,
        *,
        warn_every: float = 60.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(shared.replica)
        self.shared = shared
        self.local = local or MemoryState(shared.replica)
        self.kind = shared.kind
        self.durable = shared.durable
        self._warn_every = warn_every
        self._monotonic = monotonic
        self._warned_at: float | None = None
        self.fallbacks = 0

    async def start(self) -> None:
        await self.shared.start()
        await self.local.start()

    async def close(self) -> None:
        await self.shared.close()
        await self.local.close()
        await super().close()

    @property
    def available(self) -> bool:
        return self.shared.available

    def _fell_back(self, error: StateUnavailable) -> None:
        self.fallbacks += 1
        now = self._monotonic()
        if self._warned_at is None or now - self._warned_at >= self._warn_every:
            self._warned_at = now
            logger.warning(
                "sluicegate: state: %s; using this replica's local state: approvals, grants and "
                "rate limits are per replica until it returns (%d operation(s) so far)",
                error,
                self.fallbacks,
            )

    async def _either(
        self, shared: Callable[[], Awaitable[T]], local: Callable[[], Awaitable[T]]
    ) -> T:
        try:
            return await shared()
        except StateUnavailable as e:
            self._fell_back(e)
            return await local()

    async def acquire(self, hits: Sequence[tuple[LimitLike, str]]) -> Denied | None:
        return await self._either(
            lambda: self.shared.acquire(hits), lambda: self.local.acquire(hits)
        )

    async def hold(self, request: ApprovalRequest, *, dedupe: str, timeout: float) -> Hold:
        return await self._either(
            lambda: self.shared.hold(request, dedupe=dedupe, timeout=timeout),
            lambda: self.local.hold(request, dedupe=dedupe, timeout=timeout),
        )

    async def wait(self, hold: Hold, timeout: float) -> Resolution | None:
        return await hold.owner.wait(hold, timeout)

    async def withdraw(self, hold: Hold) -> bool:
        return await hold.owner.withdraw(hold)

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
        target = self.local if self.local.owns(approval_id) else self.shared
        return await target.resolve(
            approval_id,
            outcome,
            by=by,
            reason=reason,
            grant_minutes=grant_minutes,
            only_if_abandoned=only_if_abandoned,
        )

    async def pending(self) -> list[Approval]:
        local = await self.local.pending()
        try:
            shared = await self.shared.pending()
        except StateUnavailable as e:
            if not local:
                raise
            self._fell_back(e)
            shared = []
        return sorted(shared + local, key=lambda a: a.created_at)

    async def approval(self, approval_id: str) -> Approval | None:
        if self.local.owns(approval_id):
            return await self.local.approval(approval_id)
        return await self.shared.approval(approval_id)

    async def history(self, limit: int = 100) -> list[HistoryEntry]:
        local = await self.local.history(limit)
        try:
            shared = await self.shared.history(limit)
        except StateUnavailable as e:
            if not local:
                raise
            self._fell_back(e)
            shared = []
        return sorted(shared + local, key=lambda h: h.at, reverse=True)[:limit]

    async def grant(self, key: GrantKey) -> Grant | None:
        local = await self.local.grant(key)
        if local is not None:
            return local
        return await self._either(lambda: self.shared.grant(key), _none)

    async def granted(self, identity: str, destination: str, rules: Iterable[str]) -> list[str]:
        rules = list(rules)
        local = await self.local.granted(identity, destination, rules)
        shared = await self._either(
            lambda: self.shared.granted(identity, destination, rules), _empty
        )
        return [r for r in rules if r in local or r in shared]

    async def grants(self) -> list[Grant]:
        local = await self.local.grants()
        try:
            shared = await self.shared.grants()
        except StateUnavailable as e:
            if not local:
                raise
            self._fell_back(e)
            shared = []
        return sorted(shared + local, key=lambda g: g.expires_at)

    async def revoke(self, grant_id: str, *, by: str, reason: str) -> Grant:
        if self.local.owns_grant(grant_id):
            try:
                return await self.local.revoke(grant_id, by=by, reason=reason)
            except UnknownGrant:
                pass
        return await self.shared.revoke(grant_id, by=by, reason=reason)

    async def publish_activity(self, entries: Sequence[Any]) -> None:
        await self._either(
            lambda: self.shared.publish_activity(entries),
            lambda: self.local.publish_activity(entries),
        )

    async def activity(self, limit: int = 200) -> list[dict[str, Any]]:
        local = await self.local.activity(limit)
        try:
            shared = await self.shared.activity(limit)
        except StateUnavailable as e:
            if not local:
                raise
            self._fell_back(e)
            shared = []
        merged = sorted(shared + local, key=lambda e: str(e.get("time", "")), reverse=True)
        return merged[:limit]

    async def tool_pins(self, scope: str) -> ToolPins:
        return await self._either(
            lambda: self.shared.tool_pins(scope), lambda: self.local.tool_pins(scope)
        )

    async def pin_tools(
        self, scope: str, seen: Mapping[str, str], changed: Mapping[str, str] = {}
    ) -> ToolPins:
        return await self._either(
            lambda: self.shared.pin_tools(scope, seen, changed),
            lambda: self.local.pin_tools(scope, seen, changed),
        )

    async def accept_tool(self, scope: str, tool: str, fingerprint: str) -> None:
        await self._either(
            lambda: self.shared.accept_tool(scope, tool, fingerprint),
            lambda: self.local.accept_tool(scope, tool, fingerprint),
        )

    def subscribe(self) -> Subscription:
        """Changes of both: the shared store's and this replica's local ones."""
        subscription = super().subscribe()
        for source in (self.shared, self.local):
            subscription.also_from(source)
        return subscription


async def _none() -> None:
    return None


async def _empty() -> list[str]:
    return []


__all__ = ["LocalFallback", "UnknownApproval"]
