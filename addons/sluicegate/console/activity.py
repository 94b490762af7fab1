"""The activity feed: short summaries of finished flows, for the console's Activity view.

The recorder publishes one summary per recorded flow (`publish`, synchronous and cheap: it runs
in mitmproxy's hooks); the feed hands them to the shared state in batches a few times a second
(`SharedState.publish_activity`), so with `state.backend: redis` every replica's console shows
every replica's flows, and with the memory backend this process's. Summaries hold what the audit
log holds (caller, route, method, host, path without query, status, decision, counts per rule),
never a body, a header value or a query string. Publishing never fails a flow: when the state is
unreachable the batch is dropped (the recording is the record) and that is logged once a minute.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from sluicegate.state import SharedState, StateUnavailable

logger = logging.getLogger("sluicegate.console")

FLUSH_SECONDS = 0.25
MAX_PENDING = 2000
WARN_EVERY = 60.0


def summary(audit: Mapping[str, Any], meta: Mapping[str, Any], replica: str) -> dict[str, Any]:
    """The feed's entry for a recorded flow: its audit line plus counts per rule and side, and
    how a stream ended."""
    redaction = meta.get("redaction")
    stream = meta.get("stream")
    websocket = meta.get("websocket")
    per_side: dict[str, dict[str, int]] = {}
    if isinstance(redaction, dict):
        for side in ("request", "response"):
            counts = redaction.get(side)
            if isinstance(counts, dict) and counts:
                per_side[side] = {str(k): int(v) for k, v in counts.items() if isinstance(v, int)}
    policy = meta.get("policy")
    policy_rules: set[str] = set()
    if isinstance(policy, dict):
        for phase in ("request", "response"):
            facts = policy.get(phase)
            if isinstance(facts, dict) and facts.get("rule") and facts.get("action") != "allow":
                policy_rules.add(str(facts["rule"]))
    return {
        "time": audit.get("time"),
        "flow_id": audit.get("flow_id"),
        "request_id": audit.get("request_id"),
        "identity": audit.get("identity"),
        "groups": list(audit.get("groups") or []),
        "route": audit.get("route"),
        "method": audit.get("method"),
        "host": audit.get("host"),
        "port": audit.get("port"),
        "path": audit.get("path"),
        "status": audit.get("status"),
        "decision": audit.get("decision"),
        "refusal": audit.get("refusal"),
        "error": audit.get("error"),
        "duration_ms": audit.get("duration_ms"),
        "rules": dict(audit.get("rules") or {}),
        "redaction": per_side,
        "policy_rules": sorted(policy_rules),
        "stream_cut": stream.get("cut") if isinstance(stream, dict) else None,
        "websocket_closed": bool(websocket.get("closed_by_gateway"))
        if isinstance(websocket, dict)
        else False,
        "session": audit.get("session"),
        "index": audit.get("index"),
        "replica": replica,
    }


class ActivityFeed:
    def __init__(
        self,
        state: Callable[[], SharedState | None],
        *,
        flush_seconds: float = FLUSH_SECONDS,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self._state = state
        self.flush_seconds = flush_seconds
        self.max_pending = max_pending
        self._pending: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._warned = 0.0
        self.dropped = 0

    def publish(self, entry: dict[str, Any]) -> None:
        """Queue one summary (never raises; flushed on the running event loop)."""
        self._pending.append(entry)
        if len(self._pending) > self.max_pending:
            del self._pending[: len(self._pending) - self.max_pending]
            self.dropped += 1
        if self._task is None or self._task.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop (unit tests of the recorder): flushed with the next one
            self._task = loop.create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(self.flush_seconds)
        await self.flush()

    async def flush(self) -> None:
        batch, self._pending = self._pending, []
        state = self._state()
        if not batch or state is None:
            return
        try:
            await state.publish_activity(batch)
        except StateUnavailable as e:
            self._warn(str(e))
        except Exception as e:  # the feed is a convenience: never let it break anything
            self._warn(type(e).__name__)

    def _warn(self, reason: str) -> None:
        now = time.monotonic()
        if now - self._warned >= WARN_EVERY:
            self._warned = now
            logger.warning("sluicegate: console activity feed: batch dropped (%s)", reason)
