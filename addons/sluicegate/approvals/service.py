"""Approvals over the shared state: holding a request until a decision, timeouts, requests that
go away and come back (SDK retries), decisions and notifications.

- A held request joins the pending approval of the same request (same caller, route, method,
  path and body: `state.request_digest`), so an SDK's retries make one approval and one webhook.
- A request whose client goes away withdraws; the approval stays pending for
  `retry_grace_seconds`, so a retry can join it. If none comes (and nobody decided), it is
  cancelled and the webhook told so.
- When the approval expires the waiting request gets `timeout` (one replica resolves it, and
  tells the webhook); a decision that raced the timeout wins.
- An approval decided while no request was waiting is taken by the next retry of that request.

No mitmproxy, no config: the Policy addon builds it from the config and wires it to flows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from sluicegate.approvals.payloads import Notice
from sluicegate.state import (
    AlreadyResolved,
    Approval,
    ApprovalRequest,
    Grant,
    Hold,
    Resolution,
    SharedState,
    StateUnavailable,
    StillWaiting,
    UnknownApproval,
)

logger = logging.getLogger("sluicegate.approvals")

Notifier = Callable[[Notice], None]


class Approvals:
    """Event-loop confined, like the state it runs on."""

    def __init__(
        self,
        state: SharedState,
        *,
        notifier: Notifier | None = None,
        link_template: str | None = None,
        retry_grace_seconds: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = state
        self.notifier = notifier
        self.link_template = link_template
        self.retry_grace_seconds = retry_grace_seconds
        self._clock = clock
        self._by_client: dict[str, set[Hold]] = {}
        self._timers: set[asyncio.TimerHandle] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- held requests ------------------------------------------------------------------------

    async def hold(
        self,
        request: ApprovalRequest,
        *,
        dedupe: str,
        timeout: float,
        client_id: str | None = None,
    ) -> Resolution:
        """Wait for the request's approval. Raises StateUnavailable if the state cannot hold it."""
        hold = await self.state.hold(request, dedupe=dedupe, timeout=timeout)
        approval = hold.approval
        if hold.claimed is not None:
            logger.info(
                "sluicegate: approval %s (approved earlier) taken by a retry [request %s]",
                hold.id,
                request.request_id,
            )
            return hold.claimed
        if hold.created:
            logger.info(
                "sluicegate: approval %s pending (rule %s) [request %s]",
                hold.id,
                request.rule_id,
                request.request_id,
            )
            self._notify(approval)
        else:
            logger.info(
                "sluicegate: approval %s joined by a retry (attempt %d) [request %s]",
                hold.id,
                approval.attempts,
                request.request_id,
            )
        if client_id is not None:
            self._by_client.setdefault(client_id, set()).add(hold)
        try:
            resolution = await hold.owner.wait(hold, approval.expires_at - self._clock())
            if resolution is None:
                resolution = await self._expire(hold, timeout)
            return resolution
        except asyncio.CancelledError:
            # The gateway stops (or unloads the script): this request stops waiting. On a
            # durable state the approval stays pending for a retry through another replica.
            self._spawn(self._stopped(hold))
            raise
        finally:
            if client_id is not None:
                holds = self._by_client.get(client_id)
                if holds is not None:
                    holds.discard(hold)
                    if not holds:
                        del self._by_client[client_id]

    async def _expire(self, hold: Hold, timeout: float) -> Resolution:
        reason = f"no approver decided within {timeout:g} seconds"
        try:
            resolution = await hold.owner.resolve(hold.id, "timeout", reason=reason)
        except AlreadyResolved as e:
            return e.resolution  # decided (or expired by another replica) just in time
        except (UnknownApproval, StateUnavailable):
            # Unknown to (or unreachable) state: this request times out all the same.
            return Resolution(hold.id, "timeout", self._clock(), reason=reason)
        self._notify(hold.approval, resolution)
        return resolution

    def cancel_client(self, client_id: str) -> int:
        """The client of these requests went away: they stop waiting (their approvals stay
        pending for `retry_grace_seconds`, for a retry to join)."""
        holds = self._by_client.pop(client_id, set())
        for hold in holds:
            if not hold.future.done():
                hold.future.set_result(
                    Resolution(hold.id, "cancelled", self._clock(), reason="client disconnected")
                )
            self._spawn(self._withdraw(hold))
        return len(holds)

    async def _withdraw(self, hold: Hold) -> None:
        try:
            abandoned = await hold.owner.withdraw(hold)
        except StateUnavailable:
            return  # it expires by itself
        if abandoned:
            loop = asyncio.get_running_loop()
            handle: asyncio.TimerHandle | None = None

            def fire() -> None:
                if handle is not None:
                    self._timers.discard(handle)
                self._spawn(self._abandon(hold))

            handle = loop.call_later(self.retry_grace_seconds, fire)
            self._timers.add(handle)

    async def _abandon(self, hold: Hold) -> None:
        approval = hold.approval
        reason = (
            "the request was withdrawn (its client disconnected) and not retried within "
            f"{self.retry_grace_seconds:g} seconds"
        )
        try:
            resolution = await hold.owner.resolve(
                approval.id, "cancelled", reason=reason, only_if_abandoned=True
            )
        except (StillWaiting, AlreadyResolved, UnknownApproval, StateUnavailable):
            return
        logger.info("sluicegate: approval %s cancelled: %s", approval.id, reason)
        self._notify(approval, resolution)

    async def _stopped(self, hold: Hold) -> None:
        with contextlib.suppress(StateUnavailable):
            await hold.owner.withdraw(hold)
            if not hold.owner.durable:
                with contextlib.suppress(AlreadyResolved, UnknownApproval, StillWaiting):
                    await hold.owner.resolve(hold.id, "cancelled", reason="shutdown")

    # -- decisions ----------------------------------------------------------------------------

    async def decide(
        self,
        approval_id: str,
        *,
        approve: bool,
        by: str,
        reason: str,
        grant_minutes: float | None = None,
    ) -> Resolution:
        """Raises UnknownApproval, AlreadyResolved or StateUnavailable."""
        resolution = await self.state.resolve(
            approval_id,
            "approved" if approve else "denied",
            by=by,
            reason=reason,
            grant_minutes=grant_minutes if approve else None,
        )
        logger.info(
            "sluicegate: approval %s %s by %s%s",
            approval_id,
            resolution.outcome,
            by,
            f" (grant {grant_minutes:g} min)" if resolution.grant_minutes else "",
        )
        with contextlib.suppress(StateUnavailable):
            approval = await self.state.approval(approval_id)
            if approval is not None:
                self._notify(approval, resolution)
        return resolution

    async def revoke(self, grant_id: str, *, by: str, reason: str) -> Grant:
        grant = await self.state.revoke(grant_id, by=by, reason=reason)
        logger.info(
            "sluicegate: grant %s (approval %s) revoked by %s", grant.id, grant.approval_id, by
        )
        return grant

    # -- notifications ------------------------------------------------------------------------

    def link(self, approval_id: str) -> str | None:
        if not self.link_template:
            return None
        return self.link_template.replace("{id}", approval_id)

    def _notify(self, approval: Approval, resolution: Resolution | None = None) -> None:
        if self.notifier is None:
            return
        self.notifier(
            Notice(
                approval,
                resolution,
                link=self.link(approval.id),
                retry_grace_seconds=self.retry_grace_seconds,
            )
        )

    # -- housekeeping -------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        """Stop pending grace timers (their approvals expire by themselves)."""
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
