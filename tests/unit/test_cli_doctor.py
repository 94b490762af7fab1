"""`doctor` without a gateway: the environment checks, and how proxy answers are read and named.

A tiny fake proxy answers every CONNECT with a fixed response, which is how a gateway (or some
other proxy) refuses; the end-to-end doctor runs against the real gateway in
tests/e2e/test_onboarding.py.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sluicegate.cli import doctor
from sluicegate.cli.agenthost import Proxy

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
PROBE = "https://api.openai.com/v1/models"


def gateway_error(code: str, message: str = "m") -> bytes:
    """The gateway's JSON error (guard.error_body's shape)."""
    body = {"error": {"code": code, "message": message, "type": "sluicegate_error"}}
    return json.dumps(body).encode()


def http_response(status: int, body: bytes, reason: str = "X") -> bytes:
    head = f"HTTP/1.1 {status} {reason}\r\ncontent-length: {len(body)}\r\n"
    return (head + "content-type: application/json\r\n\r\n").encode() + body


class FakeProxy:
    """Answers each connection's first request with `response`; records what it received."""

    def __init__(self) -> None:
        self.response = b""
        self.received: list[bytes] = []
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = self.request.recv(4096)
                    if not chunk:
                        return
                    data += chunk
                proxy.received.append(data)
                self.request.sendall(proxy.response)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def fake_proxy() -> Iterator[FakeProxy]:
    server = FakeProxy()
    yield server
    server.close()


def env_for(port: int, token: str | None = TOKEN, **extra: str) -> dict[str, str]:
    url = Proxy("127.0.0.1", port, token).url()
    return {"HTTPS_PROXY": url, "https_proxy": url, "HTTP_PROXY": url, "http_proxy": url, **extra}


def run(env: dict[str, str], **kw: object) -> dict[str, doctor.Check]:
    kw.setdefault("proxy", None)
    kw.setdefault("token", None)
    kw.setdefault("ca_file", None)
    kw.setdefault("probe_url", PROBE)
    checks = doctor.Doctor(env, timeout=2, **kw).run()  # type: ignore[arg-type]
    by_name: dict[str, doctor.Check] = {}
    for check in checks:
        by_name.setdefault(check.name, check)
    return by_name


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- environment ----------------------------------------------------------------------------------


def test_no_https_proxy_is_a_bypass() -> None:
    checks = run({"PATH": ""})
    assert checks["proxy-env"].status == "fail"
    assert "bypassing the gateway" in checks["proxy-env"].detail
    assert checks["proxy-env"].fix
    assert {checks[n].status for n in ("proxy", "token", "probe")} == {"skip"}


@pytest.mark.parametrize(
    ("no_proxy", "covered"),
    [
        (".openai.com", "api.openai.com"),
        ("*", "api.openai.com"),
        ("anthropic.com", "api.anthropic.com"),
    ],
)
def test_no_proxy_covering_an_api_host_fails(no_proxy: str, covered: str) -> None:
    checks = run({**env_for(closed_port()), "no_proxy": no_proxy})
    assert checks["no-proxy"].status == "fail"
    assert f"covers {covered}" in checks["no-proxy"].detail
    assert "remove" in checks["no-proxy"].fix


def test_proxy_variables_that_disagree() -> None:
    env = env_for(closed_port())
    env["https_proxy"] = "http://127.0.0.1:1"
    checks = run(env)
    assert checks["proxy-env"].status == "fail"
    assert "differ" in checks["proxy-env"].detail


def test_missing_http_proxy_is_a_warning() -> None:
    env = env_for(closed_port())
    del env["http_proxy"], env["HTTP_PROXY"]
    statuses = [c.status for c in doctor.Doctor(env, proxy=None, token=None, ca_file=None,
                                                probe_url=PROBE, timeout=2).run()
                if c.name == "proxy-env"]  # fmt: skip
    assert statuses == ["pass", "warn"]


def test_unreachable_proxy_and_the_token_is_never_printed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env_for(closed_port()).items():
        monkeypatch.setenv(name, value)
    assert doctor.main(["--probe-url", PROBE]) == 1
    out = capsys.readouterr().out
    assert "FAIL  proxy" in out and "SKIP  token" in out
    assert TOKEN not in out and "agent:***@" in out


# -- what the proxy answers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "fix"),
    [
        (407, "expired", "fresh"),
        (407, "unknown_kid", "not signed by a key this gateway trusts"),
        (407, "wrong_audience", "another audience"),
        (407, "missing_token", "HTTPS_PROXY=http://agent:<token>@"),
        (401, "malformed", "one whole JWT"),
    ],
)
def test_token_refusal_names_the_reason(
    fake_proxy: FakeProxy, status: int, code: str, fix: str
) -> None:
    fake_proxy.response = http_response(status, gateway_error(code))
    checks = run(env_for(fake_proxy.port))
    assert checks["token"].status == "fail"
    assert f"rejected the token: {code} (HTTP {status})" in checks["token"].detail
    assert fix in checks["token"].fix
    assert checks["probe"].status == "skip"
    connect = fake_proxy.received[-1].decode()
    assert connect.startswith("CONNECT api.openai.com:443 HTTP/1.1\r\n")
    assert f"Proxy-Authorization: {doctor.basic_proxy_authorization(TOKEN)}" in connect


def test_unrouted_probe_host(fake_proxy: FakeProxy) -> None:
    """Routing refuses at CONNECT, after authentication: the token is fine, the probe is not."""
    fake_proxy.response = http_response(403, gateway_error("egress_denied", "not allowed"))
    checks = run(env_for(fake_proxy.port))
    assert checks["token"].status == "pass"
    assert checks["probe"].status == "fail"
    assert "egress_denied: not allowed" in checks["probe"].detail
    assert "--probe-url" in checks["probe"].fix


