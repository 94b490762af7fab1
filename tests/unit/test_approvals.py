"""Approvals: the control API (dispatch and real socket) over the approvals service and a
memory state, the webhook notifier, and the `approvals` CLI against a live control API.
(The state itself: test_state.py; the service: test_approvals_service.py.)"""

from __future__ import annotations

import asyncio
import getpass
import http.server
import json
import logging
import socket
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from sluicegate.approvals.payloads import Notice
from sluicegate.approvals.server import ControlServer
from sluicegate.approvals.service import Approvals
from sluicegate.approvals.webhook import WebhookNotifier
from sluicegate.cli import approvals as cli
from sluicegate.config.schema import SecretRef
from sluicegate.state import ApprovalRequest, Hold, MemoryState

TOKEN = "t" * 32
TOKEN_ENV = "SLUICEGATE_TEST_APPROVALS_TOKEN"
T = TypeVar("T")


@pytest.fixture(autouse=True)
def _token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    for name in ("SLUICEGATE_ADMIN_TOKEN", "SLUICEGATE_APPROVALS_URL", "SLUICEGATE_CONFIG"):
        monkeypatch.delenv(name, raising=False)


def request(**kw: Any) -> ApprovalRequest:
    base: dict[str, Any] = {
        "request_id": "req-1",
        "rule_id": "deletes",
        "message": "Deleting needs a human.",
        "phase": "request",
        "subject": "alice",
        "issuer": "https://idp",
        "groups": ("agents",),
        "route": "openai",
        "host": "api.openai.com",
        "port": 443,
        "method": "DELETE",
        "path": "/v1/files/x",
        "grant_key": ("https://idp|alice", "route:openai", "deletes"),
    }
    base.update(kw)
    return ApprovalRequest(**base)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


async def open_hold(approvals: Approvals, **kw: Any) -> Hold:
    """A held request (as the Policy addon's would be), waiting."""
    return await approvals.state.hold(
        request(**kw), dedupe=json.dumps(sorted(kw.items()), default=str), timeout=30
    )


def test_a_cancelled_hold_on_memory_is_cancelled_for_good() -> None:
    async def scenario() -> None:
        state = MemoryState()
        approvals = Approvals(state)
        held = asyncio.ensure_future(approvals.hold(request(), dedupe="d", timeout=30))
        await asyncio.sleep(0.01)
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
        await asyncio.sleep(0.01)
        assert await state.pending() == []
        [entry] = await state.history()
        assert (entry.outcome, entry.reason) == ("cancelled", "shutdown")

    asyncio.run(scenario())


def test_pending_json_shows_no_grant_key() -> None:
    async def scenario() -> None:
        approvals = Approvals(MemoryState())
        hold = await open_hold(approvals)
        listed = hold.approval.as_json()
        assert set(listed) >= {"id", "rule", "subject", "method", "path", "expires_at"}
        assert "grant_key" not in listed and "client_id" not in listed

    asyncio.run(scenario())


# -- control API: dispatch -----------------------------------------------------------------------


def server(approvals: Approvals, port: int = 0, require_reason: bool = True) -> ControlServer:
    return ControlServer(
        approvals,
        host="127.0.0.1",
        port=port,
        admin_token=SecretRef(env=TOKEN_ENV),
        max_grant_minutes=60,
        require_reason=require_reason,
    )


def dispatch(api: ControlServer, *args: Any) -> tuple[int, dict[str, Any]]:
    return asyncio.run(api.dispatch(*args))


AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer"},
        {"authorization": f"Bearer {TOKEN[:-1]}"},
        {"authorization": f"Bearer {TOKEN}x"},
        {"authorization": f"Basic {TOKEN}"},
        {"authorization": TOKEN},
    ],
)
def test_every_endpoint_needs_the_admin_token(headers: dict[str, str]) -> None:
    api = server(Approvals(MemoryState()))
    for method, path in (
        ("GET", "/v1/approvals"),
        ("POST", "/v1/approvals/abcd1234/approve"),
        ("GET", "/v1/grants"),
        ("POST", "/v1/grants/0123456789abcdef/revoke"),
        ("GET", "/v1/history"),
        ("GET", "/v1/state"),
    ):
        status, payload = dispatch(api, method, path, headers, b"{}")
        assert (status, payload["error"]) == (401, "unauthorized")


def test_unavailable_admin_token_refuses_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    api = server(Approvals(MemoryState()))
    monkeypatch.delenv(TOKEN_ENV)
    assert dispatch(api, "GET", "/v1/approvals", AUTH, b"")[0] == 401


