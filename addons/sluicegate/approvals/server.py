"""The approvals control API: a small loopback HTTP server inside the mitmdump process.

A deliberately small HTTP/1.1 server on a loopback port (asyncio, no dependencies), protected by
an admin token compared in constant time. It answers from the shared state, so with
`state.backend: redis` every replica's API lists and decides every replica's approvals:

    GET  /v1/approvals                   pending approvals, oldest first (with details)
    GET  /v1/approvals/<id>              one approval, pending or recently decided
    POST /v1/approvals/<id>/approve      {"approver", "reason", "grant_minutes"?}
    POST /v1/approvals/<id>/deny         {"approver", "reason"}
    GET  /v1/grants                      active grants
    POST /v1/grants/<id>/revoke          {"approver", "reason"}
    GET  /v1/history?limit=N             decisions and revocations, newest first
    GET  /v1/state                       backend, replica, whether the store is reachable

The approver name is what the approver says it is: the admin token is the only authentication.
A reason is required unless `approvals.require_reason` is off. When the shared state is
unreachable, answers are 503 `state_unavailable`. No module here imports mitmproxy.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import re
import socket
import urllib.parse
from typing import Any

from sluicegate.approvals.service import Approvals
from sluicegate.secrets import SecretRef, SecretUnavailable
from sluicegate.state import AlreadyResolved, StateUnavailable, UnknownApproval, UnknownGrant

logger = logging.getLogger("sluicegate.approvals")


MAX_HEAD_BYTES = 8 * 1024
MAX_BODY_BYTES = 16 * 1024
CLIENT_SECONDS = 10.0
MAX_TEXT = 500
_ID = re.compile(r"[0-9a-f]{8,32}")


class ControlServer:
    """The approvals HTTP API on a loopback port.

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
    ) -> None:
        self.approvals = approvals
        self.require_reason = require_reason
        self.host = host
        self.requested_port = port
        self.admin_token = admin_token
        self.max_grant_minutes = max_grant_minutes
        self._sock: socket.socket | None = None
        self._server: asyncio.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port: int | None = None

    @property
    def listening(self) -> bool:
        return self._sock is not None

    def start(self) -> int:
        family = socket.AF_INET6 if _is_v6(self.host) else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.requested_port))
            sock.listen(32)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._task = asyncio.get_running_loop().create_task(self._serve(sock))
        return self.port

    async def _serve(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_server(self._handle, sock=sock, limit=MAX_HEAD_BYTES)

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._sock is not None:
            self._sock.close()
        for writer in list(self._writers):
            writer.close()
        self._sock = self._server = self._task = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            try:
                async with asyncio.timeout(CLIENT_SECONDS):
                    status, payload = await self._read_and_dispatch(reader, writer)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                status, payload = 400, {"error": "bad_request", "message": "incomplete request"}
            except ValueError as e:  # raised with a safe message by the parser
                status, payload = 400, {"error": "bad_request", "message": str(e)}
            body = json.dumps(payload).encode()
            head = (
                f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
                "content-type: application/json\r\ncache-control: no-store\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n"
            )
            if status == 401:
                head += 'www-authenticate: Bearer realm="sluicegate-approvals"\r\n'
            writer.write(head.encode() + b"\r\n" + body)
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _read_and_dispatch(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[int, dict[str, Any]]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise ValueError("malformed request line")
        method, target = parts[0], parts[1]
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, sep, value = line.partition(":")
                if not sep:
                    raise ValueError("malformed header")
                headers[name.strip().lower()] = value.strip()
        length = headers.get("content-length", "0")
        if not length.isdigit():
            raise ValueError("bad content-length")
        if int(length) > MAX_BODY_BYTES:
            return 413, {"error": "too_large", "message": "request body too large"}
        body = await reader.readexactly(int(length)) if int(length) else b""
        peer = writer.get_extra_info("peername")
        return await self.dispatch(method, target, headers, body, peer=str(peer))

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
        return 200, {"revoked": grant.as_json(), "by": approver, "reason": reason}

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


_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    503: "Service Unavailable",
}


def _clean(value: Any) -> str:
    """Approver-supplied text, safe to log, record and show the agent: printable, bounded."""
    if not isinstance(value, str):
        return ""
    text = "".join(c if c.isprintable() else " " for c in value).strip()
    return text[:MAX_TEXT]


def _is_v6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


# -- webhook notification ---------------------------------------------------------------------


def _limit(query: str) -> int | None:
    values = urllib.parse.parse_qs(query).get("limit", ["100"])
    try:
        limit = int(values[-1])
    except ValueError:
        return None
    return limit if 1 <= limit <= 1000 else None