def test_a_gateway_that_cannot_serve(fake_proxy: FakeProxy) -> None:
    fake_proxy.response = http_response(503, gateway_error("gateway_not_configured"))
    checks = run(env_for(fake_proxy.port))
    assert checks["token"].status == "fail"
    assert "gateway_not_configured" in checks["token"].detail
    assert "operator" in checks["token"].fix


def test_a_refusal_from_some_other_proxy(fake_proxy: FakeProxy) -> None:
    fake_proxy.response = http_response(407, b"<html>corporate proxy login</html>")
    checks = run(env_for(fake_proxy.port))
    assert checks["token"].status == "fail"
    assert "not from sluicegate" in checks["token"].detail


def test_token_file_overrides_and_mismatch_is_noted(fake_proxy: FakeProxy) -> None:
    fake_proxy.response = http_response(407, gateway_error("expired"))
    checks = run(env_for(fake_proxy.port, token="other-token-in-env"), token=TOKEN)
    assert checks["token-env"].status == "warn"
    assert doctor.basic_proxy_authorization(TOKEN) in fake_proxy.received[-1].decode()


def test_no_token_at_all(fake_proxy: FakeProxy) -> None:
    checks = run(env_for(fake_proxy.port, token=None))
    assert checks["token"].status == "fail"
    assert "no token" in checks["token"].detail


# -- reading answers ------------------------------------------------------------------------------


def test_gateway_error_shape_only() -> None:
    assert doctor.Answer(403, {}, gateway_error("egress_denied", "x")).gateway_error() == (
        "egress_denied",
        "x",
    )
    upstream_error = json.dumps({"error": {"message": "bad key", "type": "invalid_request"}})
    for body in (upstream_error.encode(), b"not json", b'{"error": "x"}', b"[]"):
        assert doctor.Answer(401, {}, body).gateway_error() is None


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\nhello",  # until close
    ],
)
def test_read_answer(raw: bytes) -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(raw[:20])
        left.sendall(raw[20:])
        left.shutdown(socket.SHUT_WR)
        answer = doctor.read_answer(right)
    assert (answer.status, answer.body) == (200, b"hello")


def test_report_and_exit_status() -> None:
    checks = [
        doctor.Check("proxy", "pass", "ok"),
        doctor.Check("token", "fail", "rejected", "get another"),
        doctor.Check("node", "skip", "absent", "never shown"),
    ]
    text = doctor.report(checks)
    assert "fix: get another" in text and "never shown" not in text
    assert text.rstrip().endswith("1 failed, 0 warning(s)")
    assert doctor.report(checks[:1]).rstrip().endswith("all good")


def test_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert doctor.main(["--probe-url", "http://api.openai.com/"]) == 2
    (tmp_path / "t").write_text("")
    assert doctor.main(["--token-file", str(tmp_path / "t")]) == 2
    assert "empty" in capsys.readouterr().err


# -- base-URL mode --------------------------------------------------------------------------------


def base_answer(status: int, body: bytes, request_id: bool = True) -> bytes:
    head = f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\nconnection: close\r\n"
    if request_id:
        head += "x-sluicegate-request-id: 1234\r\n"
    return (head + "content-type: application/json\r\n\r\n").encode() + body


@pytest.mark.parametrize(
    ("answer", "status", "says"),
    [
        (base_answer(200, b'{"data": []}'), "pass", "base-URL listener"),
        (base_answer(200, b'{"data": []}', request_id=False), "fail", "bypasses it"),
        (base_answer(401, gateway_error("expired")), "fail", "expired"),
        (base_answer(404, gateway_error("base_url_unknown_prefix")), "fail", "no such prefix"),
        (base_answer(400, gateway_error("not_a_proxy_request")), "fail", "proxy port"),
        (base_answer(403, gateway_error("policy_blocked")), "warn", "policy_blocked"),
    ],
)
def test_base_url_check(fake_proxy: FakeProxy, answer: bytes, status: str, says: str) -> None:
    """An agent host in base-URL mode only: no HTTPS_PROXY (a warning, not a failure), and the
    SDK's base URL is checked with its API key, which must reach the gateway and be the token."""
    fake_proxy.response = answer
    fake_proxy.received.clear()
    base = f"http://127.0.0.1:{fake_proxy.port}/openai/v1"
    env = {"PATH": "", "OPENAI_BASE_URL": base, "OPENAI_API_KEY": TOKEN}
    checks = run(env)
    assert checks["proxy-env"].status == "warn"
    check = checks["base-url:OPENAI_BASE_URL"]
    assert (check.status, says in check.detail) == (status, True), check
    sent = fake_proxy.received[-1].decode()
    assert sent.startswith("GET /openai/v1/models HTTP/1.1")
    assert f"Authorization: Bearer {TOKEN}" in sent
    assert TOKEN not in check.detail + check.fix


def test_base_url_check_unreachable_and_anthropic(fake_proxy: FakeProxy) -> None:
    fake_proxy.response = base_answer(200, b"{}")
    env = {
        "PATH": "",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{closed_port()}/openai/v1",
        "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{fake_proxy.port}/anthropic",
        "ANTHROPIC_API_KEY": TOKEN,
    }
    checks = run(env)
    assert checks["base-url:OPENAI_BASE_URL"].status == "fail"
    assert "cannot reach" in checks["base-url:OPENAI_BASE_URL"].detail
    assert checks["base-url:ANTHROPIC_BASE_URL"].status == "pass"
    sent = fake_proxy.received[-1].decode()
    assert sent.startswith("GET /anthropic/v1/models")
    assert f"x-api-key: {TOKEN}".lower() in sent.lower()
