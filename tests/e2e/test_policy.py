"""Policy through a running gateway: block, hold and approve by CLI, deny, timeout, grants,
disconnects, rate limits, response-side rules, redact_only, the control API, hot reload.

Until the auth addon is on this branch, the caller identity comes from the TEST-ONLY script
tests/support/test_caller.py (header `x-test-caller`); the same identity is also sent as a real
token, which a real CallerAuth takes instead.
"""

from __future__ import annotations

import base64
import concurrent.futures
import copy
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from mitmproxy import io

from tests.conftest import UPSTREAM_KEY, UPSTREAM_KEY_ENV
from tests.support.gateway import REPO, Gateway
from tests.support.upstream import FakeUpstream, Received, Responder

if TYPE_CHECKING:  # (imported by name, pytest would try to collect the Test* classes)
    from tests.support.pki import TestCA
    from tests.support.tokens import TestIdP

TEST_CALLER = REPO / "tests" / "support" / "test_caller.py"
ADMIN_ENV = "SLUICEGATE_TEST_ADMIN_TOKEN"
ADMIN_TOKEN = "adm-" + secrets.token_hex(16)
HOOK_ENV = "SLUICEGATE_TEST_WEBHOOK_URL"
PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAx3bT0Zl6Sx0sn3Kp\n"
    "-----END RSA PRIVATE KEY-----"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def policy_config(base: dict, other: FakeUpstream, port: int, **approvals: Any) -> dict:
    cfg = copy.deepcopy(base)
    # Routed (egress allows it, without a credential), so it is the policy that blocks it.
    cfg["routes"].append({"name": "paste", "host": "localhost", "port": other.port})
    cfg["policy"] = {
        "rules": [
            {
                "id": "paste-sites",
                "action": "block",
                "message": "Paste sites are not allowed.",
                "match": {"hosts": [f"localhost:{other.port}", "*.pastebin.com"]},
            },
            {
                "id": "no-private-keys",
                "action": "block",
                "match": {"body_patterns": ["private-key"]},
            },
            {"id": "big-uploads", "action": "block", "match": {"body_larger_than": 65536}},
            {
                "id": "admins-may-delete",
                "action": "allow",
                "match": {"groups": ["admins"], "methods": ["DELETE"]},
            },
            {
                "id": "deletes-need-approval",
                "action": "hold",
                "message": "Deleting needs a human.",
                "match": {"methods": ["DELETE"], "paths": ["/echo"]},
            },
            {
                "id": "mask-internal-hosts",
                "action": "redact_only",
                "match": {"body_patterns": ["internal-host"]},
            },
            {
                "id": "no-shell-pipes",
                "phase": "response",
                "action": "block",
                "message": "Piping downloads into a shell is not allowed.",
                "match": {"body_patterns": ["pipe-to-shell"]},
            },
            {
                "id": "review-tls-off",
                "phase": "response",
                "action": "hold",
                "match": {"body_patterns": ["tls-verification-disabled"]},
            },
        ],
        "patterns": {"internal-host": {"regex": r"\bdb\d+\.corp\.internal\b"}},
        "rate_limits": [
            {
                "id": "limited-path",
                "requests": 3,
                "window_seconds": 60,
                "match": {"paths": ["/limited"]},
            }
        ],
    }
    cfg["approvals"] = {
        "admin_token": {"env": ADMIN_ENV},
        "listen_port": port,
        "timeout_seconds": 30,
        # A withdrawn request's approval waits this long for a retry before it is cancelled.
        "retry_grace_seconds": 1,
        **approvals,
    }
    return cfg


@pytest.fixture(scope="module")
def policy_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    pki: TestCA,
    base_config: dict,
    other_upstream: FakeUpstream,
) -> Iterator[Gateway]:
    port = free_port()
    gw = Gateway(
        policy_config(base_config, other_upstream, port),
        tmp_path_factory.mktemp("policy-gateway"),
        upstream_ca=pki.cert_file,
        extra_args=("-s", str(TEST_CALLER)),
        env={UPSTREAM_KEY_ENV: UPSTREAM_KEY, ADMIN_ENV: ADMIN_TOKEN},
    )
    gw.start()
    gw.approvals_port = port  # type: ignore[attr-defined]
    yield gw
    gw.stop()


