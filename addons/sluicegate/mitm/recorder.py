"""Recorder: every finished flow goes to a per-identity session file, as the agent saw it.

Last in the chain, so it sees the request as it left (credential already masked back to its
marker by injection, bodies redacted) and the response as the agent got it. Flows are recorded
when they finish: `response` (and answers the gateway gave itself), `error`,
`http_connect_error` (a refused CONNECT, e.g. 407) and `websocket_end`. The record is written and
flushed before mitmproxy sends the response on, so a client that got its answer has its flow on
disk.

Failing closed: `requestheaders` checks that recording works before anything is forwarded. With
`on_failure: refuse` (default) a request is answered 503 `recording_unavailable` while it does not,
and a response that could not be recorded is withheld the same way; with `continue` each
unrecorded flow is logged as an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Set
from typing import Any

from mitmproxy import ctx, http

from sluicegate import config as config_mod
from sluicegate.mitm import flowstate, guard
from sluicegate.mitm.base import GatewayAddon
from sluicegate.mitm.console import WIRING as CONSOLE
from sluicegate.mitm.snapshot import (
    ConnectionStates,
    SnapshotLeak,
    SnapshotPolicy,
    audit_entry,
    snapshot,
)
from sluicegate.recording import chain, sealing
from sluicegate.recording import lock as recording_lock
from sluicegate.recording.audit import AuditLog, Prepared
from sluicegate.recording.store import Limits, RecordingUnavailable, SessionStore

logger = logging.getLogger("sluicegate.recorder")

TICK_SECONDS = 1.0
RETENTION_EVERY_SECONDS = 60.0
UNAVAILABLE_MESSAGE = (
    "The gateway cannot record traffic right now, so nothing is forwarded. Retry later."
)


class Recorder(GatewayAddon):
    name = "sluicegate-recorder"

    def __init__(self) -> None:
        self.store: SessionStore | None = None
        self.audit: AuditLog | None = None
        self.policy: SnapshotPolicy | None = None
        self.refuse_on_failure = True
        self.in_flight: weakref.WeakValueDictionary[str, http.HTTPFlow] = (
            weakref.WeakValueDictionary()
        )
        self.connections = ConnectionStates()
        self._ticker: asyncio.Task[None] | None = None
        self._next_retention = 0.0

    # -- lifecycle ----------------------------------------------------------------------------

    def configure(self, updated: Set[str]) -> None:
        super().configure(updated)
        if self.config is None:
            self._close("unconfigured")

    def apply(self, config: config_mod.Config) -> None:
        section = config.recording
        self._close("reconfigured")
        if section is None or not section.enabled:
            flowstate.keep_originals = False
            if section is None:
                logger.warning(
                    "sluicegate: recording is disabled (no `recording:` section): flows are NOT "
                    "recorded. Add one (see docs/ARCHITECTURE.md, 'Recording')."
                )
            return
        # One gateway process per directory: a second one refuses to start (lock.py).
        recording_lock.acquire(section.directory)
        recording_lock.release_others(section.directory)
        signer = chain.Signer.from_pem(section.signing_key.read())
        sealer = None
        if section.seal_to is not None:
            sealer = sealing.Sealer(sealing.load_public_key(section.seal_to.read_bytes()))
        limits = Limits(
            rotate_bytes=section.rotate_bytes,
            rotate_seconds=section.rotate_seconds,
            idle_seconds=section.idle_seconds,
            retention_seconds=(
                section.retention_days * 86400 if section.retention_days is not None else None
            ),
            retention_bytes=section.retention_bytes,
            min_free_bytes=section.min_free_bytes,
            fsync=section.fsync,
        )
        store = SessionStore(
            section.directory,
            signer,
            limits,
            gateway=config.gateway.name,
            audit_log=section.audit_log_path,
        )
        audit = AuditLog(section.audit_log_path, fsync=section.fsync, run=store.index.run)
        store.audit_state = lambda: audit.state
        store.enforce_retention()
        self.store, self.audit = store, audit
        CONSOLE.audit_log = audit  # console events (sign-ins, decisions, views) go here too
        self.policy = SnapshotPolicy(
            mask_headers=frozenset(h.lower() for h in section.mask_headers),
            gateway_name=config.gateway.name,
            sealer=sealer,
        )
        self.refuse_on_failure = section.on_failure == "refuse"
        flowstate.keep_originals = sealer is not None
        logger.info(
            "sluicegate: recording to %s (signing key %s%s)",
            section.directory,
            signer.key_id,
            f", sealing originals to {sealer.key_id}" if sealer else "",
        )

    def running(self) -> None:
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick_forever())

    async def _tick_forever(self) -> None:
        """Close sessions past their age or idle time, and apply retention, in the background."""
        while True:
            await asyncio.sleep(TICK_SECONDS)
            store = self.store
            if store is None:
                continue
            try:
                store.tick()
                if time.monotonic() >= self._next_retention:
                    self._next_retention = time.monotonic() + RETENTION_EVERY_SECONDS
                    store.enforce_retention()
            except Exception as e:  # keep ticking; the failure is visible in the log
                logger.error("sluicegate: recording maintenance failed: %s", type(e).__name__)

    def done(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if self.store is not None and ctx.master.should_exit.is_set():
            # Shutting down: flows still in flight are recorded as they are. (On a script
            # reload they are left to the new recorder, which records them when they finish.)
            for flow in list(self.in_flight.values()):
                self._record(flow, "shutdown")
        self._close("shutdown")
        super().done()

    def _close(self, reason: str) -> None:
        if self.store is not None:
            self.store.close(reason)
        if self.audit is not None:
            if CONSOLE.audit_log is self.audit:
                CONSOLE.audit_log = None
            self.audit.close()
        self.store = self.audit = None

    # -- hooks --------------------------------------------------------------------------------

    @guard.fail_closed("gateway_error")
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Refuse before anything is forwarded when the flow could not be recorded."""
        if self.store is None:
            return
        try:
            self.store.ready()
        except RecordingUnavailable as e:
            self._unavailable(flow, e)
        self.in_flight[flow.id] = flow

    @guard.fail_closed("gateway_error", skip_refused=False)
    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is not None:
            return  # recorded with its messages at websocket_end
        failure = self._record(flow, "response")
        if failure is not None:
            self._unavailable(flow, failure)

    @guard.fail_closed("gateway_error", skip_refused=False)
    def error(self, flow: http.HTTPFlow) -> None:
        self._record(flow, "error")

    @guard.fail_closed("gateway_error", skip_refused=False)
    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        self._record(flow, "http_connect_error")

    @guard.fail_closed("gateway_error", skip_refused=False)
    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._record(flow, "websocket_end")

    # -- recording ----------------------------------------------------------------------------

    def _unavailable(self, flow: http.HTTPFlow, failure: RecordingUnavailable) -> None:
        if self.refuse_on_failure:
            raise guard.GatewayRefusal(
                503, "recording_unavailable", UNAVAILABLE_MESSAGE, {"retry-after": "5"}
            )
        logger.error(
            "sluicegate: recording unavailable (%s); on_failure=continue forwards %s, "
            "UNRECORDED unless writing works again by its end",
            failure.code,
            flow.id,
        )

    def _record(self, flow: http.HTTPFlow, event: str) -> RecordingUnavailable | None:
        """Write `flow` once; the failure (already logged) if it could not be recorded."""
        store, audit, policy = self.store, self.audit, self.policy
        if store is None or audit is None or policy is None:
            return None
        st = flowstate.state(flow)
        if st.recorded is not None:
            return None
        self.in_flight.pop(flow.id, None)
        try:
            snap = snapshot(flow, policy, event=event, connections=self.connections)
        except SnapshotLeak:
            return self._lost(flow, RecordingUnavailable("recording_scrub_failed", "not masked"))
        except (ValueError, TypeError) as e:
            logger.error(
                "sluicegate: recording: cannot serialize %s (%s)", flow.id, type(e).__name__
            )
            return self._lost(flow, RecordingUnavailable("recording_unserializable", "bad flow"))
        if snap.errors:
            # Another addon put something non-plain into flow.metadata: recorded as a marker.
            logger.error(
                "sluicegate: recording: flow %s has metadata mitmproxy cannot save: %s",
                flow.id,
                "; ".join(snap.errors),
            )
        prepared: list[Prepared] = []
        entries: list[dict[str, Any]] = []

        def audit_line(session: str, index: int) -> str:
            # The audit line is built first: its hash is chained into the flow's chain entry.
            entries.append(audit_entry(snap, session, index))
            line = audit.prepare(entries[-1])
            prepared.append(line)
            return line.hash

        try:
            receipt = store.write(snap.identity, flow.id, snap.record, audit_line)
            st.recorded = receipt
            audit.commit(prepared[-1])
        except RecordingUnavailable as e:
            store.fail(e.code, e.message)
            return self._lost(flow, e)
        CONSOLE.publish(entries[-1], snap.meta)
        return None

    def _lost(self, flow: http.HTTPFlow, failure: RecordingUnavailable) -> RecordingUnavailable:
        logger.error("sluicegate: recording FAILED for %s: %s", flow.id, failure.code)
        return failure