def decide_body(**kw: Any) -> bytes:
    return json.dumps({"approver": "sam", "reason": "ok", **kw}).encode()


@pytest.mark.parametrize(
    ("action", "body", "message"),
    [
        ("approve", b"not json", "body must be JSON"),
        ("approve", b"[]", "body must be a JSON object"),
        ("approve", json.dumps({"approver": "sam"}).encode(), "approver and reason are required"),
        ("approve", json.dumps({"reason": "ok"}).encode(), "approver is required"),
        ("approve", decide_body(reason=" \n "), "approver and reason are required"),
        ("approve", decide_body(grant_minutes=0), "grant_minutes must be a number above 0"),
        ("approve", decide_body(grant_minutes=61), "at most 60"),
        ("approve", decide_body(grant_minutes=True), "grant_minutes must be"),
        ("approve", decide_body(grant_minutes="5"), "grant_minutes must be"),
        ("deny", decide_body(grant_minutes=5), "only an approval can grant"),
        ("approve", decide_body(extra=1), "unknown fields: ['extra']"),
    ],
)
def test_bad_decisions_are_400(action: str, body: bytes, message: str) -> None:
    async def scenario() -> None:
        approvals = Approvals(MemoryState())
        pending = await open_hold(approvals)
        status, payload = await server(approvals).dispatch(
            "POST", f"/v1/approvals/{pending.id}/{action}", AUTH, body
        )
        assert status == 400 and message in payload["message"]
        assert await approvals.state.pending() != []  # nothing was decided

    asyncio.run(scenario())


def test_list_show_approve_deny_grants_revoke_history_and_unknown_ids() -> None:
    async def scenario() -> None:
        approvals = Approvals(MemoryState("replica-1"))
        api = server(approvals)
        a = await open_hold(approvals)
        b = await open_hold(approvals, request_id="req-2", grant_key=("b", "b", "b"))
        status, payload = await api.dispatch("GET", "/v1/approvals", AUTH, b"")
        assert status == 200 and [x["id"] for x in payload["approvals"]] == [a.id, b.id]
        assert payload["approvals"][0]["replica"] == "replica-1"
        status, payload = await api.dispatch(
            "POST", f"/v1/approvals/{a.id}/approve", AUTH, decide_body(grant_minutes=1.5)
        )
        assert status == 200
        assert (payload["outcome"], payload["by"], payload["grant_minutes"]) == (
            "approved",
            "sam",
            1.5,
        )
        status, payload = await api.dispatch("GET", f"/v1/approvals/{a.id}", AUTH, b"")
        assert status == 200 and payload["approval"]["status"] == "approved"
        status, payload = await api.dispatch(
            "POST", f"/v1/approvals/{b.id}/deny", AUTH, decide_body(reason="no\x1b[31m way")
        )
        assert status == 200 and payload["reason"] == "no [31m way"  # control chars removed
        status, payload = await api.dispatch(
            "POST", f"/v1/approvals/{a.id}/deny", AUTH, decide_body()
        )
        assert status == 409 and payload["resolution"]["outcome"] == "approved"
        for path in ("/v1/approvals/ffffffff/approve", "/v1/approvals/../../x/deny"):
            status, payload = await api.dispatch("POST", path, AUTH, decide_body())
            assert status == 404
        status, payload = await api.dispatch("GET", "/v1/grants", AUTH, b"")
        [grant] = payload["grants"]
        assert grant["approval_id"] == a.id and grant["rule"] == "deletes"
        path = f"/v1/grants/{grant['id']}/revoke"
        status, payload = await api.dispatch("POST", path, AUTH, decide_body(reason="over"))
        assert status == 200 and payload["revoked"]["id"] == grant["id"]
        assert (await api.dispatch("POST", path, AUTH, decide_body()))[0] == 404
        status, payload = await api.dispatch("GET", "/v1/history?limit=2", AUTH, b"")
        assert [h["outcome"] for h in payload["history"]] == ["revoked", "denied"]
        assert (await api.dispatch("GET", "/v1/history?limit=0", AUTH, b""))[0] == 400
        status, payload = await api.dispatch("GET", "/v1/state", AUTH, b"")
        assert payload == {
            "backend": "memory",
            "replica": "replica-1",
            "available": True,
            "durable": False,
        }
        assert (await api.dispatch("DELETE", "/v1/approvals", AUTH, b""))[0] == 405
        assert (await api.dispatch("GET", f"/v1/approvals/{a.id}/approve", AUTH, b""))[0] == 405
        assert (await api.dispatch("GET", "/admin", AUTH, b""))[0] == 404

    asyncio.run(scenario())


