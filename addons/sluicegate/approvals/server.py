"""The approvals control API, mounted at `/v1` on the control listener (`control/listener.py`).

Protected by an admin token compared in constant time. It answers from the shared state, so with
`state.backend: redis` every replica's API lists and decides every replica's approvals:

    GET  /v1/approvals                   pending approvals, oldest first (with details)
    GET  /v1/approvals/<id>              one approval, pending or recently decided
    POST /v1/approvals/<id>/approve      {"approver", "reason", "grant_minutes"?}
    POST /v1/approvals/<id>/deny         {"approver", "reason"}
    GET  /v1/grants                      active grants
    POST /v1/grants/<id>/revoke          {"approver", "reason"}
    GET  /v1/history?limit=N             decisions and revocations, newest first
    GET  /v1/state                       backend, replica, whether the store is reachable
    GET  /v1/mcp/pins?route=NAME         pinned MCP tool fingerprints, changes not accepted yet
    POST /v1/mcp/pins/accept             {"route", "tool", "approver", "reason"}: accept a change

The approver name is what the approver says it is: the admin token is the only authentication.
A reason is required unless `approvals.require_reason` is off. When the shared state is
unreachable, answers are 503 `state_unavailable`. No module here imports mitmproxy.
"""

from __future__ import annotations

import datetime
import hmac
import json
import logging
import math
import re
import urllib.parse
from collections.abc import Callable
from typing import Any

from sluicegate.approvals.service import Approvals
from sluicegate.control.listener import ControlListener, Handler, Request, Response
from sluicegate.secrets import SecretRef, SecretUnavailable
from sluicegate.state import AlreadyResolved, StateUnavailable, UnknownApproval, UnknownGrant

logger = logging.getLogger("sluicegate.approvals")


MAX_TEXT = 500
_ID = re.compile(r"[0-9a-f]{8,32}")


