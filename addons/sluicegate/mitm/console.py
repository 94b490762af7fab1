"""Wiring of the web console (`sluicegate.console`) into the gateway process.

- The Policy addon owns the control listener; it mounts `WIRING` at `/console` and hands it
  each config (`configure`), so a reload rebuilds the console without rebinding the port.
- The Recorder hands over its audit log (`WIRING.audit_log`), so console events (sign-ins,
  decisions, views of recordings) go to the same JSON-lines audit log as flows, and publishes
  each recorded flow's summary to the activity feed (`WIRING.publish`).

Module-level state survives hot reloads of the `-s` script, like the shared state's runtime.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from sluicegate import config as config_mod
from sluicegate.approvals.service import Approvals
from sluicegate.console import ActivityFeed, Console, ConsoleSettings, Recordings
from sluicegate.console.activity import summary
from sluicegate.control.listener import Request, Response
from sluicegate.recording import chain
from sluicegate.recording.audit import AuditLog
from sluicegate.recording.store import RecordingUnavailable
from sluicegate.state import SharedState

logger = logging.getLogger("sluicegate.console")


class ConsoleWiring:
    def __init__(self) -> None:
        self.console: Console | None = None
        self.audit_log: AuditLog | None = None
        self.state: SharedState | None = None
        self.replica = ""
        self.feed = ActivityFeed(lambda: self.state)
        self._recordings: Recordings | None = None

    # -- the console --------------------------------------------------------------------------

    def configure(self, config: config_mod.Config, approvals: Approvals, replica: str) -> None:
        self.state = approvals.state
        self.replica = replica
        section, settings = config.console, config.approvals
        if section is None or not section.enabled or settings is None:
            self.console = None
            return
        verify = None
        if section.approvers or section.investigators:
            verifier = config_mod.build_verifier(config.auth)
            verify = verifier.averify
        recordings = None
        if config.recording is not None and config.recording.enabled:
            key = chain.Signer.from_pem(config.recording.signing_key.read()).public_key
            previous = self._recordings
            if previous is not None and previous.directory == config.recording.directory:
                previous.trusted_key = key
                recordings = previous
            else:
                recordings = Recordings(config.recording.directory, key)
        self._recordings = recordings
        console = Console(
            ConsoleSettings(
                admin_token=settings.admin_token.read,
                approvers=frozenset(section.approvers),
                investigators=frozenset(section.investigators),
                session_seconds=section.session_minutes * 60,
                secure_cookie=section.secure_cookie,
                allowed_hosts=section.allowed_hosts,
                require_reason=settings.require_reason,
                max_grant_minutes=settings.max_grant_minutes,
                gateway_name=config.gateway.name,
            ),
            approvals,
            audit=self.audit,
            verify=verify,
            recordings=recordings,
        )
        if self.console is not None:  # sign-outs stay signed out across a reload
            console.sessions.inherit(self.console.sessions)
        self.console = console

    async def __call__(self, request: Request) -> Response:
        console = self.console
        if console is None:
            return Response.json(404, {"error": "not_found", "message": "the console is off"})
        return await console(request)

    # -- audit and activity -------------------------------------------------------------------

    def audit(self, entry: dict[str, Any]) -> None:
        log = self.audit_log
        if log is None:
            logger.info("sluicegate: console audit: %s", json.dumps(entry, sort_keys=True))
            return
        try:
            log.write(entry)
        except RecordingUnavailable:
            logger.error("sluicegate: console audit line could not be written: %s", entry)

    def publish(self, audit_line: dict[str, Any], meta: dict[str, Any]) -> None:
        """A recorded flow, for the Activity view (never raises; nothing without a console)."""
        if self.console is None:
            return
        try:
            self.feed.publish(summary(audit_line, meta, self.replica))
        except Exception:
            logger.exception("sluicegate: console activity feed: entry dropped")


WIRING = ConsoleWiring()