def test_require_reason_off_accepts_decisions_without_one() -> None:
    async def scenario() -> None:
        approvals = Approvals(MemoryState())
        hold = await open_hold(approvals)
        body = json.dumps({"approver": "sam"}).encode()
        path = f"/v1/approvals/{hold.id}/approve"
        assert (await server(approvals).dispatch("POST", path, AUTH, body))[0] == 400
        status, payload = await server(approvals, require_reason=False).dispatch(
            "POST", path, AUTH, body
        )
        assert status == 200 and payload["reason"] == ""

    asyncio.run(scenario())


# -- control API: the real socket ----------------------------------------------------------------


async def raw_http(port: int, data: bytes) -> tuple[int, dict[str, Any]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def get(path: str, token: str = TOKEN) -> bytes:
    return f"GET {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\r\n".encode()


def test_server_serves_stops_at_once_and_the_port_can_be_bound_again() -> None:
    async def scenario() -> None:
        approvals = Approvals(MemoryState())
        first = server(approvals)
        port = first.start()
        status, payload = await raw_http(port, get("/v1/approvals"))
        assert (status, payload) == (200, {"approvals": []})
        assert (await raw_http(port, get("/v1/approvals", token="nope")))[0] == 401
        assert (await raw_http(port, b"NONSENSE\r\n\r\n"))[0] == 400
        big = b"POST /v1/approvals/ab/deny HTTP/1.1\r\ncontent-length: 99999999\r\n\r\n"
        assert (await raw_http(port, big))[0] == 413
        first.stop()
        assert not first.listening
        with pytest.raises(OSError):
            await raw_http(port, get("/v1/approvals"))
        second = server(approvals, port)  # as after a script reload: same port, at once
        assert second.start() == port
        assert (await raw_http(port, get("/v1/approvals")))[0] == 200
        second.stop()

    asyncio.run(scenario())


def test_server_start_reports_a_taken_port() -> None:
    async def scenario() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            api = server(Approvals(MemoryState()), taken.getsockname()[1])
            with pytest.raises(OSError):
                api.start()
            assert not api.listening

    asyncio.run(scenario())


# -- webhook ---------------------------------------------------------------------------------------


class HookServer:
    def __init__(self, status: int = 200) -> None:
        self.bodies: list[dict[str, Any]] = []
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["content-length"])
                hook.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?key=SECRET-IN-URL"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def notify_and_wait(notifier: WebhookNotifier) -> None:
    hold = await open_hold(Approvals(MemoryState()))
    notifier.notify(Notice(hold.approval))
    for _ in range(200):
        await asyncio.sleep(0.01)
        if not notifier._tasks:
            return


def test_webhook_posts_the_pending_approval(monkeypatch: pytest.MonkeyPatch) -> None:
    hook = HookServer()
    monkeypatch.setenv("SLUICEGATE_TEST_HOOK", hook.url)
    try:
        notifier = WebhookNotifier(SecretRef(env="SLUICEGATE_TEST_HOOK"), timeout=5)
        asyncio.run(notify_and_wait(notifier))
    finally:
        hook.close()
    (event,) = hook.bodies
    assert event["event"] == "approval_pending"
    assert event["approval"]["rule"] == "deletes"
    assert event["approve"].startswith("python -m sluicegate approvals approve ")


@pytest.mark.parametrize("status", [500, None])
def test_webhook_failures_are_logged_without_the_url(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, status: int | None
) -> None:
    hook = HookServer(status or 200)
    url = hook.url
    if status is None:
        hook.close()  # nothing listens any more
    monkeypatch.setenv("SLUICEGATE_TEST_HOOK", url)
    caplog.set_level(logging.WARNING, "sluicegate.approvals")
    try:
        notifier = WebhookNotifier(SecretRef(env="SLUICEGATE_TEST_HOOK"), timeout=2)
        asyncio.run(notify_and_wait(notifier))
    finally:
        if status is not None:
            hook.close()
    assert "approvals webhook (approval_pending) for" in caplog.text
    assert "SECRET-IN-URL" not in caplog.text


# -- the CLI against a live control API ------------------------------------------------------


