"""The shared-state interface every backend implements, and what they have in common.

A backend keeps four things for the gateway, and (on Redis) shares them between replicas:

- **rate limits**: exact sliding windows, all-or-nothing over the limits a request hits
  (`acquire`);
- **approvals**: a held request opens an approval, or joins the pending one of the same request
  (a client's retry); an approver decides it from anywhere (`resolve`) and every request waiting
  for it, on whichever replica, is released at once (`wait`); a request that goes away withdraws
  (`withdraw`) without ending the approval, so a retry can still join it;
- **grants**: time-boxed allowances made by an approval, visible and revocable everywhere;
- **history**: every decision and revocation, newest first; and a stream of changes
  (`subscribe`) for consoles;
- **tool pins**: the fingerprints of MCP tool definitions per destination (first seen, or
  accepted by an approver) and changed definitions waiting for an approver (`pin_tools`,
  `accept_tool`);
- **activity**: short summaries of recently finished flows (no bodies, no secrets), published
  in batches by every replica (`publish_activity`) and read newest first (`activity`); the
  memory backend keeps this process's, Redis everyone's (bounded: `ACTIVITY_SIZE`).

Backends raise `StateUnavailable` when their store cannot be reached; nothing else of theirs
escapes. They never import mitmproxy or the config module.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any, Protocol

from sluicegate.policy.ratelimit import Denied
from sluicegate.state.model import (
    Approval,
    ApprovalRequest,
    Grant,
    GrantKey,
    HistoryEntry,
    Outcome,
    Resolution,
    StateEvent,
)

logger = logging.getLogger("sluicegate.state")

# Finished flows kept in the activity feed (per process in memory, per deployment on Redis).
ACTIVITY_SIZE = 1000


class LimitLike(Protocol):
    """A rate limit: `requests` per `window_seconds` (engine/ratelimit.Limit is one)."""

    @property
    def id(self) -> str: ...
    @property
    def requests(self) -> int: ...
    @property
    def window_seconds(self) -> float: ...


@dataclasses.dataclass(frozen=True)
class ToolPins:
    """MCP tool pins of one destination: tool -> pinned fingerprint, and tool -> the changed
    fingerprint last seen that no approver accepted yet."""

    pinned: dict[str, str]
    changed: dict[str, str]


class StateUnavailable(Exception):
    """The store cannot be reached (or refused us). The message never holds a secret."""


class UnknownApproval(KeyError):
    """No approval has this id (never existed, or forgotten after its retention)."""


class AlreadyResolved(Exception):
    """The approval was already decided, timed out or cancelled; `resolution` says how."""

    def __init__(self, resolution: Resolution) -> None:
        super().__init__(resolution.outcome)
        self.resolution = resolution


class StillWaiting(Exception):
    """`resolve(..., only_if_abandoned=True)`: a request still waits for the approval."""


class UnknownGrant(KeyError):
    """No active grant has this id."""


class Hold:
    """One held request waiting for an approval (its own, or one it joined).

    `created`: this request opened the approval (announce it: one webhook per approval).
    `claimed`: the approval had been approved while no request was waiting; this one takes it.
    """

    def __init__(
        self,
        owner: SharedState,
        approval: Approval,
        *,
        created: bool,
        claimed: Resolution | None = None,
    ) -> None:
        self.owner = owner
        self.approval = approval
        self.created = created
        self.claimed = claimed
        self.future: asyncio.Future[Resolution] = asyncio.get_running_loop().create_future()
        self.withdrawn = False
        if claimed is not None:
            self.future.set_result(claimed)

    @property
    def id(self) -> str:
        return self.approval.id


class Subscription:
    """Changes as they happen, until closed: `async for event in subscription`."""

    def __init__(self, owner: SharedState) -> None:
        self._sets = [owner._subscriptions]
        self._queue: asyncio.Queue[StateEvent | None] = asyncio.Queue(maxsize=10_000)
        self.dropped = 0

    def put(self, event: StateEvent | None) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1

    def __aiter__(self) -> AsyncIterator[StateEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[StateEvent]:
        while True:
            event = await self._queue.get()
            if event is None:
                return
            yield event

    async def get(self, timeout: float | None = None) -> StateEvent | None:
        """The next event; None when closed or nothing came within `timeout` seconds."""
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    def also_from(self, source: SharedState) -> None:
        """Receive the changes of another backend too (a fallback's parts)."""
        source._subscriptions.add(self)
        self._sets.append(source._subscriptions)

    def close(self) -> None:
        for subscriptions in self._sets:
            subscriptions.discard(self)
        self.put(None)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class SharedState(abc.ABC):
    """Approvals, grants, rate limits and decision history, for one deployment.

    Event-loop confined: create, use and close a backend on one running loop.
    """

    #: "memory" or "redis"
    kind: str = ""
    #: whether approvals and grants outlive this process
    durable: bool = False

    def __init__(self, replica: str) -> None:
        self.replica = replica
        self._holds: dict[str, set[Hold]] = {}
        self._subscriptions: set[Subscription] = set()
        self._activity: collections.deque[dict[str, Any]] = collections.deque(maxlen=ACTIVITY_SIZE)
        self._pins: dict[str, ToolPins] = {}

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect (a store that is down is not an error: it is retried on use)."""

    async def close(self) -> None:
        """Release connections; waiting holds are left to their owners' cancellation."""
        for subscription in list(self._subscriptions):
            subscription.close()

    @property
    def available(self) -> bool:
        """Whether the store answered the last time it was asked."""
        return True

    # -- rate limits ----------------------------------------------------------------------------

    @abc.abstractmethod
    async def acquire(self, hits: Sequence[tuple[LimitLike, str]]) -> Denied | None:
        """Count one request against every `(limit, key)`, all-or-nothing; None if admitted.

        A denied request consumes nothing; when several limits deny, the longest wait wins."""

    # -- approvals ------------------------------------------------------------------------------

    @abc.abstractmethod
    async def hold(self, request: ApprovalRequest, *, dedupe: str, timeout: float) -> Hold:
        """Hold a request: join the pending approval of the same request (`dedupe`, see
        `model.request_digest`), take an approval nobody was waiting for, or open a new one that
        expires after `timeout` seconds. The returned hold is waiting (see `wait`)."""

    async def wait(self, hold: Hold, timeout: float) -> Resolution | None:
        """The approval's resolution, or None if none came within `timeout` seconds (the caller
        then resolves it as `timeout`, which returns the decision that raced it, if any)."""
        try:
            return await asyncio.wait_for(asyncio.shield(hold.future), max(timeout, 0.0))
        except TimeoutError:
            return None

    @abc.abstractmethod
    async def withdraw(self, hold: Hold) -> bool:
        """This request no longer waits (its client went away, or the gateway stops). The
        approval stays pending for retries. True when no request waits for it any more."""

    @abc.abstractmethod
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
        """End a pending approval and release every request waiting for it, everywhere.

        Approving with `grant_minutes` also grants the request's (identity, destination, rule)
        for that long, and approves every other pending approval the grant covers. Approving
        while no request waits keeps the approval claimable by the next retry of the same
        request until it expires. `only_if_abandoned`: only if no request waits (`StillWaiting`).
        Raises `UnknownApproval`, or `AlreadyResolved` carrying the earlier resolution."""

    @abc.abstractmethod
    async def pending(self) -> list[Approval]:
        """Pending approvals, oldest first."""

    @abc.abstractmethod
    async def approval(self, approval_id: str) -> Approval | None:
        """One approval, pending or recently decided."""

    @abc.abstractmethod
    async def history(self, limit: int = 100) -> list[HistoryEntry]:
        """Decisions and revocations, newest first."""

    # -- grants -------------------------------------------------------------------------------

    @abc.abstractmethod
    async def grant(self, key: GrantKey) -> Grant | None:
        """The active grant for this (identity, destination, rule), if any."""

    @abc.abstractmethod
    async def granted(self, identity: str, destination: str, rules: Iterable[str]) -> list[str]:
        """Those of `rules` the identity holds an active grant for on this destination."""

    @abc.abstractmethod
    async def grants(self) -> list[Grant]:
        """Active grants, soonest to expire first."""

    @abc.abstractmethod
    async def revoke(self, grant_id: str, *, by: str, reason: str) -> Grant:
        """End a grant now, everywhere. Raises `UnknownGrant`."""

    # -- activity ------------------------------------------------------------------------------

    async def publish_activity(self, entries: Sequence[Mapping[str, Any]]) -> None:
        """Add summaries of finished flows (plain JSON values, oldest first) to the feed and
        tell subscribers with one `activity` event. This process's memory by default."""
        if entries:
            self._activity.extend(dict(e) for e in entries)
            self._emit(StateEvent("activity", replica=self.replica))

    async def activity(self, limit: int = 200) -> list[dict[str, Any]]:
        """Recently finished flows, newest first."""
        items = list(self._activity)[-limit:] if limit > 0 else []
        items.reverse()
        return items

    # -- MCP tool pins (this process's memory by default) ----------------------------------------

    async def tool_pins(self, scope: str) -> ToolPins:
        """The pinned fingerprints of `scope` (a destination), and its unaccepted changes."""
        pins = self._pins.get(scope)
        return ToolPins(dict(pins.pinned), dict(pins.changed)) if pins else ToolPins({}, {})

    async def pin_tools(
        self, scope: str, seen: Mapping[str, str], changed: Mapping[str, str] = {}
    ) -> ToolPins:
        """Pin the tools of `seen` not pinned yet (an existing pin always wins: the first
        definition seen is the trusted one) and note `changed` definitions for approvers."""
        pins = self._pins.setdefault(scope, ToolPins({}, {}))
        for tool, fingerprint in seen.items():
            pins.pinned.setdefault(tool, fingerprint)
        for tool, fingerprint in changed.items():
            if pins.pinned.get(tool) != fingerprint:
                pins.changed[tool] = fingerprint
        return await self.tool_pins(scope)

    async def accept_tool(self, scope: str, tool: str, fingerprint: str) -> None:
        """An approver accepted this definition: it is the pin from now on."""
        pins = self._pins.setdefault(scope, ToolPins({}, {}))
        pins.pinned[tool] = fingerprint
        if pins.changed.get(tool) == fingerprint:
            del pins.changed[tool]

    # -- changes ------------------------------------------------------------------------------

    def subscribe(self) -> Subscription:
        """Every change from now on (from every replica on Redis): approvals pending, joined,
        withdrawn and resolved, grants created and revoked. Close it when done."""
        subscription = Subscription(self)
        self._subscriptions.add(subscription)
        return subscription

    # -- for the backends ---------------------------------------------------------------------

    def _register(self, hold: Hold) -> None:
        if not hold.future.done():
            self._holds.setdefault(hold.id, set()).add(hold)
            hold.future.add_done_callback(lambda _f: self._unregister(hold))

    def _unregister(self, hold: Hold) -> None:
        holds = self._holds.get(hold.id)
        if holds is not None:
            holds.discard(hold)
            if not holds:
                del self._holds[hold.id]

    def _release(self, resolution: Resolution) -> int:
        """Hand a resolution to this process's holds of that approval."""
        holds = self._holds.pop(resolution.approval_id, set())
        for hold in holds:
            if not hold.future.done():
                hold.future.set_result(resolution)
        return len(holds)

    def _emit(self, event: StateEvent) -> None:
        if event.kind == "approval_resolved" and event.resolution is not None:
            self._release(event.resolution)
        for subscription in list(self._subscriptions):
            subscription.put(event)

    @property
    def waiting_here(self) -> dict[str, int]:
        """Approval id -> requests of this process waiting for it."""
        return {k: len(v) for k, v in self._holds.items() if v}


@contextlib.asynccontextmanager
async def opened(state: SharedState) -> AsyncIterator[SharedState]:
    await state.start()
    try:
        yield state
    finally:
        await state.close()
