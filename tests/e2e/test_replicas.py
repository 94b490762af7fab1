"""Several replicas, one state: two real gateway processes on one real redis-server.

A flow held on replica A is approved through B's control API (and CLI) and released on A; a
grant made on B lets the next request through A; a limit of N admits exactly N across both under
concurrent load; killing Redis gives the documented behaviour (503 `state_unavailable` for flows
that need it, or per-replica state with `on_unavailable: local`) and recovers when it returns;
pending approvals and grants survive a gateway restart; an SDK's retries of a held request make
one approval and one webhook.
"""

from __future__ import annotations

import base64
import concurrent.futures
import copy
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest

from tests.conftest import UPSTREAM_KEY, UPSTREAM_KEY_ENV
from tests.support.gateway import REPO, Gateway
from tests.support.redis_server import RedisServer
from tests.support.upstream import FakeUpstream, Received, Responder

if TYPE_CHECKING:
    from tests.support.pki import TestCA
    from tests.support.tokens import TestIdP

ADMIN_ENV = "SLUICEGATE_TEST_ADMIN_TOKEN"
ADMIN_TOKEN = "adm-" + secrets.token_hex(16)
REDIS_URL_ENV = "SLUICEGATE_TEST_REDIS_URL"
HOOK_ENV = "SLUICEGATE_TEST_WEBHOOK_URL"
LIMIT = 10


def replica_config(
    base: dict[str, Any], redis_url_env: str, prefix: str, **state: Any
) -> dict[str, Any]:
    cfg = copy.deepcopy(base)
    cfg["policy"] = {
        "rules": [
            {
                "id": "deletes-need-approval",
                "action": "hold",
                "message": "Deleting needs a human.",
                "match": {"methods": ["DELETE"], "paths": ["/echo"]},
            },
            {
                "id": "reviewed-chats",
                "action": "hold",
                "match": {"groups": ["reviewed"], "paths": ["/v1/chat/completions"]},
            },
        ],
        "rate_limits": [
            {
                "id": "fleet-limit",
                "requests": LIMIT,
                "window_seconds": 120,
                "per": "caller",
                "match": {"paths": ["/limited"]},
            }
        ],
    }
    cfg["approvals"] = {
        "admin_token": {"env": ADMIN_ENV},
        "listen_port": 0,
        "timeout_seconds": 60,
        "retry_grace_seconds": 2,
        "webhook_url": {"env": HOOK_ENV},
        "approval_url": "https://console.example.com/approvals/{id}",
    }
    cfg["state"] = {
        "backend": "redis",
        "url": {"env": redis_url_env},
        "key_prefix": prefix,
        "timeout_seconds": 1,
        **state,
    }
    return cfg


