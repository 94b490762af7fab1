"""Just-in-time approval of held flows: the pending registry, grants, and the control API.

A flow held by policy waits on a future in `ApprovalRegistry` (its own hook awaits it; other
flows keep flowing) until an approver approves or denies it through the control API, the
timeout denies it, or its client goes away. The registry is module-level state of the package,
which survives hot reloads of the `-s` script, so flows held across a reload can still be decided.

The control API is a deliberately small HTTP/1.1 server on a loopback port inside the mitmdump
process (asyncio, no dependencies), protected by an admin token compared in constant time:

    GET  /v1/approvals                   pending approvals, oldest first
    POST /v1/approvals/<id>/approve      {"approver", "reason", "grant_minutes"?}
    POST /v1/approvals/<id>/deny         {"approver", "reason"}

The approver name is what the approver says it is: the admin token is the only authentication.
No module here imports mitmproxy; the Policy addon wires it to flows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hmac
import ipaddress
import json
import logging
import math
import re
import secrets
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, Literal

from sluicegate.schema import SecretRef, SecretUnavailable

logger = logging.getLogger("sluicegate.approvals")

Outcome = Literal["approved", "denied", "timeout", "cancelled"]
GrantKey = tuple[str, str, str]  # identity, destination, rule id

MAX_HEAD_BYTES = 8 * 1024
MAX_BODY_BYTES = 16 * 1024
CLIENT_SECONDS = 10.0
MAX_TEXT = 500
_ID = re.compile(r"[0-9a-f]{8,32}")


def iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True)
class ApprovalRequest:
    """What an approver decides on: who wants what, and which rule held it.

    Never a body, a header value or a query string (they may carry secrets).
    """

    request_id: str
    rule_id: str
    message: str
    phase: str
    subject: str | None
    issuer: str | None
    groups: tuple[str, ...]
    route: str | None
    host: str
    port: int
    method: str
    path: str
    patterns: tuple[str, ...] = ()
    grant_key: GrantKey = ("", "", "")
    client_id: str | None = None  # the client connection, to cancel on disconnect

    def as_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "rule": self.rule_id,
            "message": self.message,
            "phase": self.phase,
            "subject": self.subject,
            "issuer": self.issuer,
            "groups": list(self.groups),
            "route": self.route,
            "host": self.host,
            "port": self.port,
            "method": self.method,
            "path": self.path,
            "patterns": list(self.patterns),
        }


@dataclasses.dataclass(frozen=True)
class Resolution:
    """How a held flow ended. Recorded with the flow (who, when, why)."""

    approval_id: str
    outcome: Outcome
    at: float
    by: str | None = None
    reason: str = ""
    grant_minutes: float | None = None

    @property
    def approved(self) -> bool:
        return self.outcome == "approved"

    def as_metadata(self) -> dict[str, Any]:
        return {
            "id": self.approval_id,
            "outcome": self.outcome,
            "by": self.by,
            "reason": self.reason,
            "at": iso(self.at),
            "grant_minutes": self.grant_minutes,
        }


@dataclasses.dataclass
class Pending:
    id: str
    request: ApprovalRequest
    created_at: float
    expires_at: float
    future: asyncio.Future[Resolution]

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            **self.request.as_json(),
        }


@dataclasses.dataclass(frozen=True)
class Grant:
    """An allowance: the same identity may pass the same hold rule on the same destination."""

    key: GrantKey
    approval_id: str
    by: str
    expires_at: float

    def as_metadata(self) -> dict[str, Any]:
        return {"approval_id": self.approval_id, "by": self.by, "expires_at": iso(self.expires_at)}


class UnknownApproval(KeyError):
    """No pending approval has this id (never existed, already decided, timed out, cancelled)."""


class ApprovalRegistry:
    """Pending approvals and active grants. Event-loop confined: no locks needed."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._pending: dict[str, Pending] = {}
        self._grants: dict[GrantKey, Grant] = {}

    # -- held flows ----------------------------------------------------------------------------

    def open(self, request: ApprovalRequest, timeout: float) -> Pending:
        """Register a held flow. Must be called on the event loop that will await it."""
        approval_id = secrets.token_hex(4)
        while approval_id in self._pending:
            approval_id = secrets.token_hex(4)
        now = self._clock()
        pending = Pending(
            approval_id,
            request,
            created_at=now,
            expires_at=now + timeout,
            future=asyncio.get_running_loop().create_future(),
        )
        self._pending[approval_id] = pending
        return pending

    async def wait(self, pending: Pending) -> Resolution:
        """Wait for a decision; the timeout denies. Always leaves the registry clean."""
        remaining = max(pending.expires_at - self._clock(), 0.0)
        try:
            return await asyncio.wait_for(asyncio.shield(pending.future), remaining)
        except TimeoutError:
            timeout = pending.expires_at - pending.created_at
            self._resolve(
                pending,
                Resolution(
                    pending.id,
                    "timeout",
                    self._clock(),
                    reason=f"no approver decided within {timeout:g} seconds",
                ),
            )
            return pending.future.result()  # a decision that raced the timeout wins
        finally:
            if not pending.future.done():  # our hook was cancelled (shutdown)
                self._resolve(
                    pending, Resolution(pending.id, "cancelled", self._clock(), reason="shutdown")
                )
            self._pending.pop(pending.id, None)

    def decide(
        self,
        approval_id: str,
        *,
        approve: bool,
        by: str,
        reason: str,
        grant_minutes: float | None = None,
    ) -> Resolution:
        """Approve or deny a pending flow. A grant also releases other flows it covers."""
        pending = self._pending.get(approval_id)
        if pending is None:
            raise UnknownApproval(approval_id)
        now = self._clock()
        resolution = Resolution(
            approval_id,
            "approved" if approve else "denied",
            now,
            by=by,
            reason=reason,
            grant_minutes=grant_minutes if approve else None,
        )
        self._resolve(pending, resolution)
        if approve and grant_minutes:
            key = pending.request.grant_key
            self._grants[key] = Grant(key, approval_id, by, now + grant_minutes * 60)
            for other in list(self._pending.values()):
                if other.request.grant_key == key:
                    self._resolve(
                        other,
                        Resolution(
                            other.id,
                            "approved",
                            now,
                            by=by,
                            reason=f"covered by the grant of approval {approval_id}",
                        ),
                    )
        return resolution

    def cancel_client(self, client_id: str) -> int:
        """The client of these flows disconnected: nobody is waiting for an answer any more."""
        gone = [p for p in self._pending.values() if p.request.client_id == client_id]
        for pending in gone:
            self._resolve(
                pending,
                Resolution(pending.id, "cancelled", self._clock(), reason="client disconnected"),
            )
        return len(gone)

    def pending(self) -> list[Pending]:
        return sorted(self._pending.values(), key=lambda p: p.created_at)

    def _resolve(self, pending: Pending, resolution: Resolution) -> None:
        self._pending.pop(pending.id, None)
        if not pending.future.done():
            pending.future.set_result(resolution)
            logger.info(
                "sluicegate: approval %s %s%s (rule %s, request %s)",
                pending.id,
                resolution.outcome,
                f" by {resolution.by}" if resolution.by else "",
                pending.request.rule_id,
                pending.request.request_id,
            )

    # -- grants ------------------------------------------------------------------------------

    def grant_for(self, key: GrantKey) -> Grant | None:
        grant = self._grants.get(key)
        if grant is not None and grant.expires_at <= self._clock():
            del self._grants[key]
            return None
        return grant

    def granted_rules(self, identity: str, destination: str) -> list[str]:
        return [
            key[2]
            for key in list(self._grants)
            if key[:2] == (identity, destination) and self.grant_for(key) is not None
        ]


