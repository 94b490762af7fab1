"""Shared state of a deployment: approvals, grants, rate limits and decision history.

An engine: no mitmproxy, no config module. The interface is `SharedState` (base.py); backends:

- `MemoryState` (memory.py): this process only, the embedded default (one replica);
- `RedisState` (redis_backend.py): one state for every replica, atomic Lua scripts, pub/sub
  for decisions; `RedisSettings` says how to reach it (URL, password provider, TLS, key prefix);
- `LocalFallback` (fallback.py): Redis, or this replica's memory while Redis is unreachable
  (`on_unavailable: local`). With `refuse`, callers get `StateUnavailable` and answer 503.

For a console (or any other client of approvals), everything is here and backend-neutral:

    state.pending()                        pending approvals with details (`Approval.as_json()`)
    state.approval(id)                     one approval, pending or recently decided
    state.resolve(id, "approved"|"denied", by=approver, reason=..., grant_minutes=...)
    state.grants() / state.revoke(grant_id, by=..., reason=...)
    state.history(limit)                   decisions and revocations, newest first
    async with state.subscribe() as sub:   every change, from every replica
        async for event in sub: ...

Approver identity (`by`) is whatever the caller authenticated; the state records it as given.
"""

from __future__ import annotations

from sluicegate.state.base import (
    AlreadyResolved,
    Hold,
    LimitLike,
    SharedState,
    StateUnavailable,
    StillWaiting,
    Subscription,
    ToolPins,
    UnknownApproval,
    UnknownGrant,
)
from sluicegate.state.fallback import LocalFallback
from sluicegate.state.memory import MemoryState
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
    iso,
    request_digest,
)
from sluicegate.state.redis_backend import RedisSettings, RedisState

__all__ = [
    "AlreadyResolved",
    "Approval",
    "ApprovalRequest",
    "Grant",
    "GrantKey",
    "HistoryEntry",
    "Hold",
    "LimitLike",
    "LocalFallback",
    "MemoryState",
    "Outcome",
    "RedisSettings",
    "RedisState",
    "Resolution",
    "SharedState",
    "StateEvent",
    "StateUnavailable",
    "StillWaiting",
    "Subscription",
    "ToolPins",
    "UnknownApproval",
    "UnknownGrant",
    "grant_id",
    "iso",
    "request_digest",
]