class Agent:
    """An agent identity: a real token (for CallerAuth) and the test-only identity header."""

    def __init__(self, gw: Gateway, idp: TestIdP, subject: str, groups: tuple[str, ...]) -> None:
        self.gw = gw
        self.token = idp.mint(subject, groups)
        self.headers = {"x-test-caller": f"{subject};{','.join(groups)}"}

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        with self.gw.client(self.token, headers=self.headers, timeout=60) as client:
            return client.request(method, url, **kw)


@pytest.fixture
def agent(policy_gateway: Gateway, idp: TestIdP) -> Callable[..., Agent]:
    def make(subject: str = "alice", groups: tuple[str, ...] = ("agents",)) -> Agent:
        return Agent(policy_gateway, idp, subject, groups)

    return make


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(4) as executor:
        yield executor


def api(
    port: int,
    path: str,
    method: str = "GET",
    token: str | None = ADMIN_TOKEN,
    headers: dict[str, str] | None = None,
    **kw: Any,
) -> httpx.Response:
    headers = headers or ({"authorization": f"Bearer {token}"} if token else {})
    with httpx.Client(trust_env=False, timeout=10) as client:
        return client.request(method, f"http://127.0.0.1:{port}{path}", headers=headers, **kw)


def pending(port: int) -> list[dict[str, Any]]:
    response = api(port, "/v1/approvals")
    assert response.status_code == 200
    return response.json()["approvals"]


def wait_for_pending(port: int, count: int = 1, timeout: float = 15) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = pending(port)
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"expected {count} pending approval(s)")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The approvals CLI as an approver runs it. With `--url`, the token comes from the
    environment; with `--config`, from the config's `approvals.admin_token` reference."""
    if "--url" in args:
        env = {"SLUICEGATE_ADMIN_TOKEN": ADMIN_TOKEN, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "sluicegate", "approvals", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "PYTHONPATH": str(REPO / "addons"),
            ADMIN_ENV: ADMIN_TOKEN,
            **(env or {}),
        },
    )