class ControlServer:
    """The control listener with the approvals API at `/v1`; `mount()` adds more (the console).

    `start()` binds synchronously (so a taken port is reported at once, and mitmdump refuses to
    start) and serves on the running event loop; `stop()` closes the listening socket at once, so
    a reloaded script can bind the same port again.
    """

    def __init__(
        self,
        approvals: Approvals,
        *,
        host: str,
        port: int,
        admin_token: SecretRef,
        max_grant_minutes: float,
        require_reason: bool = True,
        audit: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.approvals = approvals
        self.audit = audit
        self.require_reason = require_reason
        self.admin_token = admin_token
        self.max_grant_minutes = max_grant_minutes
        self.listener = ControlListener(host, port)
        self.listener.mount("/v1", self._api)

    @property
    def host(self) -> str:
        return self.listener.host

    @property
    def port(self) -> int | None:
        return self.listener.port

    @property
    def listening(self) -> bool:
        return self.listener.listening

    def start(self) -> int:
        return self.listener.start()

    def stop(self) -> None:
        self.listener.stop()

    def mount(self, prefix: str, handler: Handler) -> None:
        """Serve `handler` under `prefix` on the same listener (see control/listener.py)."""
        self.listener.mount(prefix, handler)

    async def _api(self, request: Request) -> Response:
        status, payload = await self.dispatch(
            request.method, request.target, request.headers, request.body, request.peer
        )
        headers = []
        if status == 401:
            headers.append(("www-authenticate", 'Bearer realm="sluicegate-approvals"'))
        return Response.json(status, payload, headers)

    async def dispatch(
        self, method: str, target: str, headers: dict[str, str], body: bytes, peer: str = ""
    ) -> tuple[int, dict[str, Any]]:
        """Answer one request: (status, JSON payload). Authentication comes first, always."""
        if not self._authorized(headers.get("authorization", "")):
            logger.warning("sluicegate: approvals API: rejected unauthenticated request (%s)", peer)
            return 401, {"error": "unauthorized", "message": "a valid admin token is required"}
        split = urllib.parse.urlsplit(target)
        path = split.path.rstrip("/")
        try:
            return await self._route(method, path, split.query, body)
        except StateUnavailable as e:
            return 503, {"error": "state_unavailable", "message": str(e)}

    async def _route(
        self, method: str, path: str, query: str, body: bytes
    ) -> tuple[int, dict[str, Any]]:
        state = self.approvals.state
        if path in ("/v1/approvals", "/v1/grants", "/v1/history", "/v1/state"):
            if method != "GET":
                return 405, {"error": "method_not_allowed", "message": "use GET"}
            if path == "/v1/approvals":
                return 200, {"approvals": [a.as_json() for a in await state.pending()]}
            if path == "/v1/grants":
                return 200, {"grants": [g.as_json() for g in await state.grants()]}
            if path == "/v1/state":
                return 200, {
                    "backend": state.kind,
                    "replica": state.replica,
                    "available": state.available,
                    "durable": state.durable,
                }
            limit = _limit(query)
            if limit is None:
                return 400, {"error": "bad_request", "message": "limit must be 1-1000"}
            return 200, {"history": [h.as_json() for h in await state.history(limit)]}
        if path == "/v1/mcp/pins":
            if method != "GET":
                return 405, {"error": "method_not_allowed", "message": "use GET"}
            route = urllib.parse.parse_qs(query).get("route", [""])[0]
            if not route:
                return 400, {"error": "bad_request", "message": "route is required"}
            pins = await state.tool_pins(f"route:{route}")
            return 200, {"route": route, "pinned": pins.pinned, "changed": pins.changed}
        if path == "/v1/mcp/pins/accept":
            if method != "POST":
                return 405, {"error": "method_not_allowed", "message": "use POST"}
            return await self._accept_tool(body)
        m = re.fullmatch(r"/v1/approvals/([^/]+)", path)
        if m is not None:
            if method != "GET":
                return 405, {"error": "method_not_allowed", "message": "use GET"}
            approval = await state.approval(m.group(1)) if _ID.fullmatch(m.group(1)) else None
            if approval is None:
                return 404, {"error": "unknown_approval", "message": "no such approval"}
            return 200, {"approval": approval.as_json()}
        m = re.fullmatch(r"/v1/approvals/([^/]+)/(approve|deny)", path)
        if m is not None:
            if method != "POST":
                return 405, {"error": "method_not_allowed", "message": "use POST"}
            return await self._decide(m.group(1), m.group(2) == "approve", body)
        m = re.fullmatch(r"/v1/grants/([^/]+)/revoke", path)
        if m is not None:
            if method != "POST":
                return 405, {"error": "method_not_allowed", "message": "use POST"}
            return await self._revoke(m.group(1), body)
        return 404, {"error": "not_found", "message": "no such endpoint"}

    def _decision_body(
        self, body: bytes, allowed: set[str]
    ) -> tuple[dict[str, Any], str, str] | tuple[int, dict[str, Any]]:
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            return 400, {"error": "bad_request", "message": "body must be JSON"}
        if not isinstance(data, dict):
            return 400, {"error": "bad_request", "message": "body must be a JSON object"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            return 400, {"error": "bad_request", "message": f"unknown fields: {unknown}"}
        approver = _clean(data.get("approver"))
        reason = _clean(data.get("reason"))
        if not approver:
            return 400, {"error": "bad_request", "message": "approver is required"}
        if self.require_reason and not reason:
            return 400, {"error": "bad_request", "message": "approver and reason are required"}
        return data, approver, reason

    async def _decide(
        self, approval_id: str, approve: bool, body: bytes
    ) -> tuple[int, dict[str, Any]]:
        parsed = self._decision_body(body, {"approver", "reason", "grant_minutes"})
        if len(parsed) == 2:
            return parsed
        data, approver, reason = parsed
        grant = data.get("grant_minutes")
        if grant is not None:
            if not approve:
                return 400, {"error": "bad_request", "message": "only an approval can grant"}
            if (
                isinstance(grant, bool)
                or not isinstance(grant, (int, float))
                or not math.isfinite(grant)
                or not 0 < grant <= self.max_grant_minutes
            ):
                limit = f"{self.max_grant_minutes:g}"
                message = f"grant_minutes must be a number above 0 and at most {limit}"
                return 400, {"error": "bad_request", "message": message}
        if not _ID.fullmatch(approval_id):
            return 404, {"error": "unknown_approval", "message": "no such pending approval"}
        try:
            resolution = await self.approvals.decide(
                approval_id,
                approve=approve,
                by=approver,
                reason=reason,
                grant_minutes=float(grant) if grant is not None else None,
            )
        except UnknownApproval:
            return 404, {"error": "unknown_approval", "message": "no such pending approval"}
        except AlreadyResolved as e:
            return 409, {
                "error": "already_decided",
                "message": f"the approval was already {e.resolution.outcome}",
                "resolution": e.resolution.as_metadata(),
            }
        self._audit(
            "decide",
            approver,
            approval_id=approval_id,
            outcome=resolution.outcome,
            reason=reason,
            grant_minutes=resolution.grant_minutes,
        )
        return 200, resolution.as_metadata()

    async def _revoke(self, grant_id: str, body: bytes) -> tuple[int, dict[str, Any]]:
        parsed = self._decision_body(body, {"approver", "reason"})
        if len(parsed) == 2:
            return parsed
        _data, approver, reason = parsed
        if not re.fullmatch(r"[0-9a-f]{16}", grant_id):
            return 404, {"error": "unknown_grant", "message": "no such active grant"}
        try:
            grant = await self.approvals.revoke(grant_id, by=approver, reason=reason)
        except UnknownGrant:
            return 404, {"error": "unknown_grant", "message": "no such active grant"}
        self._audit(
            "revoke", approver, grant_id=grant_id, approval_id=grant.approval_id, reason=reason
        )
        return 200, {"revoked": grant.as_json(), "by": approver, "reason": reason}

    async def _accept_tool(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """Accept the changed definition of an MCP tool (the one last seen) as its new pin."""
        parsed = self._decision_body(body, {"approver", "reason", "route", "tool"})
        if len(parsed) == 2:
            return parsed
        data, approver, reason = parsed
        route, tool = data.get("route"), data.get("tool")
        if not isinstance(route, str) or not isinstance(tool, str) or not route or not tool:
            return 400, {"error": "bad_request", "message": "route and tool are required"}
        scope = f"route:{route}"
        state = self.approvals.state
        fingerprint = (await state.tool_pins(scope)).changed.get(tool)
        if fingerprint is None:
            return 404, {"error": "no_change", "message": "no changed definition of this tool"}
        await state.accept_tool(scope, tool, fingerprint)
        logger.info(
            "sluicegate: approvals API: MCP tool %s on route %s accepted by %s",
            _clean(tool),
            _clean(route),
            approver,
        )
        self._audit(
            "mcp_accept", approver, route=route, tool=tool, fingerprint=fingerprint, reason=reason
        )
        return 200, {"route": route, "tool": tool, "fingerprint": fingerprint, "by": approver}

    def _audit(self, action: str, approver: str, **fields: Any) -> None:
        """Decisions made through the API go to the audit log too (the approver as given)."""
        if self.audit is None:
            return
        entry = {
            "time": datetime.datetime.now(datetime.UTC).isoformat(),
            "event": "approvals_api",
            "action": action,
            "by": f"api:{approver}",
            **fields,
        }
        try:
            self.audit(entry)
        except Exception:
            logger.exception("sluicegate: approvals API: audit line not written")

    def _authorized(self, header: str) -> bool:
        scheme, _, given = header.partition(" ")
        try:
            expected = self.admin_token.read()
        except SecretUnavailable:
            logger.error("sluicegate: approvals API: admin token unavailable; refusing all")
            return False
        # Compare in constant time whatever was sent, so timing says nothing about the token.
        ok = hmac.compare_digest(given.strip().encode(), expected.encode())
        return ok and scheme.lower() == "bearer"


def _clean(value: Any) -> str:
    """Approver-supplied text, safe to log, record and show the agent: printable, bounded."""
    if not isinstance(value, str):
        return ""
    text = "".join(c if c.isprintable() else " " for c in value).strip()
    return text[:MAX_TEXT]


def _limit(query: str) -> int | None:
    values = urllib.parse.parse_qs(query).get("limit", ["100"])
    try:
        limit = int(values[-1])
    except ValueError:
        return None
    return limit if 1 <= limit <= 1000 else None
