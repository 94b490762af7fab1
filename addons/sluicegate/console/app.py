"""The console's routes, mounted at `/console` on the control listener.

    GET  /console/signin, POST /console/signin, POST /console/signout
    GET  /console/approvals                      pending (live), grants, recent decisions
    POST /console/approvals/<id>/decide          outcome=approve|deny, reason, grant_minutes
    POST /console/grants/<id>/revoke             reason
    GET  /console/activity?caller=&route=&decision=&rule=
    GET  /console/sessions, /console/sessions/<dir>/<file>.mitm
    GET  /console/flows/<dir>/<file>.mitm/<index>, /console/download/<dir>/<file>.mitm
    GET  /console/partials/<pending|grants|history|activity>   fragments for live updates
    GET  /console/events                         server-sent events: approvals, activity
    GET  /console/static/<console.css|console.js>

Every route but sign-in and the static files needs a session (a GET without one is sent to
sign-in, anything else gets 401 and changes nothing); every POST also needs the session's CSRF
token and a same-origin (or absent) `Origin`. Decisions, revocations, sign-ins and every view of
a recording (session, flow, download) are written to the audit log with who did it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hmac
import importlib.resources
import logging
import math
import re
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from sluicegate.approvals.service import Approvals
from sluicegate.console import views
from sluicegate.console.auth import (
    COOKIE,
    PRE_COOKIE,
    ConsoleUser,
    SessionKeys,
    Sessions,
    cookie_header,
    cross_site,
    host_allowed,
    over_tls,
)
from sluicegate.console.recordings import Recordings, display_path
from sluicegate.control.listener import Request, Response
from sluicegate.state import AlreadyResolved, StateUnavailable, UnknownApproval, UnknownGrant

logger = logging.getLogger("sluicegate.console")

PREFIX = "/console"
_APPROVAL = re.compile(r"/console/approvals/([0-9a-f]{8,32})/decide")
_GRANT = re.compile(r"/console/grants/([0-9a-f]{16})/revoke")
_SESSION = r"([A-Za-z0-9._@-]{1,80}/[A-Za-z0-9._-]{1,120}\.mitm)"
_FLOW = re.compile(rf"/console/flows/{_SESSION}/(\d{{1,9}})")
_SESSION_PAGE = re.compile(rf"/console/sessions/{_SESSION}")
_DOWNLOAD = re.compile(rf"/console/download/{_SESSION}")
MAX_TEXT = 500
HEARTBEAT_SECONDS = 15.0
COALESCE_SECONDS = 0.2
HISTORY_ROWS = 20
ACTIVITY_ROWS = 200

SECURITY_HEADERS = [
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "same-origin"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
]
STATIC = {
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

Verify = Callable[[str], Awaitable[Any]]  # token -> Identity (subject, groups, exp...); raises
Audit = Callable[[dict[str, Any]], None]


@dataclasses.dataclass(frozen=True)
class ConsoleSettings:
    admin_token: Callable[[], str]
    approvers: frozenset[str] = frozenset()
    investigators: frozenset[str] = frozenset()
    session_seconds: float = 8 * 3600.0
    secure_cookie: str = "auto"  # auto | always | never
    allowed_hosts: tuple[str, ...] = ()
    require_reason: bool = True
    max_grant_minutes: float = 480.0
    gateway_name: str = ""


class Console:
    def __init__(
        self,
        settings: ConsoleSettings,
        approvals: Approvals,
        *,
        audit: Audit,
        verify: Verify | None = None,
        recordings: Recordings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.approvals = approvals
        self.audit_sink = audit
        self.verify = verify
        self.recordings = recordings
        self._clock = clock
        self.sessions = Sessions(
            SessionKeys(settings.admin_token), lifetime=settings.session_seconds, clock=clock
        )

    # -- dispatch -----------------------------------------------------------------------------

    async def __call__(self, request: Request) -> Response:
        # Links quote session names; what a browser sends percent-encoded means the same.
        path = urllib.parse.unquote(request.path).rstrip("/") or "/"
        if not host_allowed(request, self.settings.allowed_hosts):
            return self._text(421, "This console is not served under that host name.")
        if path.startswith("/console/static/"):
            return self._static(path.removeprefix("/console/static/"))
        if path == "/console/signin":
            if request.method == "POST":
                return await self._signin(request)
            return self._signin_page(request)
        user = self.sessions.user(request)
        if user is None:
            if request.method == "GET" and not path.startswith(
                ("/console/partials", "/console/events")
            ):
                return _redirect("/console/signin")
            return self._text(401, "Sign in first: nothing was changed.")
        try:
            if request.method == "POST":
                return await self._post(request, path, user)
            if request.method != "GET":
                return self._text(405, "Method not allowed.")
            return await self._get(request, path, user)
        except StateUnavailable:
            return self._text(503, "The shared state is unavailable; try again shortly.")

    async def _get(self, request: Request, path: str, user: ConsoleUser) -> Response:
        if path in ("/console", "/"):
            return _redirect("/console/approvals")
        if path == "/console/approvals":
            return await self._approvals_page(request, user)
        if path == "/console/activity":
            return await self._activity_page(request, user)
        if path == "/console/sessions":
            return await self._sessions_page(user)
        if path == "/console/events":
            return self._events(user)
        if path.startswith("/console/partials/"):
            return await self._partial(request, path.removeprefix("/console/partials/"), user)
        for pattern, handler in (
            (_SESSION_PAGE, self._session_page),
            (_FLOW, self._flow_page),
            (_DOWNLOAD, self._download),
        ):
            m = pattern.fullmatch(path)
            if m is not None:
                return await handler(user, *m.groups())
        return self._text(404, "No such page.")

    async def _post(self, request: Request, path: str, user: ConsoleUser) -> Response:
        form = request.form()
        if cross_site(request) or not self.sessions.csrf_ok(user, form.get("csrf", "")):
            logger.warning("sluicegate: console: refused a POST without a valid CSRF token")
            self._audit(user, "csrf_refused", path=path[:200])
            return self._text(403, "This form did not come from the console: nothing was changed.")
        if path == "/console/signout":
            self.sessions.revoke(user)
            self._audit(user, "sign_out")
            response = _redirect("/console/signin?notice=signed_out")
            response.headers.append(("set-cookie", self._cookie(request, COOKIE, "", max_age=0)))
            return response
        m = _APPROVAL.fullmatch(path)
        if m is not None:
            return await self._decide(user, m.group(1), form)
        m = _GRANT.fullmatch(path)
        if m is not None:
            return await self._revoke(user, m.group(1), form)
        return self._text(404, "No such action.")

    # -- sign-in ------------------------------------------------------------------------------

    def _signin_page(self, request: Request, error: str = "", status: int = 200) -> Response:
        nonce = request.cookies().get(PRE_COOKIE, "")
        headers: list[tuple[str, str]] = []
        if not re.fullmatch(r"[0-9a-f]{32}", nonce):
            nonce = secrets.token_hex(16)
            headers.append(("set-cookie", self._cookie(request, PRE_COOKIE, nonce, max_age=3600)))
        try:
            token = self.sessions.pre_token(nonce)
        except Exception:
            return self._text(503, "The console is unavailable (no admin token).")
        body = views.signin(
            pre_token=token,
            error=error,
            oidc=self.verify is not None and bool(self._groups()),
            gateway=self.settings.gateway_name,
        )
        notice = request.params().get("notice")
        if notice == "signed_out":
            body = body.replace("<main>", '<main><p class="notice ok" id="notice">Signed out.</p>')
        return self._html(status, body, headers)

    async def _signin(self, request: Request) -> Response:
        form = request.form()
        nonce = request.cookies().get(PRE_COOKIE, "")
        if cross_site(request) or not self.sessions.pre_ok(nonce, form.get("pre", "")):
            return self._signin_page(request, "The sign-in form expired; try again.", 403)
        token = form.get("token", "").strip()
        name = _clean(form.get("name"))[:80]
        user_fields: dict[str, Any] | None = None
        if token:
            try:
                admin = self.settings.admin_token()
            except Exception:
                admin = ""
            if admin and _equal(token, admin):
                who = name or "unnamed"
                user_fields = {
                    "by": f"admin:{who}",
                    "kind": "admin",
                    "subject": who,
                    "groups": (),
                    "not_after": None,
                }
            elif self.verify is not None and self._groups() and token.count(".") == 2:
                user_fields = await self._oidc(token)
        if user_fields is None:
            logger.info("sluicegate: console: sign-in refused (%s)", request.peer)
            self._audit_raw({"action": "sign_in_refused", "by": None, "peer": request.peer[:100]})
            return self._signin_page(request, "Sign-in refused.", 401)
        cookie, user = self.sessions.issue(**user_fields)
        self._audit(user, "sign_in", kind=user.kind, groups=list(user.groups))
        response = _redirect("/console/approvals")
        max_age = max(1, int(user.expires - self._clock()))
        response.headers.append(("set-cookie", self._cookie(request, COOKIE, cookie, max_age)))
        response.headers.append(("set-cookie", self._cookie(request, PRE_COOKIE, "", max_age=0)))
        return response

    async def _oidc(self, token: str) -> dict[str, Any] | None:
        assert self.verify is not None
        try:
            identity = await self.verify(token)
        except Exception as e:  # TokenRejected, key source failures: never their details
            logger.info("sluicegate: console: token refused (%s)", getattr(e, "reason", "invalid"))
            return None
        groups = tuple(getattr(identity, "groups", ()) or ())
        if not set(groups) & self._groups():
            logger.info("sluicegate: console: %s is in no console group", identity.subject)
            return None
        expires = getattr(identity, "expires_at", None)
        return {
            "by": f"oidc:{identity.subject}",
            "kind": "oidc",
            "subject": str(identity.subject),
            "groups": groups,
            "not_after": float(expires) if isinstance(expires, (int, float)) else None,
        }

    def _groups(self) -> frozenset[str]:
        return self.settings.approvers | self.settings.investigators

    def can_decide(self, user: ConsoleUser) -> bool:
        return user.kind == "admin" or bool(set(user.groups) & self.settings.approvers)

    # -- approvals ----------------------------------------------------------------------------

    async def _approvals_page(self, request: Request, user: ConsoleUser) -> Response:
        state = self.approvals.state
        pending, grants, history = await asyncio.gather(
            state.pending(), state.grants(), state.history(HISTORY_ROWS)
        )
        body = views.approvals_page(
            pending,
            grants,
            history,
            csrf=self.sessions.csrf_token(user),
            can_decide=self.can_decide(user),
            require_reason=self.settings.require_reason,
            max_grant_minutes=self.settings.max_grant_minutes,
            now=self._clock(),
        )
        return self._page(request, user, "Approvals", body, "approvals")

    async def _decide(self, user: ConsoleUser, approval_id: str, form: dict[str, str]) -> Response:
        if not self.can_decide(user):
            return _redirect("/console/approvals?notice=forbidden")
        outcome = form.get("outcome")
        if outcome not in ("approve", "deny"):
            return self._text(400, "outcome must be approve or deny")
        reason = _clean(form.get("reason"))
        if self.settings.require_reason and not reason:
            return _redirect("/console/approvals?notice=reason_required")
        grant: float | None = None
        raw_grant = form.get("grant_minutes", "").strip()
        if raw_grant and outcome == "approve":
            try:
                grant = float(raw_grant)
            except ValueError:
                grant = math.nan
            if not math.isfinite(grant) or not 0 < grant <= self.settings.max_grant_minutes:
                return _redirect("/console/approvals?notice=bad_grant")
        try:
            resolution = await self.approvals.decide(
                approval_id, approve=outcome == "approve", by=user.by, reason=reason,
                grant_minutes=grant,
            )  # fmt: skip
        except UnknownApproval:
            return _redirect("/console/approvals?notice=unknown")
        except AlreadyResolved:
            return _redirect("/console/approvals?notice=already")
        except StateUnavailable:
            return _redirect("/console/approvals?notice=state_unavailable")
        self._audit(
            user,
            "decide",
            approval_id=approval_id,
            outcome=resolution.outcome,
            reason=reason,
            grant_minutes=resolution.grant_minutes,
        )
        return _redirect(f"/console/approvals?notice={resolution.outcome}")

    async def _revoke(self, user: ConsoleUser, grant_id: str, form: dict[str, str]) -> Response:
        if not self.can_decide(user):
            return _redirect("/console/approvals?notice=forbidden")
        reason = _clean(form.get("reason"))
        if not reason:
            return _redirect("/console/approvals?notice=reason_required")
        try:
            grant = await self.approvals.revoke(grant_id, by=user.by, reason=reason)
        except UnknownGrant:
            return _redirect("/console/approvals?notice=unknown_grant")
        except StateUnavailable:
            return _redirect("/console/approvals?notice=state_unavailable")
        self._audit(
            user, "revoke", grant_id=grant_id, approval_id=grant.approval_id, reason=reason,
            identity=grant.key[0], destination=grant.key[1], rule=grant.key[2],
        )  # fmt: skip
        return _redirect("/console/approvals?notice=revoked")

    # -- activity -----------------------------------------------------------------------------

    def _filters(self, request: Request) -> dict[str, str]:
        params = request.params()
        return {k: params[k][:100] for k in views.FILTERS if params.get(k)}

    async def _activity(self, request: Request) -> tuple[dict[str, str], list[Any]]:
        filters = self._filters(request)
        entries = await self.approvals.state.activity(1000 if filters else ACTIVITY_ROWS)
        return filters, views.filter_entries(entries, filters)[:ACTIVITY_ROWS]

    async def _activity_page(self, request: Request, user: ConsoleUser) -> Response:
        filters, entries = await self._activity(request)
        body = views.activity_page(entries, filters)
        return self._page(request, user, "Activity", body, "activity")

    # -- sessions -----------------------------------------------------------------------------

    async def _sessions_page(self, user: ConsoleUser) -> Response:
        overview = None
        if self.recordings is not None:
            overview = await asyncio.to_thread(self.recordings.overview)
        body = views.sessions_page(overview)
        return self._html(200, self._frame(user, "Sessions", body, "sessions"))

    async def _session_page(self, user: ConsoleUser, name: str) -> Response:
        recordings = self.recordings
        path = recordings.resolve(name) if recordings is not None else None
        if recordings is None or path is None:
            return self._text(404, "No such session.")
        info = await asyncio.to_thread(recordings.info, path)
        flows = await asyncio.to_thread(recordings.flows, name)
        self._audit(user, "view_session", session=name, flows=len(flows))
        body = views.session_page(info, flows, _mitmweb(path))
        return self._html(200, self._frame(user, f"Session {name}", body, "sessions"))

    async def _flow_page(self, user: ConsoleUser, name: str, index: str) -> Response:
        recordings = self.recordings
        path = recordings.resolve(name) if recordings is not None else None
        if recordings is None or path is None:
            return self._text(404, "No such session.")
        record = await asyncio.to_thread(recordings.flow, name, int(index))
        if record is None:
            return self._text(404, "No such flow.")
        info = await asyncio.to_thread(recordings.info, path)
        self._audit(user, "view_flow", session=name, index=int(index), flow_id=record.id)
        body = views.flow_page(record, info, _mitmweb(path))
        return self._html(200, self._frame(user, f"Flow {record.id[:8]}", body, "sessions"))

    async def _download(self, user: ConsoleUser, name: str) -> Response:
        recordings = self.recordings
        path = recordings.resolve(name) if recordings is not None else None
        if recordings is None or path is None:
            return self._text(404, "No such session.")
        data = await asyncio.to_thread(path.read_bytes)
        self._audit(user, "download_session", session=name, bytes=len(data))
        filename = path.name.replace('"', "")
        return Response(
            200,
            [
                ("content-type", "application/octet-stream"),
                ("content-disposition", f'attachment; filename="{filename}"'),
                *SECURITY_HEADERS,
            ],
            data,
        )

    # -- live updates -------------------------------------------------------------------------

    async def _partial(self, request: Request, name: str, user: ConsoleUser) -> Response:
        state = self.approvals.state
        csrf = self.sessions.csrf_token(user)
        if name == "pending":
            fragment = views.pending_items(
                await state.pending(),
                csrf=csrf,
                can_decide=self.can_decide(user),
                require_reason=self.settings.require_reason,
                max_grant_minutes=self.settings.max_grant_minutes,
                now=self._clock(),
            )
        elif name == "grants":
            fragment = views.grant_rows(
                await state.grants(), csrf=csrf, can_decide=self.can_decide(user)
            )
        elif name == "history":
            fragment = views.history_rows(await state.history(HISTORY_ROWS))
        elif name == "activity":
            _filters, entries = await self._activity(request)
            fragment = views.activity_rows(entries)
        else:
            return self._text(404, "No such fragment.")
        return self._html(200, fragment)

    def _events(self, user: ConsoleUser) -> Response:
        return Response(
            200,
            [("content-type", "text/event-stream"), *SECURITY_HEADERS],
            stream=self._event_stream(user),
        )

    async def _event_stream(self, user: ConsoleUser) -> AsyncIterator[bytes]:
        subscription = self.approvals.state.subscribe()
        try:
            yield b"retry: 2000\n\n"
            while self._clock() < user.expires:
                event = await subscription.get(HEARTBEAT_SECONDS)
                if event is None:
                    yield b": keep-alive\n\n"
                    continue
                topics = {_topic(event.kind)}
                # Changes come in bursts (a grant approves several approvals): send one each.
                deadline = time.monotonic() + COALESCE_SECONDS
                while (left := deadline - time.monotonic()) > 0:
                    more = await subscription.get(left)
                    if more is None:
                        break
                    topics.add(_topic(more.kind))
                for topic in sorted(topics):
                    yield f"event: {topic}\ndata: {{}}\n\n".encode()
        finally:
            subscription.close()

    # -- helpers ------------------------------------------------------------------------------

    def _frame(
        self, user: ConsoleUser, title: str, body: str, active: str, notice: str | None = None
    ) -> str:
        return views.page(
            title,
            body,
            user=user,
            csrf=self.sessions.csrf_token(user),
            active=active,
            gateway=self.settings.gateway_name,
            notice=notice,
        )

    def _page(
        self, request: Request, user: ConsoleUser, title: str, body: str, active: str
    ) -> Response:
        notice = request.params().get("notice")
        return self._html(200, self._frame(user, title, body, active, notice))

    def _html(
        self, status: int, body: str, headers: list[tuple[str, str]] | None = None
    ) -> Response:
        return Response(
            status,
            [("content-type", "text/html; charset=utf-8"), *SECURITY_HEADERS, *(headers or [])],
            body.encode(),
        )

    def _text(self, status: int, message: str) -> Response:
        return self._html(
            status, views.message_page(message, message, gateway=self.settings.gateway_name)
        )

    def _static(self, name: str) -> Response:
        if name not in STATIC:
            return self._text(404, "No such file.")
        data = importlib.resources.files("sluicegate.console").joinpath("static", name)
        return Response(
            200,
            [("content-type", STATIC[name]), ("cache-control", "no-cache"), *SECURITY_HEADERS],
            data.read_bytes(),
        )

    def _cookie(self, request: Request, name: str, value: str, max_age: int) -> str:
        secure = over_tls(request, self.settings.secure_cookie)
        return cookie_header(name, value, secure=secure, max_age=max_age)

    def _audit(self, user: ConsoleUser, action: str, **fields: Any) -> None:
        self._audit_raw({"action": action, "by": user.by, **fields})

    def _audit_raw(self, fields: dict[str, Any]) -> None:
        entry = {
            "time": datetime.datetime.fromtimestamp(self._clock(), datetime.UTC).isoformat(),
            "event": "console",
            **fields,
        }
        try:
            self.audit_sink(entry)
        except Exception:
            logger.exception("sluicegate: console: audit line not written")


def _topic(kind: str) -> str:
    return "activity" if kind == "activity" else "approvals"


def _redirect(location: str) -> Response:
    return Response(303, [("location", location), *SECURITY_HEADERS])


def _mitmweb(path: Any) -> str:
    return f"mitmweb -r {display_path(path)}"


def _clean(value: Any) -> str:
    if not isinstance(value, str):
        return ""
    return "".join(c if c.isprintable() else " " for c in value).strip()[:MAX_TEXT]


def _equal(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())