class LoopThread:
    """An event loop in a thread, so the blocking CLI can talk to a live ControlServer."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def live() -> Iterator[tuple[LoopThread, Approvals, int]]:
    loop = LoopThread()
    approvals = Approvals(MemoryState())
    api = server(approvals)

    async def start() -> int:
        return api.start()

    port = loop.run(start())
    yield loop, approvals, port

    async def stop() -> None:
        api.stop()

    loop.run(stop())
    loop.close()


def hold(loop: LoopThread, approvals: Approvals, **kw: Any) -> Any:
    async def open_and_wait() -> Any:
        pending = await open_hold(approvals, **kw)
        pending.waiter = asyncio.ensure_future(approvals.state.wait(pending, 30))  # type: ignore[attr-defined]
        return pending

    return loop.run(open_and_wait())


def test_cli_lists_approves_and_denies(
    live: tuple[LoopThread, Approvals, int],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    loop, registry, port = live
    monkeypatch.setenv("SLUICEGATE_ADMIN_TOKEN", TOKEN)
    url = ["--url", f"http://127.0.0.1:{port}"]
    assert cli.main(["list", *url]) == 0
    assert capsys.readouterr().out.strip() == "no pending approvals"

    a = hold(loop, registry)
    b = hold(
        loop,
        registry,
        request_id="req-2",
        rule_id="other",
        grant_key=("https://idp|alice", "route:openai", "other"),
    )
    assert cli.main(["list", *url]) == 0
    out = capsys.readouterr().out
    assert a.id in out and b.id in out and "DELETE openai/v1/files/x" in out
    assert cli.main(["list", "--json", *url]) == 0
    assert [x["id"] for x in json.loads(capsys.readouterr().out)] == [a.id, b.id]

    code = cli.main(
        ["approve", a.id, "--reason", "ok", "--approver", "sam", "--grant-minutes", "5", *url]
    )
    assert code == 0
    assert capsys.readouterr().out.strip() == f"{a.id}: approved by sam, grant 5 min"
    assert cli.main(["deny", b.id, "--reason", "no", *url]) == 0
    assert f"{b.id}: denied by " in capsys.readouterr().out
    assert loop.run(_result(a.waiter)).outcome == "approved"
    assert loop.run(_result(b.waiter)).outcome == "denied"
    assert cli.main(["deny", b.id, "--reason", "again", *url]) == 1
    assert "409" in capsys.readouterr().err
    assert cli.main(["grants", *url]) == 0
    out = capsys.readouterr().out
    grant = out.split()[0]
    assert "rule=deletes" in out and a.id in out
    assert cli.main(["revoke", grant, "--reason", "over", *url]) == 0
    assert capsys.readouterr().out.strip() == f"grant {grant}: revoked by {getpass.getuser()}"
    assert cli.main(["grants", *url]) == 0
    assert capsys.readouterr().out.strip() == "no active grants"
    assert cli.main(["history", *url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "revoked" in lines[0] and "denied" in lines[1] and "approved by sam (ok)" in lines[2]
    assert cli.main(["show", a.id, *url]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "approved"
    assert cli.main(["approve", "ffffffff", *url]) == 1  # no reason: refused by the gateway
    assert "400" in capsys.readouterr().err


async def _result(waiter: Any) -> Any:
    return await waiter


def test_cli_reads_url_and_token_from_the_approvals_section_only(
    live: tuple[LoopThread, Approvals, int],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, _, port = live
    path = tmp_path / "gw.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "routes": [{"name": "x", "host": "x", "credential": {"env": "NOT_SET_ANYWHERE"}}],
                "approvals": {
                    "admin_token": {"env": TOKEN_ENV},
                    "listen_port": port,
                    "webhook_url": {"env": "NOT_SET_EITHER"},
                },
            }
        )
    )
    assert cli.main(["list", "--config", str(path)]) == 0
    assert capsys.readouterr().out.strip() == "no pending approvals"


def test_cli_token_file_and_errors(
    live: tuple[LoopThread, Approvals, int],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, _, port = live
    url = ["--url", f"http://127.0.0.1:{port}"]
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert cli.main(["list", "--token-file", str(token_file), *url]) == 0
    token_file.write_text("wrong-token-value")
    assert cli.main(["list", "--token-file", str(token_file), *url]) == 3
    err = capsys.readouterr().err
    assert "401" in err and "wrong-token-value" not in err
    assert cli.main(["list", "--token-file", str(tmp_path / "missing"), *url]) == 2
    assert cli.main(["list"]) == 2  # nowhere to go
    assert "no gateway" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    args = ["list", "--token-file", str(tmp_path / "token"), "--url", f"http://127.0.0.1:{closed}"]
    token_file.write_text(TOKEN)
    assert cli.main(args) == 4