# -- the control API ------------------------------------------------------------------------------


class ControlServer:
    """The approvals HTTP API on a loopback port.

    `start()` binds synchronously (so a taken port is reported at once, and mitmdump refuses to
    start) and serves on the running event loop; `stop()` closes the listening socket at once, so
    a reloaded script can bind the same port again.
    """

    def __init__(
        self,
        registry: ApprovalRegistry,
        *,
        host: str,
        port: int,
        admin_token: SecretRef,
        max_grant_minutes: float,
    ) -> None:
        self.registry = registry
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
        return self.dispatch(method, target, headers, body, peer=str(peer))

    def dispatch(
        self, method: str, target: str, headers: dict[str, str], body: bytes, peer: str = ""
    ) -> tuple[int, dict[str, Any]]:
        """Answer one request: (status, JSON payload). Authentication comes first, always."""
        if not self._authorized(headers.get("authorization", "")):
            logger.warning("sluicegate: approvals API: rejected unauthenticated request (%s)", peer)
            return 401, {"error": "unauthorized", "message": "a valid admin token is required"}
        path = target.split("?", 1)[0].rstrip("/")
        if path == "/v1/approvals":
            if method != "GET":
                return 405, {"error": "method_not_allowed", "message": "use GET"}
            return 200, {"approvals": [p.as_json() for p in self.registry.pending()]}
        m = re.fullmatch(r"/v1/approvals/([^/]+)/(approve|deny)", path)
        if m is None:
            return 404, {"error": "not_found", "message": "no such endpoint"}
        if method != "POST":
            return 405, {"error": "method_not_allowed", "message": "use POST"}
        return self._decide(m.group(1), m.group(2) == "approve", body)

    def _decide(self, approval_id: str, approve: bool, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            return 400, {"error": "bad_request", "message": "body must be JSON"}
        if not isinstance(data, dict):
            return 400, {"error": "bad_request", "message": "body must be a JSON object"}
        unknown = sorted(set(data) - {"approver", "reason", "grant_minutes"})
        if unknown:
            return 400, {"error": "bad_request", "message": f"unknown fields: {unknown}"}
        approver = _clean(data.get("approver"))
        reason = _clean(data.get("reason"))
        if not approver or not reason:
            return 400, {"error": "bad_request", "message": "approver and reason are required"}
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
            resolution = self.registry.decide(
                approval_id,
                approve=approve,
                by=approver,
                reason=reason,
                grant_minutes=float(grant) if grant is not None else None,
            )
        except UnknownApproval:
            return 404, {
                "error": "unknown_approval",
                "message": "no such pending approval (decided, timed out or cancelled)",
            }
        return 200, resolution.as_metadata()

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
    413: "Content Too Large",
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


class WebhookNotifier:
    """POSTs each new pending approval to a URL. Fire and forget: failures are only logged."""

    def __init__(self, url: SecretRef, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self._tasks: set[asyncio.Task[None]] = set()

    def notify(self, pending: Pending) -> None:
        payload = {
            "event": "approval_pending",
            "approval": pending.as_json(),
            "approve": f"python -m sluicegate approvals approve {pending.id} --reason ...",
            "deny": f"python -m sluicegate approvals deny {pending.id} --reason ...",
        }
        task = asyncio.get_running_loop().create_task(self._post(pending.id, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, approval_id: str, payload: dict[str, Any]) -> None:
        try:
            url = self.url.read()
            status = await asyncio.to_thread(post_json, url, payload, self.timeout)
        except (SecretUnavailable, OSError, ValueError) as e:
            # Never the URL: chat webhook URLs embed their credential.
            logger.warning(
                "sluicegate: approvals webhook for %s failed: %s", approval_id, type(e).__name__
            )
            return
        if not 200 <= status < 300:
            logger.warning("sluicegate: approvals webhook for %s answered %s", approval_id, status)


def post_json(url: str, payload: dict[str, Any], timeout: float) -> int:
    """POST JSON without any proxy from the environment (it may point at this gateway)."""
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"content-type": "application/json", "user-agent": "sluicegate-approvals"},
        method="POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