class Replica:
    """A gateway process and its control API."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        found = re.search(r"approvals API listening at http://127\.0\.0\.1:(\d+)", gw.logs)
        assert found, gw.logs
        self.api_port = int(found.group(1))

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def api(self, path: str, method: str = "GET", **kw: Any) -> httpx.Response:
        with httpx.Client(trust_env=False, timeout=10) as client:
            return client.request(
                method,
                self.api_url + path,
                headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
                **kw,
            )

    def pending(self) -> list[dict[str, Any]]:
        response = self.api("/v1/approvals")
        assert response.status_code == 200, response.text
        return response.json()["approvals"]

    def wait_pending(
        self, predicate: Callable[[dict[str, Any]], bool] = lambda a: True, timeout: float = 15
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            response = self.api("/v1/approvals")
            # 503 while Redis is down and this replica holds nothing locally yet (the hold may
            # still be on its way): keep waiting.
            if response.status_code != 503:
                assert response.status_code == 200, response.text
                for approval in response.json()["approvals"]:
                    if predicate(approval):
                        return approval
            time.sleep(0.05)
        raise AssertionError(f"no such pending approval; pending: {self.pending()}")

    def request(self, token: str, method: str, url: str, **kw: Any) -> httpx.Response:
        with self.gw.client(token, timeout=60) as client:
            return client.request(method, url, **kw)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sluicegate", "approvals", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "PYTHONPATH": str(REPO / "addons"),
            "SLUICEGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        },
    )


class Hooks:
    """The webhook receiver: every POST to /hook on the plain upstream."""

    def __init__(self, plain: FakeUpstream) -> None:
        self.received: list[dict[str, Any]] = []
        self.lock = threading.Lock()

        def hook(responder: Responder, got: Received) -> None:
            with self.lock:
                self.received.append(got.json())
            responder.send_json({"ok": True})

        plain.handle("POST", "/hook", hook)
        self.url = plain.url("/hook")

    def events(self) -> list[str]:
        with self.lock:
            return [h["event"] for h in self.received]

    def wait_for(self, event: str, timeout: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for h in self.received:
                    if h["event"] == event:
                        return h
            time.sleep(0.05)
        raise AssertionError(f"no {event} webhook; got {self.events()}")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def hooks(plain_upstream: FakeUpstream) -> Hooks:
    return Hooks(plain_upstream)


@pytest.fixture(autouse=True)
def _limited_path(upstream: FakeUpstream) -> None:
    upstream.handle("GET", "/limited", lambda r, got: r.send_json({"ok": True}))


StartReplica = Callable[..., Replica]


@pytest.fixture
def start_replica(
    tmp_path: Path, pki: TestCA, base_config: dict, hooks: Hooks
) -> Iterator[StartReplica]:
    """`start_replica(redis, prefix, name=...)`: a gateway of the deployment `prefix`."""
    started: list[Gateway] = []

    def start(
        redis: RedisServer,
        prefix: str,
        name: str,
        workdir: Path | None = None,
        redis_url: str | None = None,
        **state: Any,
    ) -> Replica:
        gw = Gateway(
            replica_config(base_config, REDIS_URL_ENV, prefix, **state),
            workdir or tmp_path / name,
            upstream_ca=pki.cert_file,
            env={
                UPSTREAM_KEY_ENV: UPSTREAM_KEY,
                ADMIN_ENV: ADMIN_TOKEN,
                REDIS_URL_ENV: redis_url or redis.url,
                HOOK_ENV: hooks.url,
            },
        )
        started.append(gw)
        gw.start()
        return Replica(gw)

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def pair(start_replica: StartReplica, redis_server: RedisServer) -> tuple[Replica, Replica]:
    prefix = f"e2e:{secrets.token_hex(4)}:"
    return start_replica(redis_server, prefix, "a"), start_replica(redis_server, prefix, "b")


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(8) as executor:
        yield executor


def error_code(response: httpx.Response) -> str:
    return response.json()["error"]["code"]


# -- approvals across replicas ----------------------------------------------------------------


def test_held_on_a_approved_through_b_released_on_a(
    pair: tuple[Replica, Replica],
    idp: TestIdP,
    upstream: FakeUpstream,
    hooks: Hooks,
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    a, b = pair
    token = idp.mint("alice", ["agents"])
    held = pool.submit(a.request, token, "DELETE", upstream.url("/echo"))
    approval = b.wait_pending()  # listed by the replica that does not hold it
    assert (approval["subject"], approval["method"], approval["rule"]) == (
        "alice",
        "DELETE",
        "deletes-need-approval",
    )
    assert approval["waiting"] == 1 and approval["attempts"] == 1
    assert a.pending() == [approval]
    listed = cli("list", "--url", b.api_url)
    assert listed.returncode == 0 and approval["id"] in listed.stdout, listed.stderr
    assert upstream.received == [] and not held.done()

    decided = cli(
        "approve", approval["id"], "--reason", "ticket 42", "--approver", "sam",
        "--url", b.api_url,
    )  # fmt: skip
    assert decided.returncode == 0, decided.stderr
    started = time.monotonic()
    response = held.result(timeout=15)
    assert response.status_code == 200
    assert time.monotonic() - started < 5
    assert [r.method for r in upstream.received] == ["DELETE"]
    assert a.pending() == [] and b.pending() == []
    # One approval, one pending webhook (sent by A, which held it), one decision webhook
    # (sent by B, which decided), with the link to the approval.
    pending_hook = hooks.wait_for("approval_pending")
    assert pending_hook["link"] == f"https://console.example.com/approvals/{approval['id']}"
    hooks.wait_for("approval_approved")
    assert sorted(hooks.events()) == ["approval_approved", "approval_pending"]
    history = a.api("/v1/history").json()["history"]
    assert history[0]["approval_id"] == approval["id"] and history[0]["by"] == "sam"


def test_a_grant_made_on_b_lets_the_next_request_through_a_and_revoking_ends_it(
    pair: tuple[Replica, Replica],
    idp: TestIdP,
    upstream: FakeUpstream,
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    a, b = pair
    token = idp.mint("alice", ["agents"])
    held = pool.submit(b.request, token, "DELETE", upstream.url("/echo"))
    approval = b.wait_pending()
    result = cli(
        "approve", approval["id"], "--reason", "batch cleanup", "--grant-minutes", "10",
        "--url", b.api_url,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert held.result(timeout=15).status_code == 200
    # The next request of the same caller, through the other replica, is not held.
    assert a.request(token, "DELETE", upstream.url("/echo")).status_code == 200
    assert a.pending() == []
    [grant] = a.api("/v1/grants").json()["grants"]
    assert (grant["identity"].endswith("|alice"), grant["rule"]) == (
        True,
        "deletes-need-approval",
    )
    listed = cli("grants", "--url", a.api_url)
    assert listed.returncode == 0 and grant["id"] in listed.stdout, listed.stderr
    revoked = cli("revoke", grant["id"], "--reason", "done early", "--url", a.api_url)
    assert revoked.returncode == 0, revoked.stderr
    # Revoked everywhere: B holds the next one again.
    again = pool.submit(b.request, token, "DELETE", upstream.url("/echo"))
    second = a.wait_pending()
    assert second["id"] != approval["id"]
    deny = a.api(
        f"/v1/approvals/{second['id']}/deny", "POST", json={"approver": "s", "reason": "no"}
    )
    assert deny.status_code == 200
    response = again.result(timeout=15)
    assert response.status_code == 403 and error_code(response) == "approval_denied"
    assert [r.method for r in upstream.received] == ["DELETE", "DELETE"]


def test_a_limit_of_n_admits_exactly_n_across_both_replicas_under_concurrent_load(
    pair: tuple[Replica, Replica],
    idp: TestIdP,
    upstream: FakeUpstream,
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    a, b = pair
    token = idp.mint("bulk", ["agents"])
    url = upstream.url("/limited")

    def burst(replica: Replica) -> list[int]:
        with replica.gw.client(token, timeout=60) as client:
            return [client.get(url).status_code for _ in range(10)]

    futures = [pool.submit(burst, replica) for replica in (a, b, a, b)]
    statuses = [s for f in futures for s in f.result(timeout=120)]
    assert len(statuses) == 40
    assert statuses.count(200) == LIMIT
    assert statuses.count(429) == 40 - LIMIT
    assert len(upstream.received) == LIMIT
    # Another caller has its own budget, on either replica.
    other = idp.mint("someone-else", ["agents"])
    assert a.request(other, "GET", url).status_code == 200


# -- retries, withdrawal, restarts --------------------------------------------------------------


def test_sdk_retries_of_a_held_request_make_one_approval_and_one_webhook(
    pair: tuple[Replica, Replica],
    idp: TestIdP,
    upstream: FakeUpstream,
    hooks: Hooks,
) -> None:
    a, b = pair
    token = idp.mint("reviewer-bot", ["agents", "reviewed"])
    http_client = httpx.Client(proxy=a.gw.proxy_url(token), verify=a.gw.ssl_context())
    # The SDK's defaults (2 retries after a timeout, with backoff), a short timeout.
    client = openai.OpenAI(
        api_key="sk-placeholder", base_url=upstream.url("/v1"), timeout=3.0, http_client=http_client
    )
    assert client.max_retries == 2
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["completion"] = client.chat.completions.create(
                model="gpt-test", messages=[{"role": "user", "content": "hello"}]
            )
        except Exception as e:  # pragma: no cover - reported below
            result["error"] = e

    thread = threading.Thread(target=call)
    thread.start()
    try:
        # The third attempt joined the same approval: approve it while it waits.
        approval = b.wait_pending(lambda x: x["attempts"] == 3 and x["waiting"] == 1, timeout=30)
        decided = b.api(
            f"/v1/approvals/{approval['id']}/approve",
            "POST",
            json={"approver": "sam", "reason": "reviewed"},
        )
        assert decided.status_code == 200, decided.text
    finally:
        thread.join(60)
        http_client.close()
    assert "error" not in result, result.get("error")
    assert result["completion"].choices[0].message.content
    assert [r.path for r in upstream.received] == ["/v1/chat/completions"]
    hooks.wait_for("approval_approved")
    assert hooks.events().count("approval_pending") == 1
    assert [h["approval"]["id"] for h in hooks.received] == [approval["id"]] * 2


def test_a_withdrawn_request_not_retried_is_cancelled_and_the_webhook_told(
    pair: tuple[Replica, Replica],
    idp: TestIdP,
    plain_upstream: FakeUpstream,
    hooks: Hooks,
) -> None:
    a, b = pair
    token = idp.mint("carol", ["agents"])
    auth = base64.b64encode(f"agent:{token}".encode()).decode()
    sock = socket.create_connection(("127.0.0.1", a.gw.port))
    sock.sendall(
        f"DELETE {plain_upstream.url('/echo')} HTTP/1.1\r\n"
        f"host: 127.0.0.1:{plain_upstream.port}\r\nproxy-authorization: Basic {auth}\r\n"
        "content-length: 0\r\n\r\n".encode()
    )
    approval = b.wait_pending()
    sock.close()
    b.wait_pending(lambda x: x["id"] == approval["id"] and x["waiting"] == 0)
    cancelled = hooks.wait_for("approval_cancelled", timeout=20)
    assert cancelled["approval"]["id"] == approval["id"]
    assert "did not retry within 2 seconds" in cancelled["agent"]
    assert b.pending() == []
    assert [r.method for r in plain_upstream.received if r.path != "/hook"] == []


def test_pending_approvals_and_grants_survive_a_gateway_restart(
    start_replica: StartReplica,
    redis_server: RedisServer,
    tmp_path: Path,
    idp: TestIdP,
    upstream: FakeUpstream,
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    prefix = f"e2e:{secrets.token_hex(4)}:"
    a = start_replica(redis_server, prefix, "a")
    token = idp.mint("alice", ["agents"])
    granted_token = idp.mint("gina", ["agents"])
    # A grant for gina...
    held = pool.submit(a.request, granted_token, "DELETE", upstream.url("/echo"))
    first = a.wait_pending()
    a.api(
        f"/v1/approvals/{first['id']}/approve",
        "POST",
        json={"approver": "sam", "reason": "r", "grant_minutes": 10},
    )
    assert held.result(timeout=15).status_code == 200
    # ...and a pending approval for alice, whose request is cut by the restart.
    cut = pool.submit(a.request, token, "DELETE", upstream.url("/echo"))
    pending = a.wait_pending()
    a.gw.stop()
    with pytest.raises(httpx.HTTPError):
        cut.result(timeout=15)
    restarted = start_replica(redis_server, prefix, "a-again", workdir=tmp_path / "a")
    assert [p["id"] for p in restarted.pending()] == [pending["id"]]
    assert restarted.request(granted_token, "DELETE", upstream.url("/echo")).status_code == 200
    # alice's retry joins the approval that survived, and an approval releases it.
    retry = pool.submit(restarted.request, token, "DELETE", upstream.url("/echo"))
    joined = restarted.wait_pending(lambda x: x["attempts"] == 2 and x["waiting"] == 1)
    assert joined["id"] == pending["id"]
    restarted.api(
        f"/v1/approvals/{joined['id']}/approve", "POST", json={"approver": "s", "reason": "ok"}
    )
    assert retry.result(timeout=15).status_code == 200


# -- Redis goes away ------------------------------------------------------------------------------


def test_killing_redis_refuses_flows_that_need_it_and_recovery_is_automatic(
    start_replica: StartReplica,
    tmp_path: Path,
    idp: TestIdP,
    upstream: FakeUpstream,
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    try:
        prefix = f"e2e:{secrets.token_hex(4)}:"
        a = start_replica(redis, prefix, "a")
        b = start_replica(redis, prefix, "b")
        token = idp.mint("alice", ["agents"])
        assert a.request(token, "GET", upstream.url("/limited")).status_code == 200
        redis.kill()
        limited = a.request(token, "GET", upstream.url("/limited"))
        assert limited.status_code == 503
        assert error_code(limited) == "state_unavailable"
        assert limited.headers["retry-after"]
        held = b.request(token, "DELETE", upstream.url("/echo"))
        assert held.status_code == 503 and error_code(held) == "state_unavailable"
        # Flows that need no shared state go on.
        assert a.request(token, "GET", upstream.url("/echo")).status_code == 200
        assert b.api("/v1/approvals").status_code == 503
        assert [r.path for r in upstream.received] == ["/limited", "/echo"]
        # Redis returns (same port, its append-only file): both replicas recover by themselves.
        redis.restart()
        deadline = time.monotonic() + 15
        while a.request(token, "GET", upstream.url("/limited")).status_code != 200:
            assert time.monotonic() < deadline, a.gw.logs
            time.sleep(0.2)
        again = pool.submit(a.request, token, "DELETE", upstream.url("/echo"))
        approval = b.wait_pending()
        b.api(
            f"/v1/approvals/{approval['id']}/approve", "POST", json={"approver": "s", "reason": "r"}
        )
        assert again.result(timeout=15).status_code == 200
        logs = a.gw.settled_logs()
        assert "state: Redis" in logs and "unavailable" in logs and "available again" in logs
    finally:
        redis.stop()


def test_on_unavailable_local_falls_back_to_per_replica_state_with_a_warning(
    start_replica: StartReplica,
    tmp_path: Path,
    idp: TestIdP,
    upstream: FakeUpstream,
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    try:
        a = start_replica(redis, f"e2e:{secrets.token_hex(4)}:", "a", on_unavailable="local")
        token = idp.mint("alice", ["agents"])
        redis.kill()
        statuses = [
            a.request(token, "GET", upstream.url("/limited")).status_code for _ in range(12)
        ]
        assert statuses == [200] * LIMIT + [429, 429]  # this replica's own window
        held = pool.submit(a.request, token, "DELETE", upstream.url("/echo"))
        approval = a.wait_pending()  # held locally, decided through this replica
        a.api(
            f"/v1/approvals/{approval['id']}/approve", "POST", json={"approver": "s", "reason": "r"}
        )
        assert held.result(timeout=15).status_code == 200
        logs = a.gw.settled_logs()
        assert logs.count("using this replica's local state") == 1  # once a minute
        redis.restart()
        deadline = time.monotonic() + 15
        while "available again" not in a.gw.logs:
            a.request(token, "GET", upstream.url("/limited"))
            assert time.monotonic() < deadline, a.gw.logs
            time.sleep(0.2)
    finally:
        redis.stop()


def test_the_redis_password_never_reaches_logs_or_answers(
    start_replica: StartReplica, tmp_path: Path, idp: TestIdP, upstream: FakeUpstream
) -> None:
    password = "redis-pw-" + secrets.token_hex(12)
    redis = RedisServer(tmp_path / "redis", password=password).start()
    try:
        token = idp.mint("alice", ["agents"])
        wrong = start_replica(redis, "e2e:pw:", "wrong", redis_url=redis.url)  # no password
        refused = wrong.request(token, "GET", upstream.url("/limited"))
        assert refused.status_code == 503 and error_code(refused) == "state_unavailable"
        assert "authentication failed" in wrong.gw.settled_logs()
        url = f"redis://:{password}@127.0.0.1:{redis.port}/0"
        right = start_replica(redis, "e2e:pw:", "right", redis_url=url)
        assert right.request(token, "GET", upstream.url("/limited")).status_code == 200
        for gw in (wrong.gw, right.gw):
            assert password not in gw.settled_logs()
    finally:
        redis.stop()


def test_json_payload_reaches_the_webhook_with_its_parts(
    pair: tuple[Replica, Replica], hooks: Hooks, idp: TestIdP, upstream: FakeUpstream
) -> None:
    a, _ = pair
    token = idp.mint("alice", ["agents"])
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        held = pool.submit(a.request, token, "DELETE", upstream.url("/echo"))
        approval = a.wait_pending()
        body = hooks.wait_for("approval_pending")
        assert body["approval"]["id"] == approval["id"]
        assert "403 approval_timeout" in body["agent"]
        assert json.dumps(body).count(token) == 0
        a.api(f"/v1/approvals/{approval['id']}/deny", "POST", json={"approver": "s", "reason": "r"})
        assert held.result(timeout=15).status_code == 403


# -- the console across replicas ------------------------------------------------------------------


def test_the_console_of_either_replica_shows_both_replicas_flows_with_one_sign_in(
    tmp_path: Path,
    pki: TestCA,
    base_config: dict,
    redis_server: RedisServer,
    hooks: Hooks,
    idp: TestIdP,
    upstream: FakeUpstream,
) -> None:
    from tests.support.gateway import recording_section

    prefix = f"e2e:{secrets.token_hex(4)}:"
    replicas = []
    for name in ("a", "b"):
        cfg = replica_config(base_config, REDIS_URL_ENV, prefix)
        cfg["console"] = {}
        cfg["recording"] = recording_section(tmp_path / f"{name}-recordings")
        gw = Gateway(
            cfg,
            tmp_path / name,
            upstream_ca=pki.cert_file,
            env={
                UPSTREAM_KEY_ENV: UPSTREAM_KEY,
                ADMIN_ENV: ADMIN_TOKEN,
                REDIS_URL_ENV: redis_server.url,
                HOOK_ENV: hooks.url,
            },
        )
        replicas.append(gw)
    try:
        a, b = (Replica(gw.start()) for gw in replicas)
        for replica, subject in ((a, "agent-on-a"), (b, "agent-on-b")):
            token = idp.mint(subject, ["agents"])
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            response = replica.request(
                token, "POST", upstream.url("/v1/chat/completions"), json=body
            )
            assert response.status_code == 200

        with httpx.Client(trust_env=False, timeout=10) as browser:
            page = browser.get(f"{b.api_url}/console/signin")
            pre = re.search(r'name="pre" value="([^"]+)"', page.text)
            assert pre is not None
            signed = browser.post(
                f"{b.api_url}/console/signin",
                data={"pre": pre.group(1), "token": ADMIN_TOKEN, "name": "ops"},
                headers={"origin": b.api_url},
            )
            assert signed.status_code == 303
            # The session signed on B is good on A (no sticky sessions), and both consoles list
            # both replicas' flows.
            for replica in (a, b):
                deadline = time.monotonic() + 10
                while True:
                    part = browser.get(f"{replica.api_url}/console/partials/activity")
                    assert part.status_code == 200
                    if "agent-on-a" in part.text and "agent-on-b" in part.text:
                        break
                    assert time.monotonic() < deadline, part.text
                    time.sleep(0.1)
    finally:
        for gw in replicas:
            gw.stop()