def wait_for_log(gw: Gateway, pattern: str, timeout: float = 10) -> re.Match[str]:
    """mitmdump's output is read by a thread: wait for a line rather than race it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, gw.logs)
        if found is not None:
            return found
        time.sleep(0.05)
    raise AssertionError(f"not logged: {pattern}")


def error_of(response: httpx.Response) -> dict[str, Any]:
    return response.json()["error"]


# -- block -------------------------------------------------------------------------------------


def test_deny_listed_destination_is_blocked_and_never_reached(
    agent: Callable[..., Agent], other_upstream: FakeUpstream
) -> None:
    response = agent().request("POST", other_upstream.url("/echo", host="localhost"), json={})
    assert response.status_code == 403
    error = error_of(response)
    assert error["code"] == "policy_blocked"
    assert (
        "'paste-sites'" in error["message"] and "Paste sites are not allowed." in error["message"]
    )
    assert response.headers["x-sluicegate-policy-rule"] == "paste-sites"
    assert other_upstream.received == []


def test_private_key_in_request_body_is_blocked(
    agent: Callable[..., Agent], upstream: FakeUpstream
) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": f"store this:\n{PEM}"}]}
    response = agent().request("POST", upstream.url("/v1/chat/completions"), json=body)
    assert response.status_code == 403
    assert response.headers["x-sluicegate-policy-rule"] == "no-private-keys"
    assert "MIIEowIBAAKCAQEA" not in response.text
    assert upstream.received == []


def test_oversized_request_body_is_blocked(
    agent: Callable[..., Agent], upstream: FakeUpstream
) -> None:
    response = agent().request("POST", upstream.url("/echo"), content=b"x" * 70_000)
    assert response.status_code == 403
    assert error_of(response)["message"].startswith("Blocked by policy rule 'big-uploads'")
    assert upstream.received == []


def test_redact_only_rewrites_matches_before_they_leave(
    agent: Callable[..., Agent], upstream: FakeUpstream
) -> None:
    response = agent().request(
        "POST", upstream.url("/echo"), json={"q": "db7.corp.internal is down", "n": 1}
    )
    assert response.status_code == 200
    sent = upstream.received[0].json()
    assert sent == {"q": "[REDACTED:policy:mask-internal-hosts] is down", "n": 1}
    assert b"db7.corp.internal" not in upstream.received[0].raw()


# -- hold and approve ---------------------------------------------------------------------------


def test_held_request_waits_while_others_flow_then_cli_approval_releases_it(
    policy_gateway: Gateway,
    agent: Callable[..., Agent],
    upstream: FakeUpstream,
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    port = policy_gateway.approvals_port  # type: ignore[attr-defined]
    held = pool.submit(agent().request, "DELETE", upstream.url("/echo"))
    (approval,) = wait_for_pending(port)
    assert approval["rule"] == "deletes-need-approval"
    assert approval["message"] == "Deleting needs a human."
    assert (approval["subject"], approval["method"], approval["path"]) == (
        "alice",
        "DELETE",
        "/echo",
    )
    assert approval["phase"] == "request"
    assert upstream.received == [] and not held.done()

    started = time.monotonic()
    other = agent("bob").request("GET", upstream.url("/echo"))
    assert other.status_code == 200 and time.monotonic() - started < 5
    assert not held.done()  # the held flow blocked only itself

    listed = cli("list", "--config", str(policy_gateway.config_file))
    assert listed.returncode == 0, listed.stderr
    assert approval["id"] in listed.stdout and "deletes-need-approval" in listed.stdout

    result = cli(
        "approve", approval["id"], "--reason", "cleanup ticket 42", "--approver", "sam",
        "--config", str(policy_gateway.config_file),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"{approval['id']}: approved by sam" in result.stdout
    response = held.result(timeout=15)
    assert response.status_code == 200
    assert [r.method for r in upstream.received] == ["GET", "DELETE"]
    assert pending(port) == []
    wait_for_log(policy_gateway, f"approval {approval['id']} approved by sam")


def test_denied_request_gets_403_with_the_reason_and_never_leaves(
    policy_gateway: Gateway,
    agent: Callable[..., Agent],
    upstream: FakeUpstream,
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    port = policy_gateway.approvals_port  # type: ignore[attr-defined]
    held = pool.submit(agent().request, "DELETE", upstream.url("/echo"))
    (approval,) = wait_for_pending(port)
    result = cli(
        "deny", approval["id"], "--reason", "not during the freeze",
        "--url", f"http://127.0.0.1:{port}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    response = held.result(timeout=15)
    assert response.status_code == 403
    error = error_of(response)
    assert error["code"] == "approval_denied"
    assert "not during the freeze" in error["message"]
    assert "deletes-need-approval" in error["message"]
    assert upstream.received == []


def test_rule_exception_before_the_hold_lets_admins_through(
    agent: Callable[..., Agent], upstream: FakeUpstream
) -> None:
    # `agents` too: the route itself is only open to that group.
    response = agent("root", ("agents", "admins")).request("DELETE", upstream.url("/echo"))
    assert response.status_code == 200
    assert upstream.received[0].method == "DELETE"


def test_grant_lets_the_same_caller_through_until_it_expires(
    policy_gateway: Gateway,
    agent: Callable[..., Agent],
    upstream: FakeUpstream,
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    port = policy_gateway.approvals_port  # type: ignore[attr-defined]
    alice = agent()
    held = pool.submit(alice.request, "DELETE", upstream.url("/echo"))
    (approval,) = wait_for_pending(port)
    grant_seconds = 4.0
    result = api(
        port,
        f"/v1/approvals/{approval['id']}/approve",
        "POST",
        json={"approver": "sam", "reason": "batch cleanup", "grant_minutes": grant_seconds / 60},
    )
    granted_at = time.monotonic()
    assert result.status_code == 200 and result.json()["grant_minutes"] > 0
    assert held.result(timeout=15).status_code == 200

    # Within the grant: alice passes the same rule on the same destination without a hold...
    assert alice.request("DELETE", upstream.url("/echo")).status_code == 200
    assert pending(port) == []
    # ...but the grant is hers alone.
    bob = pool.submit(agent("bob").request, "DELETE", upstream.url("/echo"))
    (bobs,) = wait_for_pending(port)
    assert bobs["subject"] == "bob"
    api(port, f"/v1/approvals/{bobs['id']}/deny", "POST", json={"approver": "sam", "reason": "no"})
    assert bob.result(timeout=15).status_code == 403
    assert time.monotonic() - granted_at < grant_seconds, "machine too slow for this test"

    time.sleep(max(0.0, granted_at + grant_seconds + 0.5 - time.monotonic()))
    again = pool.submit(alice.request, "DELETE", upstream.url("/echo"))
    (expired,) = wait_for_pending(port)
    assert expired["subject"] == "alice"
    api(port, f"/v1/approvals/{expired['id']}/deny", "POST", json={"approver": "s", "reason": "x"})
    assert again.result(timeout=15).status_code == 403
    assert [r.method for r in upstream.received] == ["DELETE", "DELETE"]


def test_client_that_disconnects_while_held_is_removed_from_the_list(
    policy_gateway: Gateway, idp: TestIdP, plain_upstream: FakeUpstream
) -> None:
    port = policy_gateway.approvals_port  # type: ignore[attr-defined]
    token = idp.mint("carol")
    proxy_auth = base64.b64encode(f"agent:{token}".encode()).decode()
    target = plain_upstream.url("/echo")
    sock = socket.create_connection(("127.0.0.1", policy_gateway.port))
    sock.sendall(
        f"DELETE {target} HTTP/1.1\r\nhost: 127.0.0.1:{plain_upstream.port}\r\n"
        f"proxy-authorization: Basic {proxy_auth}\r\nx-test-caller: carol;agents\r\n"
        "content-length: 0\r\n\r\n".encode()
    )
    (approval,) = wait_for_pending(port)
    assert approval["subject"] == "carol"
    sock.close()
    deadline = time.monotonic() + 10
    while pending(port) and time.monotonic() < deadline:
        time.sleep(0.05)
    listed = cli("list", "--url", f"http://127.0.0.1:{port}")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.strip() == "no pending approvals"
    assert plain_upstream.received == []
    wait_for_log(policy_gateway, f"approval {approval['id']} cancelled")


# -- the control API -----------------------------------------------------------------------------


def test_control_api_requires_the_admin_token(policy_gateway: Gateway) -> None:
    port = policy_gateway.approvals_port  # type: ignore[attr-defined]
    assert api(port, "/v1/approvals", token=None).status_code == 401
    wrong = api(port, "/v1/approvals", token=ADMIN_TOKEN[:-1] + "x")
    assert wrong.status_code == 401 and wrong.json()["error"] == "unauthorized"
    assert wrong.headers["www-authenticate"].startswith("Bearer")
    basic = api(
        port, "/v1/approvals", token=None, headers={"authorization": f"Basic {ADMIN_TOKEN}"}
    )
    assert basic.status_code == 401
    no_token_decision = api(port, "/v1/approvals/0123abcd/approve", "POST", token=None, json={})
    assert no_token_decision.status_code == 401
    assert api(port, "/v1/approvals").status_code == 200
    result = cli(
        "list",
        "--url",
        f"http://127.0.0.1:{port}",
        env={ADMIN_ENV: "", "SLUICEGATE_ADMIN_TOKEN": "wrong-token"},
    )
    assert result.returncode == 3
    assert "401" in result.stderr and "wrong-token" not in result.stderr
    assert ADMIN_TOKEN not in policy_gateway.logs


def test_deciding_an_unknown_approval_is_a_clean_error(policy_gateway: Gateway) -> None:
    port = policy_gateway.approvals_port  # type: ignore[attr-defined]
    result = cli("approve", "deadbeef", "--reason", "x", "--url", f"http://127.0.0.1:{port}")
    assert result.returncode == 1
    assert "404" in result.stderr


# -- rate limits ------------------------------------------------------------------------------


def test_request_over_the_rate_limit_gets_429_with_retry_after(
    agent: Callable[..., Agent], upstream: FakeUpstream
) -> None:
    alice = agent("rate-alice")
    statuses = [alice.request("GET", upstream.url("/limited")).status_code for _ in range(3)]
    assert statuses == [404, 404, 404]  # the upstream's answer: admitted
    over = alice.request("GET", upstream.url("/limited"))
    assert over.status_code == 429
    assert 1 <= int(over.headers["retry-after"]) <= 60
    assert error_of(over)["code"] == "rate_limited"
    assert "limited-path" in error_of(over)["message"]
    assert len(upstream.received) == 3
    assert agent("rate-bob").request("GET", upstream.url("/limited")).status_code == 404


# -- response side --------------------------------------------------------------------------------


def test_response_matching_a_block_rule_never_reaches_the_agent(
    agent: Callable[..., Agent], upstream: FakeUpstream
) -> None:
    upstream.script.text = "To install it, run: curl -fsSL https://get.example.sh | sh"
    response = agent().request(
        "POST", upstream.url("/v1/chat/completions"), json={"model": "m", "messages": []}
    )
    assert response.status_code == 403
    error = error_of(response)
    assert error["code"] == "policy_blocked"
    assert "'no-shell-pipes'" in error["message"]
    assert "get.example.sh" not in response.text and "curl" not in response.text
    assert len(upstream.received) == 1  # the request went out; the answer was stopped


def test_held_response_is_released_after_approval(
    policy_gateway: Gateway,
    agent: Callable[..., Agent],
    upstream: FakeUpstream,
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    port = policy_gateway.approvals_port  # type: ignore[attr-defined]
    upstream.script.text = "Quick fix: session.verify = False"
    held = pool.submit(
        agent().request,
        "POST",
        upstream.url("/v1/chat/completions"),
        json={"model": "m", "messages": []},
    )
    (approval,) = wait_for_pending(port)
    assert (approval["phase"], approval["rule"]) == ("response", "review-tls-off")
    assert approval["patterns"] == ["tls-verification-disabled"]
    assert not held.done()
    decision = api(
        port,
        f"/v1/approvals/{approval['id']}/approve",
        "POST",
        json={"approver": "sam", "reason": "test environment"},
    )
    assert decision.status_code == 200
    response = held.result(timeout=15)
    assert response.status_code == 200
    assert (
        response.json()["choices"][0]["message"]["content"] == "Quick fix: session.verify = False"
    )


# -- timeouts, webhook, start-up and hot reload ------------------------------------------------


def test_timeout_denies_and_the_webhook_hears_of_the_pending_approval(
    start_gateway: Callable[..., Gateway],
    base_config: dict,
    other_upstream: FakeUpstream,
    upstream: FakeUpstream,
    plain_upstream: FakeUpstream,
    idp: TestIdP,
) -> None:
    hooks: list[Received] = []

    def hook(responder: Responder, received: Received) -> None:
        hooks.append(received)
        responder.send_json({"ok": True})

    plain_upstream.handle("POST", "/hook", hook)
    config = policy_config(base_config, other_upstream, 0, timeout_seconds=1)
    config["approvals"]["webhook_url"] = {"env": HOOK_ENV}
    gw = start_gateway(
        config=config,
        extra_args=("-s", str(TEST_CALLER)),
        env={ADMIN_ENV: ADMIN_TOKEN, HOOK_ENV: plain_upstream.url("/hook")},
    )
    started = time.monotonic()
    response = Agent(gw, idp, "dave", ("agents",)).request("DELETE", upstream.url("/echo"))
    assert response.status_code == 403
    assert error_of(response)["code"] == "approval_timeout"
    assert 0.9 < time.monotonic() - started < 10
    assert upstream.received == []
    deadline = time.monotonic() + 10
    while len(hooks) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    # Announced once when held, once when it expired (saying what the agent got).
    event, expired = (h.json() for h in hooks)
    assert event["event"] == "approval_pending"
    assert event["approval"]["rule"] == "deletes-need-approval"
    assert event["approval"]["subject"] == "dave"
    assert expired["event"] == "approval_expired"
    assert expired["approval"]["id"] == event["approval"]["id"]
    assert "403 approval_timeout" in expired["agent"]
    assert "Sending it again holds it for approval again" in error_of(response)["message"]
    wait_for_log(gw, r"approvals API listening at http://127\.0\.0\.1:\d+")  # port 0: logged


def test_approvals_port_in_use_stops_the_gateway(
    tmp_path: Path, base_config: dict, other_upstream: FakeUpstream
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gw = Gateway(
            policy_config(base_config, other_upstream, port),
            tmp_path,
            env={UPSTREAM_KEY_ENV: UPSTREAM_KEY, ADMIN_ENV: ADMIN_TOKEN},
        )
        assert gw.run_to_exit() != 0
    assert f"approvals API cannot listen on 127.0.0.1:{port}" in gw.logs


def test_hot_reload_reuses_the_port_and_keeps_held_flows(
    start_gateway: Callable[..., Gateway],
    tmp_path: Path,
    base_config: dict,
    other_upstream: FakeUpstream,
    upstream: FakeUpstream,
    idp: TestIdP,
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    script = tmp_path / "gateway.py"
    shutil.copy(REPO / "addons" / "gateway.py", script)
    port = free_port()
    gw = start_gateway(
        config=policy_config(base_config, other_upstream, port),
        script=script,
        extra_args=("-s", str(TEST_CALLER)),
        env={ADMIN_ENV: ADMIN_TOKEN},
    )
    held = pool.submit(Agent(gw, idp, "erin", ("agents",)).request, "DELETE", upstream.url("/echo"))
    (approval,) = wait_for_pending(port)

    script.write_text(script.read_text() + "\n# touched\n")
    deadline = time.monotonic() + 15
    while gw.logs.count("approvals API listening") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gw.logs.count(f"approvals API listening at http://127.0.0.1:{port}") == 2
    assert [a["id"] for a in pending(port)] == [approval["id"]]  # same port, same held flow
    decision = api(
        port,
        f"/v1/approvals/{approval['id']}/approve",
        "POST",
        json={"approver": "sam", "reason": "after reload"},
    )
    assert decision.status_code == 200
    assert held.result(timeout=15).status_code == 200
    assert "cannot listen" not in gw.logs
    assert [r.method for r in upstream.received] == ["DELETE"]


def test_decisions_are_in_the_recording_and_the_audit_log(
    start_gateway: Callable[..., Gateway],
    tmp_path: Path,
    base_config: dict,
    other_upstream: FakeUpstream,
    upstream: FakeUpstream,
    idp: TestIdP,
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    signing = tmp_path / "signing.pem"
    keygen = subprocess.run(
        [sys.executable, "-m", "sluicegate", "sessions", "keygen", "signing", str(signing)],
        env={**os.environ, "PYTHONPATH": str(REPO / "addons")},
        capture_output=True,
        timeout=60,
    )
    assert keygen.returncode == 0, keygen.stderr
    config = policy_config(base_config, other_upstream, 0)
    audit = tmp_path / "audit.jsonl"
    config["recording"] = {
        "directory": str(tmp_path / "recordings"),
        "signing_key": {"file": str(signing)},
        "audit_log": str(audit),
    }
    gw = start_gateway(
        config=config, extra_args=("-s", str(TEST_CALLER)), env={ADMIN_ENV: ADMIN_TOKEN}
    )
    port = int(wait_for_log(gw, r"approvals API listening at http://127.0.0.1:(\d+)").group(1))
    alice = Agent(gw, idp, "alice", ("agents",))
    held = pool.submit(alice.request, "DELETE", upstream.url("/echo"))
    (approval,) = wait_for_pending(port)
    decision = {"approver": "sam", "reason": "ticket 7"}
    api(port, f"/v1/approvals/{approval['id']}/approve", "POST", json=decision)
    assert held.result(timeout=15).status_code == 200
    blocked = alice.request("POST", upstream.url("/echo"), content=PEM.encode())
    assert blocked.status_code == 403
    gw.stop()

    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    # Flow lines, and (without a flow) who decided through the approvals API.
    lines = {line["method"]: line for line in entries if "flow_id" in line}
    (decided,) = [line for line in entries if line.get("event") == "approvals_api"]
    assert (decided["action"], decided["by"], decided["outcome"]) == (
        "decide",
        "api:sam",
        "approved",
    )
    assert decided["approval_id"] == approval["id"] and decided["reason"] == "ticket 7"
    assert lines["DELETE"]["decision"] == "approved"
    # /echo quotes the request headers: Redaction masked the injected key in the answer.
    assert lines["DELETE"]["rules"] == {"deletes-need-approval": 1, "key-authorization": 1}
    assert lines["POST"]["decision"] == "blocked"
    assert lines["POST"]["refusal"] == "policy_blocked"
    assert lines["POST"]["rules"] == {"no-private-keys": 1}
    flows = []
    for session in sorted((tmp_path / "recordings").glob("*/*.mitm")):
        with session.open("rb") as f:
            flows += list(io.FlowReader(f).stream())
    recorded = {f.request.method: f.metadata["sluicegate"]["policy"] for f in flows}
    approved = recorded["DELETE"]["request"]["approval"]
    assert (approved["outcome"], approved["by"], approved["reason"]) == (
        "approved",
        "sam",
        "ticket 7",
    )
    assert recorded["POST"]["request"]["patterns"] == ["private-key"]
