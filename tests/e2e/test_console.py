"""The web console through a real gateway, driven in headless Chromium (Debian's `chromium`).

One gateway (hold rules, approvals, console, recording) and one browser serve the module. An
agent's held request appears live, is approved in the browser and completes; another is denied;
a grant is revoked; a recorded flow shows its redaction tags and decision. Requests without a
valid session and forged cross-site form posts change nothing.
"""

from __future__ import annotations

import concurrent.futures
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY, UPSTREAM_KEY_ENV
from tests.support.console import (
    ADMIN_ENV,
    ADMIN_TOKEN,
    APPROVERS,
    INVESTIGATORS,
    PLANTED,
    chromium,
    console_config,
    free_port,
    sign_in,
)
from tests.support.gateway import Gateway
from tests.support.upstream import FakeUpstream

if TYPE_CHECKING:
    from tests.support.pki import TestCA
    from tests.support.tokens import TestIdP


@pytest.fixture(scope="module")
def console_gateway(
    tmp_path_factory: pytest.TempPathFactory, pki: TestCA, base_config: dict
) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("console-gateway")
    port = free_port()
    gw = Gateway(
        console_config(base_config, workdir, port),
        workdir,
        upstream_ca=pki.cert_file,
        env={UPSTREAM_KEY_ENV: UPSTREAM_KEY, ADMIN_ENV: ADMIN_TOKEN},
    )
    gw.start()
    gw.console = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    gw.recordings = workdir / "recordings"  # type: ignore[attr-defined]
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as context:
        yield context


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    browser.clear_cookies()
    page = browser.new_page()
    page.set_default_timeout(15_000)
    yield page
    page.close()


@pytest.fixture(scope="module")
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(4) as executor:
        yield executor


def api(gw: Gateway, path: str, method: str = "GET", **kw: Any) -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=10) as client:
        return client.request(
            method,
            f"{gw.console}{path}",  # type: ignore[attr-defined]
            headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
            **kw,
        )


def pending(gw: Gateway) -> list[dict[str, Any]]:
    return api(gw, "/v1/approvals").json()["approvals"]


def wait_pending(gw: Gateway, count: int = 1, timeout: float = 15) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = pending(gw)
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"expected {count} pending approval(s), got {pending(gw)}")


def agent_request(
    gw: Gateway, upstream: FakeUpstream, token: str, method: str, path: str, **kw: Any
) -> httpx.Response:
    with gw.client(token, timeout=60) as client:
        return client.request(method, upstream.url(path), **kw)


def audit_lines(gw: Gateway) -> list[dict[str, Any]]:
    path: Path = gw.recordings / "audit.jsonl"  # type: ignore[attr-defined]
    return [json.loads(line) for line in path.read_text().splitlines() if line]


# -- the browser --------------------------------------------------------------------------------


