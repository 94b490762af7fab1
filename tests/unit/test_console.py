"""The console engine without a browser: routes, sessions, CSRF, escaping, recordings, the
control listener. (The browser tests are tests/e2e/test_console.py.)"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from mitmproxy.test import tflow

from sluicegate.approvals.service import Approvals
from sluicegate.console import Console, ConsoleSettings, Recordings
from sluicegate.console.activity import ActivityFeed, summary
from sluicegate.console.auth import COOKIE, SessionKeys, Sessions, cross_site, host_allowed
from sluicegate.control.listener import ControlListener, Request, Response
from sluicegate.recording import chain, tnetstring
from sluicegate.recording.store import Limits, SessionStore
from sluicegate.state import ApprovalRequest, MemoryState

T = TypeVar("T")
ADMIN = "admin-token-" + "x" * 24
HOST = {"host": "127.0.0.1:8790"}


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


def held(path: str = "/v1/files", **kw: Any) -> ApprovalRequest:
    fields: dict[str, Any] = {
        "request_id": "req-1",
        "rule_id": "deletes-need-approval",
        "message": "Deleting needs a human.",
        "phase": "request",
        "subject": "alice",
        "issuer": "https://idp",
        "groups": ("agents",),
        "route": "openai",
        "host": "api.example",
        "port": 443,
        "method": "DELETE",
        "path": path,
        "grant_key": ("alice", "route:openai", "deletes-need-approval"),
    }
    fields.update(kw)
    return ApprovalRequest(**fields)


class Harness:
    def __init__(
        self, recordings: Recordings | None = None, verify: Any = None, **settings: Any
    ) -> None:
        self.state = MemoryState()
        self.approvals = Approvals(self.state)
        self.audit: list[dict[str, Any]] = []
        self.console = Console(
            ConsoleSettings(admin_token=lambda: ADMIN, **settings),
            self.approvals,
            audit=self.audit.append,
            verify=verify,
            recordings=recordings,
        )
        self.cookie = ""

    async def call(
        self,
        method: str,
        target: str,
        form: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        cookie: str | None = None,
    ) -> Response:
        all_headers = dict(HOST)
        body = b""
        if form is not None:
            body = "&".join(f"{k}={v}" for k, v in form.items()).encode()
            all_headers["content-type"] = "application/x-www-form-urlencoded"
            all_headers["origin"] = "http://127.0.0.1:8790"
        jar = self.cookie if cookie is None else cookie
        if jar:
            all_headers["cookie"] = jar
        all_headers.update(headers or {})
        return await self.console(Request(method, target, all_headers, body, "test"))

    async def sign_in(self, token: str = ADMIN, name: str = "Ada") -> Response:
        page = await self.call("GET", "/console/signin", cookie="")
        pre_cookie = _cookies(page)["sg_console_pre"]
        pre = re.search(rb'name="pre" value="([^"]+)"', page.body)
        assert pre is not None
        answer = await self.call(
            "POST",
            "/console/signin",
            {"pre": pre.group(1).decode(), "token": token, "name": name},
            cookie=f"sg_console_pre={pre_cookie}",
        )
        if answer.status == 303:
            self.cookie = f"{COOKIE}={_cookies(answer)[COOKIE]}"
        return answer

    async def csrf(self) -> str:
        page = await self.call("GET", "/console/approvals")
        m = re.search(rb'name="csrf" value="([^"]+)"', page.body)
        assert m is not None
        return m.group(1).decode()


def _cookies(response: Response) -> dict[str, str]:
    jar = {}
    for name, value in response.headers:
        if name == "set-cookie":
            key, _, rest = value.partition("=")
            jar[key] = rest.split(";", 1)[0]
    return jar


# -- sessions and CSRF --------------------------------------------------------------------------


def test_signed_cookies_refuse_tampering_expiry_sign_out_and_a_rotated_admin_token() -> None:
    clock = {"now": 1000.0}
    token = {"value": ADMIN}
    sessions = Sessions(
        SessionKeys(lambda: token["value"]), lifetime=60, clock=lambda: clock["now"]
    )
    value, user = sessions.issue(by="admin:a", kind="admin", subject="a", groups=(), not_after=None)

    def who(cookie: str) -> Any:
        return sessions.user(Request("GET", "/", {"cookie": f"{COOKIE}={cookie}"}))

    assert who(value) == user
    body, mac = value.split(".")
    forged = json.loads(__import__("base64").urlsafe_b64decode(body + "=="))
    forged["by"] = "admin:mallory"
    tampered = __import__("base64").urlsafe_b64encode(json.dumps(forged).encode()).decode()
    assert who(f"{tampered.rstrip('=')}.{mac}") is None
    assert who(value + "x") is None and who("") is None
    assert sessions.csrf_ok(user, sessions.csrf_token(user))
    other, other_user = sessions.issue(by="b", kind="admin", subject="b", groups=(), not_after=None)
    assert not sessions.csrf_ok(user, sessions.csrf_token(other_user))  # bound to the session
    sessions.revoke(other_user)
    assert who(other) is None
    token["value"] = "rotated-" + "y" * 30
    assert who(value) is None
    token["value"] = ADMIN
    clock["now"] += 61
    assert who(value) is None
    # A token's own expiry ends the session sooner.
    _, short = sessions.issue(by="o", kind="oidc", subject="o", groups=(), not_after=1070.0)
    assert short.expires == 1070.0


def test_cross_site_and_host_checks() -> None:
    def req(**headers: str) -> Request:
        return Request("POST", "/console/x", {"host": "127.0.0.1:8790", **headers})

    assert not cross_site(req())
    assert not cross_site(req(origin="http://127.0.0.1:8790"))
    assert cross_site(req(origin="http://127.0.0.1:9999"))
    assert cross_site(req(origin="null"))
    assert cross_site(req(**{"sec-fetch-site": "cross-site"}))
    assert host_allowed(req(), ())
    assert host_allowed(Request("GET", "/", {"host": "localhost:1"}), ())
    assert host_allowed(Request("GET", "/", {"host": "[::1]:1"}), ())
    assert not host_allowed(Request("GET", "/", {"host": "evil.example"}), ())
    assert host_allowed(Request("GET", "/", {"host": "console.corp"}), ("console.corp",))
    assert not host_allowed(Request("GET", "/", {}), ())


def test_no_session_no_csrf_or_a_foreign_origin_change_nothing() -> None:
    async def main() -> None:
        h = Harness()
        hold = await h.state.hold(held(), dedupe="d", timeout=60)
        decide = f"/console/approvals/{hold.id}/decide"
        form = {"outcome": "approve", "reason": "r"}
        assert (await h.call("GET", "/console/approvals")).status == 303
        assert (await h.call("POST", decide, {**form, "csrf": "x"})).status == 401
        assert (await h.call("GET", "/console/partials/pending")).status == 401
        assert (await h.call("GET", "/console/events")).status == 401
        assert (await h.sign_in()).status == 303
        assert (await h.call("POST", decide, form)).status == 403
        csrf = await h.csrf()
        foreign = {"origin": "http://attacker.example"}
        assert (await h.call("POST", decide, {**form, "csrf": csrf}, foreign)).status == 403
        assert [a.id for a in await h.state.pending()] == [hold.id]
        assert [a["action"] for a in h.audit].count("csrf_refused") == 2
        answer = await h.call("POST", decide, {**form, "csrf": csrf})
        assert (answer.status, dict(answer.headers)["location"]) == (
            303,
            "/console/approvals?notice=approved",
        )
        assert await h.state.pending() == []
        assert h.audit[-1]["action"] == "decide" and h.audit[-1]["by"] == "admin:Ada"

    run(main())


def test_sign_in_refusals_and_the_pre_session_token() -> None:
    async def main() -> None:
        h = Harness()
        assert (await h.sign_in(token="wrong")).status == 401
        assert h.audit[-1]["action"] == "sign_in_refused"
        # A sign-in post without the form's nonce cookie is refused.
        page = await h.call("GET", "/console/signin", cookie="")
        pre = re.search(rb'name="pre" value="([^"]+)"', page.body)
        assert pre is not None
        answer = await h.call(
            "POST", "/console/signin", {"pre": pre.group(1).decode(), "token": ADMIN}, cookie=""
        )
        assert answer.status == 403 and COOKIE not in _cookies(answer)
        assert ADMIN.encode() not in answer.body and not any(ADMIN in str(a) for a in h.audit)

    run(main())


def test_approver_groups_by_token_and_investigators_may_not_decide() -> None:
    class Identity:
        def __init__(self, subject: str, groups: tuple[str, ...]) -> None:
            self.subject, self.groups, self.expires_at = subject, groups, int(time.time()) + 600

    tokens = {
        "a.b.approver": Identity("carol", ("approvers",)),
        "a.b.investigator": Identity("erin", ("investigators",)),
        "a.b.agent": Identity("mallory", ("agents",)),
    }

    async def verify(token: str) -> Identity:
        if token not in tokens:
            raise ValueError("bad token")
        return tokens[token]

    async def main() -> None:
        settings = {
            "approvers": frozenset({"approvers"}),
            "investigators": frozenset({"investigators"}),
        }
        h = Harness(None, verify, **settings)
        assert (await h.sign_in("a.b.agent")).status == 401
        assert (await h.sign_in("a.b.nonsense")).status == 401
        assert (await h.sign_in("a.b.investigator")).status == 303
        hold = await h.state.hold(held(), dedupe="d", timeout=60)
        page = await h.call("GET", "/console/approvals")
        assert b"oidc:erin" in page.body and b'class="decide"' not in page.body
        decide = f"/console/approvals/{hold.id}/decide"
        answer = await h.call(
            "POST", decide, {"outcome": "approve", "reason": "r", "csrf": await h.csrf()}
        )
        assert dict(answer.headers)["location"].endswith("notice=forbidden")
        assert len(await h.state.pending()) == 1
        assert (await h.sign_in("a.b.approver")).status == 303
        csrf = await h.csrf()
        for form, notice in (
            ({"outcome": "approve", "reason": ""}, "reason_required"),
            ({"outcome": "approve", "reason": "r", "grant_minutes": "1e9"}, "bad_grant"),
            ({"outcome": "approve", "reason": "r", "grant_minutes": "nan"}, "bad_grant"),
            ({"outcome": "approve", "reason": "r", "grant_minutes": "30"}, "approved"),
            ({"outcome": "deny", "reason": "r"}, "already"),
        ):
            answer = await h.call("POST", decide, {**form, "csrf": csrf})
            assert dict(answer.headers)["location"].endswith(f"notice={notice}"), form
        [grant] = await h.state.grants()
        assert grant.by == "oidc:carol"
        revoke = f"/console/grants/{grant.id}/revoke"
        assert (await h.call("POST", revoke, {"reason": "done", "csrf": csrf})).status == 303
        assert await h.state.grants() == []

    run(main())


def test_everything_shown_is_escaped_and_pages_carry_the_security_headers() -> None:
    async def main() -> None:
        h = Harness()
        await h.state.hold(
            held(path="/x<script>alert(1)</script>", message='"><img src=x onerror=alert(1)>',
                 preview="<script>steal()</script> [REDACTED:github-token]"),
            dedupe="d", timeout=60,
        )  # fmt: skip
        await h.sign_in(name="<b>Ada</b>")
        page = await h.call("GET", "/console/approvals")
        assert b"<script>alert" not in page.body and b"<script>steal" not in page.body
        assert b"<img src=x" not in page.body and b"<b>Ada</b>" not in page.body
        assert b'<mark class="tag">[REDACTED:github-token]</mark>' in page.body
        headers = dict(page.headers)
        assert "script-src 'self'" in headers["content-security-policy"]
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert headers["x-frame-options"] == "DENY"
        assert b'<script src="/console/static/console.js"' in page.body
        assert b"<script>" not in page.body  # no inline script anywhere
        static = await h.call("GET", "/console/static/console.js")
        assert static.status == 200 and b"EventSource" in static.body
        assert (await h.call("GET", "/console/static/../app.py")).status == 404
        other = await h.call("GET", "/console/approvals", headers={"host": "evil.example"})
        assert other.status == 421

    run(main())


# -- recordings ---------------------------------------------------------------------------------


def write_session(
    directory: Path, states: list[dict[str, Any]], identity: str = "alice"
) -> tuple[SessionStore, str]:
    signer = chain.Signer.generate()
    store = SessionStore(directory, signer, Limits(1 << 30, 3600, 300, None, None, 0))
    name = ""
    for state in states:
        receipt = store.write(identity, state["id"], tnetstring.dumps(state))
        name = receipt.session
    store.close("test")
    return store, name


def flow_state(body: bytes, **meta: Any) -> dict[str, Any]:
    flow = tflow.tflow(resp=True)
    flow.request.content = body
    assert flow.response is not None
    flow.response.content = b"<script>alert(2)</script>"
    flow.metadata["sluicegate"] = {"caller": {"subject": "alice"}, "route": "openai", **meta}
    return flow.get_state()


def test_sessions_verified_flows_shown_as_recorded_views_audited_originals_never(
    tmp_path: Path,
) -> None:
    sealed = {"key_id": "abc", "request": b"ORIGINAL-PLAINTEXT-SECRET", "alg": "x"}
    states = [
        flow_state(
            b'{"note": "push with [REDACTED:github-token]"}',
            redaction={"request": {"github-token": 1}},
            policy={
                "request": {
                    "action": "hold",
                    "rule": "deletes-need-approval",
                    "approval": {
                        "id": "ab12",
                        "outcome": "approved",
                        "by": "admin:Ada",
                        "reason": "ticket 42",
                        "at": "2026",
                        "grant_minutes": None,
                    },
                }
            },
            sealed=sealed,
        ),
        flow_state(b"plain"),
    ]
    _, name = write_session(tmp_path, states)

    async def main() -> None:
        h = Harness(Recordings(tmp_path))
        await h.sign_in()
        listing = await h.call("GET", "/console/sessions")
        assert name.encode() in listing.body and b"verify-ok" in listing.body
        session = await h.call("GET", f"/console/sessions/{name}")
        assert session.status == 200 and b"approved" in session.body
        flow = await h.call("GET", f"/console/flows/{name}/0")
        body = flow.body
        assert b'<mark class="tag">[REDACTED:github-token]</mark>' in body
        assert b'id="decision">approved<' in body and b"ticket 42" in body
        assert b"<script>alert(2)" not in body and b"&lt;script&gt;alert(2)" in body
        assert b"ORIGINAL-PLAINTEXT-SECRET" not in body and b"Sealed originals" in body
        assert b"mitmweb -r " in body
        download = await h.call("GET", f"/console/download/{name}")
        assert download.body == (tmp_path / name).read_bytes()
        actions = [(a["action"], a.get("session")) for a in h.audit]
        assert ("view_session", name) in actions and ("view_flow", name) in actions
        assert ("download_session", name) in actions
        for bad in ("../etc/passwd", f"{name}/../x.mitm", "a/../../b.mitm", "x/y.mitm"):
            assert (await h.call("GET", f"/console/sessions/{bad}")).status == 404
        assert (await h.call("GET", f"/console/flows/{name}/7")).status == 404
        # Tampering shows.
        path = tmp_path / name
        data = path.read_bytes()
        path.write_bytes(data.replace(b"plain", b"PLAIN"))
        listing = await h.call("GET", "/console/sessions")
        assert b"verify-failed" in listing.body and b"modified" in listing.body

    run(main())


# -- activity -----------------------------------------------------------------------------------


def test_activity_feed_batches_to_the_state_and_the_view_filters() -> None:
    async def main() -> None:
        h = Harness()
        feed = ActivityFeed(lambda: h.state, flush_seconds=0.01)
        for i, (who, decision, rule) in enumerate(
            (
                ("alice", "allowed", "github-token"),
                ("bob", "blocked", None),
                ("alice", "held", None),
            )
        ):
            audit = {"time": f"2026-01-01T00:00:0{i}", "flow_id": f"f{i}", "identity": who,
                     "route": "openai", "method": "POST", "host": "h", "path": "/p",
                     "status": 200, "decision": decision, "rules": {rule: 1} if rule else {},
                     "session": "s/x.mitm", "index": i}  # fmt: skip
            meta = {"redaction": {"request": {rule: 1}} if rule else {}, "stream": {"cut": None}}
            feed.publish(summary(audit, meta, "r1"))
        await asyncio.sleep(0.1)
        assert [e["flow_id"] for e in await h.state.activity(10)] == ["f2", "f1", "f0"]
        await h.sign_in()
        page = await h.call("GET", "/console/activity?caller=alice&rule=github-*")
        assert b'data-flow="f0"' in page.body and b'data-flow="f1"' not in page.body
        assert b'data-flow="f2"' not in page.body
        part = await h.call("GET", "/console/partials/activity?decision=blocked")
        assert b'data-flow="f1"' in part.body and b'data-flow="f0"' not in part.body

    run(main())


def test_live_events_reach_an_open_stream() -> None:
    async def main() -> None:
        h = Harness()
        await h.sign_in()
        response = await h.call("GET", "/console/events")
        assert response.stream is not None
        stream = response.stream
        assert await stream.__anext__() == b"retry: 2000\n\n"
        nxt = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.05)
        await h.state.hold(held(), dedupe="d", timeout=60)
        assert await asyncio.wait_for(nxt, 5) == b"event: approvals\ndata: {}\n\n"
        await h.state.publish_activity([{"flow_id": "x"}])
        assert await asyncio.wait_for(stream.__anext__(), 5) == b"event: activity\ndata: {}\n\n"
        await stream.aclose()  # type: ignore[attr-defined]
        assert not h.state._subscriptions

    run(main())


# -- the listener -------------------------------------------------------------------------------


def test_listener_mounts_by_prefix_and_streams_until_stopped() -> None:
    async def main() -> None:
        listener = ControlListener("127.0.0.1", 0)

        async def a(request: Request) -> Response:
            return Response.json(200, {"who": "a", "path": request.path})

        async def b(request: Request) -> Response:
            async def chunks() -> Any:
                yield b"one\n"
                await asyncio.sleep(3600)

            return Response(200, [("content-type", "text/plain")], stream=chunks())

        listener.mount("/v1", a)
        listener.mount("/v1/stream", b)
        with pytest.raises(ValueError):
            listener.mount("/v1", a)
        port = listener.start()

        async def http(raw: bytes) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw)
            data = await reader.read()
            writer.close()
            return data

        assert b'"who": "a"' in await http(b"GET /v1/grants HTTP/1.1\r\nhost: x\r\n\r\n")
        assert b" 404 " in await http(b"GET /v1x HTTP/1.1\r\nhost: x\r\n\r\n")
        assert b" 413 " in await http(b"POST /v1 HTTP/1.1\r\ncontent-length: 99999999\r\n\r\n")
        assert b" 400 " in await http(
            b"POST /v1 HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /v1/stream HTTP/1.1\r\nhost: x\r\n\r\n")
        head = await reader.readuntil(b"one\n")
        assert head.startswith(b"HTTP/1.1 200") and b"content-length" not in head
        listener.stop()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # stop ends open streams
        writer.close()

    run(main())


def test_sessions_of_email_identities_open_through_their_links(tmp_path: Path) -> None:
    _, name = write_session(tmp_path, [flow_state(b"x")], identity="carol@example.com")
    assert "@" in name

    async def main() -> None:
        h = Harness(Recordings(tmp_path))
        await h.sign_in()
        listing = await h.call("GET", "/console/sessions")
        link = re.search(rb'href="(/console/sessions/[^"]+)"', listing.body)
        assert link is not None
        assert (await h.call("GET", link.group(1).decode())).status == 200
        quoted = f"/console/flows/{name.replace('@', '%40')}/0"
        assert (await h.call("GET", quoted)).status == 200

    run(main())


def test_the_sessions_view_checks_the_signed_index_like_sessions_verify(tmp_path: Path) -> None:
    signer = chain.Signer.generate()
    store = SessionStore(tmp_path, signer, Limits(1 << 30, 3600, 300, None, None, 0))
    names = [
        store.write(who, state["id"], tnetstring.dumps(state)).session
        for who, state in (("alice", flow_state(b"a")), ("bob", flow_state(b"b")))
    ]
    store.close("test")

    async def main() -> None:
        h = Harness(Recordings(tmp_path, signer.public_key))
        await h.sign_in()
        listing = await h.call("GET", "/console/sessions")
        assert b'data-failed="false"' in listing.body and b"verify-ok" in listing.body
        (tmp_path / names[1]).unlink()
        (tmp_path / (names[1] + ".chain")).unlink()
        listing = await h.call("GET", "/console/sessions")
        assert b'data-failed="true"' in listing.body
        assert b"session_missing" in listing.body and names[1].encode() in listing.body

    run(main())