def test_sign_in_see_a_held_request_live_approve_it_and_the_agent_completes(
    console_gateway: Gateway,
    upstream: FakeUpstream,
    page: Any,
    idp: TestIdP,
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    gw = console_gateway
    sign_in(page, gw.console, ADMIN_TOKEN, "Ada")  # type: ignore[attr-defined]
    page.wait_for_url("**/console/approvals")
    assert page.text_content("#who") == "admin:Ada"
    page.wait_for_selector("#pending li.empty")
    page.wait_for_function("document.body.dataset.live === 'connected'")

    body = {"cleanup": "remove the cache", "note": f"push with {PLANTED} later"}
    token = idp.mint("agent-alice", ("agents",))
    future = pool.submit(agent_request, gw, upstream, token, "DELETE", "/echo", json=body)
    # Appears without a reload (server-sent event, then the partial merged in).
    card = page.wait_for_selector("li.approval")
    text = card.inner_text()
    assert "deletes-need-approval" in text and "Deleting needs a human." in text
    assert "agent-alice" in text and "DELETE" in text and "/echo" in text
    preview = page.text_content("li.approval pre.body") or ""
    assert "[REDACTED:github-token]" in preview and PLANTED not in page.content()
    assert not future.done()

    page.fill("li.approval input[name=reason]", "ticket 42")
    page.click("li.approval button.approve")
    page.wait_for_selector("#notice[data-notice=approved]")
    response = future.result(timeout=20)
    assert response.status_code == 200, response.text
    page.wait_for_selector("#pending li.empty")
    page.wait_for_selector("#history tr:has-text('ticket 42')")

    decisions = [a for a in audit_lines(gw) if a.get("action") == "decide"]
    assert decisions[-1]["by"] == "admin:Ada" and decisions[-1]["outcome"] == "approved"
    assert decisions[-1]["reason"] == "ticket 42"


def test_deny_another(
    console_gateway: Gateway,
    upstream: FakeUpstream,
    page: Any,
    idp: TestIdP,
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    gw = console_gateway
    sign_in(page, gw.console, ADMIN_TOKEN, "Ada")  # type: ignore[attr-defined]
    page.wait_for_url("**/console/approvals")
    token = idp.mint("agent-bob", ("agents",))
    future = pool.submit(agent_request, gw, upstream, token, "DELETE", "/echo?x=1")
    page.wait_for_selector("li.approval:has-text('agent-bob')")
    page.fill("li.approval input[name=reason]", "not on a Friday")
    page.click("li.approval button.deny")
    page.wait_for_selector("#notice[data-notice=denied]")
    response = future.result(timeout=20)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "approval_denied"
    assert "not on a Friday" in response.json()["error"]["message"]


def test_approve_with_a_grant_then_revoke_it(
    console_gateway: Gateway,
    upstream: FakeUpstream,
    page: Any,
    idp: TestIdP,
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    gw = console_gateway
    # An approver signs in with their own token from the identity provider.
    sign_in(page, gw.console, idp.mint("carol@example.com", (APPROVERS,)))  # type: ignore[attr-defined]
    page.wait_for_url("**/console/approvals")
    assert page.text_content("#who") == "oidc:carol@example.com"
    token = idp.mint("agent-dave", ("agents",))
    future = pool.submit(agent_request, gw, upstream, token, "PUT", "/echo", json={"a": 1})
    page.wait_for_selector("li.approval:has-text('agent-dave')")
    page.fill("li.approval input[name=reason]", "release week")
    page.fill("li.approval input[name=grant_minutes]", "30")
    page.click("li.approval button.approve")
    assert future.result(timeout=20).status_code == 200
    row = page.wait_for_selector("#grants tr[data-grant]")
    assert "agent-dave" in row.inner_text() and "review-uploads" in row.inner_text()
    # The grant lets the next upload through without a hold.
    assert agent_request(gw, upstream, token, "PUT", "/echo", json={"a": 2}).status_code == 200

    page.fill("#grants tr[data-grant] input[name=reason]", "done early")
    page.click("#grants tr[data-grant] button")
    page.wait_for_selector("#notice[data-notice=revoked]")
    page.wait_for_selector("#grants tr[data-key=empty]")
    assert api(gw, "/v1/grants").json()["grants"] == []
    revokes = [a for a in audit_lines(gw) if a.get("action") == "revoke"]
    assert revokes[-1]["by"] == "oidc:carol@example.com"
    # Held again after the revocation.
    again = pool.submit(agent_request, gw, upstream, token, "PUT", "/echo", json={"a": 3})
    approval = wait_pending(gw)[0]
    api(gw, f"/v1/approvals/{approval['id']}/deny", "POST", json={"approver": "t", "reason": "r"})
    assert again.result(timeout=20).status_code == 403


def test_activity_and_a_recorded_flow_with_redaction_tags_and_the_decision(
    console_gateway: Gateway,
    upstream: FakeUpstream,
    page: Any,
    idp: TestIdP,
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    gw = console_gateway
    sign_in(page, gw.console, idp.mint("erin", (INVESTIGATORS,)))  # type: ignore[attr-defined]
    page.wait_for_url("**/console/approvals")
    token = idp.mint("agent-frank", ("agents",))
    page.goto(f"{gw.console}/console/activity?caller=agent-frank")  # type: ignore[attr-defined]
    page.wait_for_function("document.body.dataset.live === 'connected'")
    # An investigator sees the held request but may not decide it.
    future = pool.submit(
        agent_request,
        gw,
        upstream,
        token,
        "DELETE",
        "/echo",
        json={"note": f"push with {PLANTED} later"},
    )
    approval = wait_pending(gw)[0]
    api(
        gw,
        f"/v1/approvals/{approval['id']}/approve",
        "POST",
        json={"approver": "cli", "reason": "ok"},
    )
    assert future.result(timeout=20).status_code == 200
    row = page.wait_for_selector("#activity tr[data-flow]:has-text('agent-frank')")
    text = row.inner_text()
    assert "approved" in text and "github-token" in text and "DELETE" in text
    row.query_selector("a").click()
    page.wait_for_selector("#decision")
    assert page.text_content("#decision") == "approved"
    assert "[REDACTED:github-token]" in (page.text_content("#request-body mark.tag") or "")
    assert PLANTED not in page.content() and UPSTREAM_KEY not in page.content()
    trail = page.text_content("#policy .trail") or ""
    assert "approved" in trail and "cli" in trail
    assert "mitmweb -r" in page.content()
    views = [a for a in audit_lines(gw) if a.get("action") == "view_flow"]
    assert views[-1]["by"] == "oidc:erin"
    api_decisions = [a for a in audit_lines(gw) if a.get("event") == "approvals_api"]
    assert api_decisions[-1]["by"] == "api:cli" and api_decisions[-1]["outcome"] == "approved"

    page.goto(f"{gw.console}/console/sessions")  # type: ignore[attr-defined]
    assert page.query_selector("#sessions .badge.verify-ok, #sessions .badge.verify-unsealed")
    assert page.get_attribute("#directory-verdict", "data-failed") == "false"
    page.goto(f"{gw.console}/console/approvals")  # type: ignore[attr-defined]
    assert page.query_selector("form.decide") is None  # investigators cannot decide


def test_a_token_outside_the_console_groups_is_refused(
    console_gateway: Gateway, page: Any, idp: TestIdP
) -> None:
    sign_in(page, console_gateway.console, idp.mint("mallory", ("agents",)))  # type: ignore[attr-defined]
    page.wait_for_selector("#signin-error")
    assert page.url.endswith("/console/signin")
    page.goto(f"{console_gateway.console}/console/approvals")  # type: ignore[attr-defined]
    page.wait_for_url("**/console/signin")


# -- changes nothing ----------------------------------------------------------------------------


class AttackerSite:
    """A page on another origin that posts a form to the console as soon as it loads."""

    def __init__(self, target: str, fields: dict[str, str]) -> None:
        inputs = "".join(f'<input name="{k}" value="{v}">' for k, v in fields.items())
        page = (
            f'<html><body><form id="f" method="post" action="{target}">{inputs}</form>'
            "<script>document.getElementById('f').submit()</script></body></html>"
        ).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/html")
                self.send_header("content-length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_forged_cross_site_posts_and_requests_without_a_session_change_nothing(
    console_gateway: Gateway,
    upstream: FakeUpstream,
    page: Any,
    idp: TestIdP,
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    gw = console_gateway
    base = gw.console  # type: ignore[attr-defined]
    token = idp.mint("agent-gina", ("agents",))
    future = pool.submit(agent_request, gw, upstream, token, "DELETE", "/echo?gina=1")
    approval = wait_pending(gw)[0]
    decide = f"/console/approvals/{approval['id']}/decide"
    fields = {"outcome": "approve", "reason": "forged"}

    # No session at all, a forged cookie, a session without the CSRF token: nothing changes.
    with httpx.Client(trust_env=False, timeout=10) as client:
        r = client.post(f"{base}{decide}", data={**fields, "csrf": "x"})
        assert r.status_code == 401
    with httpx.Client(trust_env=False, timeout=10) as client:
        client.cookies.set("sg_console", "eyJ2IjoxfQ.forged")
        assert client.post(f"{base}{decide}", data=fields).status_code == 401

    sign_in(page, base, ADMIN_TOKEN, "Ada")
    page.wait_for_url("**/console/approvals")
    cookies = {c["name"]: c["value"] for c in page.context.cookies()}
    with httpx.Client(trust_env=False, timeout=10) as client:
        client.cookies.update(cookies)
        assert client.post(f"{base}{decide}", data=fields).status_code == 403
        csrf = page.get_attribute("li.approval input[name=csrf]", "value")
        evil = {"origin": "http://evil.example", "host": f"127.0.0.1:{base.rsplit(':', 1)[1]}"}
        r = client.post(f"{base}{decide}", data={**fields, "csrf": csrf}, headers=evil)
        assert r.status_code == 403

    # The signed-in browser visits pages of other origins that post the form by themselves:
    # same site, other port (the cookie is sent; no CSRF token) and another site (no cookie).
    for host, extra in (("127.0.0.1", {}), ("localhost", {"csrf": csrf or ""})):
        attacker = AttackerSite(f"{base}{decide}", {**fields, **extra})
        try:
            page.goto(f"http://{host}:{attacker.port}/")
            page.wait_for_load_state("networkidle")
            assert page.url.startswith(base)  # the form was posted
            assert "nothing was changed" in page.content() or "/signin" in page.url
        finally:
            attacker.close()
    assert [a["id"] for a in pending(gw)] == [approval["id"]]
    assert not future.done()
    refused = [a for a in audit_lines(gw) if a.get("action") == "csrf_refused"]
    assert refused, "a refused forgery is audited"
    api(gw, f"/v1/approvals/{approval['id']}/deny", "POST", json={"approver": "t", "reason": "r"})
    assert future.result(timeout=20).status_code == 403


def test_other_host_names_get_nothing(console_gateway: Gateway) -> None:
    base = console_gateway.console  # type: ignore[attr-defined]

    def get(**headers: str) -> httpx.Response:
        with httpx.Client(trust_env=False, timeout=10) as client:
            return client.get(f"{base}/console/signin", headers=headers)

    assert get(host="rebound.example:80").status_code == 421
    r = get()
    assert r.status_code == 200
    assert "sg_console_pre" in r.headers["set-cookie"]
    for flag in ("HttpOnly", "SameSite=Strict", "Path=/console"):
        assert flag in r.headers["set-cookie"]
    assert "Secure" not in r.headers["set-cookie"]
    assert "Secure" in get(**{"x-forwarded-proto": "https"}).headers["set-cookie"]
    assert "script-src 'self'" in r.headers["content-security-policy"]
