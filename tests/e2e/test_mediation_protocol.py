"""Complete mediation, protocol side: every part of a message is inspected or refused.

Each test is an attack that worked against the gateway before (issue 14): the injected credential
reaching the agent in an HTTP/2 trailer, the reason phrase or a header name; an HTTP/2 header value
with CRLF smuggling a second request to an HTTP/1.1 upstream; a non-WebSocket `101` turning the
connection into a raw relay; transfer-codings forwarded undecoded; HTTP/1.1 trailers crashing
mitmproxy's connection handler; secrets in the path, in headers and cookies. HTTP/2 ends are raw
(`tests/support/h2_wire.py`) and HTTP/1.1 ends raw sockets where a library would refuse the bytes.
Every test checks that no secret, injected key or caller token reached the client, the upstream
(where it must not), the log or a recording.
"""

from __future__ import annotations

import copy
import gzip
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h2
import pytest
from mitmproxy import io

from tests.conftest import UPSTREAM_KEY, UPSTREAM_KEY_ENV
from tests.support.gateway import Gateway, recording_section
from tests.support.h2_wire import H2Message, H2Reply, H2Upstream, h2_exchange, request_fields
from tests.support.pki import TestCA as CA
from tests.support.raw_upstream import LAST_CHUNK, RawRequest, RawUpstream, chunk
from tests.support.wire import basic, open_tunnel, read_response

SECRET = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
TAG = "[REDACTED:github-token]"

pytestmark = pytest.mark.timeout(120)


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def h2up(pki: CA) -> Iterator[H2Upstream]:
    server = H2Upstream(pki.issue("h2-upstream"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def raw(pki: CA) -> Iterator[RawUpstream]:
    server = RawUpstream(pki.issue("raw-h1-upstream"))
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _reset(h2up: H2Upstream, raw: RawUpstream) -> None:
    h2up.reset()
    raw.reset()


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory,
    pki: CA,
    base_config: dict,
    h2up: H2Upstream,
    raw: RawUpstream,
) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("mediation-gateway")
    config = copy.deepcopy(base_config)
    key = {"env": UPSTREAM_KEY_ENV}
    config["routes"] += [
        {"name": "h2", "host": "127.0.0.1", "port": h2up.port, "credential": key},
        {"name": "raw", "host": "127.0.0.1", "port": raw.port, "credential": key},
    ]
    config["recording"] = recording_section(workdir / "recordings")
    gateway = Gateway(
        config, workdir, upstream_ca=pki.cert_file, env={UPSTREAM_KEY_ENV: UPSTREAM_KEY}
    )
    gateway.start()
    yield gateway
    gateway.stop()


# -- helpers ---------------------------------------------------------------------------------------


def recorded(gateway: Gateway, path: str, count: int = 1, timeout: float = 10) -> list[Any]:
    deadline = time.monotonic() + timeout
    flows: list[Any] = []
    while time.monotonic() < deadline:
        flows = []
        for session in sorted((gateway.workdir / "recordings").glob("*/*.mitm")):
            with session.open("rb") as f:
                flows += [fl for fl in io.FlowReader(f).stream() if fl.request.path == path]
        if len(flows) >= count:
            return flows
        time.sleep(0.1)
    raise AssertionError(f"{len(flows)} of {count} flows for {path} recorded")


def assert_clean(gateway: Gateway, *seen: bytes | str, token: str | None = None) -> None:
    """No secret, injected key or caller token in what the client saw, the log or a recording."""
    logs = gateway.settled_logs()
    recordings = Path(gateway.workdir / "recordings")
    recorded_bytes = b"".join(p.read_bytes() for p in recordings.rglob("*.mitm"))
    for needle in [SECRET, UPSTREAM_KEY] + ([token] if token else []):
        for part in seen:
            text = part if isinstance(part, str) else part.decode("utf-8", "replace")
            assert needle not in text
        assert needle not in logs, logs[max(0, logs.find(needle) - 600) : logs.find(needle) + 100]
        assert needle.encode() not in recorded_bytes


def h2_get(
    gateway: Gateway, up: H2Upstream | RawUpstream, path: str, token: str, **kw: Any
) -> H2Message:
    authority = f"127.0.0.1:{up.port}"
    extra = kw.pop("extra", ())
    return h2_exchange(
        gateway.port or 0,
        str(gateway.ca_file),
        authority,
        token,
        request_fields(kw.pop("method", "GET"), authority, path, extra),
        **kw,
    )


def refused_by_h2(got: H2Message) -> bool:
    """The h2 library (4.2 and later, with mitmproxy 12) refuses CR, LF and NUL in header values
    itself, resetting the stream before any hook runs; older ones pass them to the gateway."""
    version = tuple(int(part) for part in h2.__version__.split(".")[:2])
    return got.reset and not got.headers and version >= (4, 2)


def error_code(body: bytes) -> str:
    return json.loads(body)["error"]["code"]


def echoed_key(request: H2Message) -> bytes:
    return (request.header("authorization") or "").encode()


# -- 1. the injected credential never reaches the agent, in any part of a response ----------------


def test_an_http2_response_trailer_is_scrubbed_and_redacted(
    gw: Gateway, h2up: H2Upstream, token: str
) -> None:
    def grpc_error(request: H2Message) -> H2Reply:
        return H2Reply(
            [(b":status", b"200"), (b"content-type", b"application/json")],
            b'{"ok": false}',
            [
                (b"grpc-status", b"16"),
                (b"grpc-message", b"bad key " + echoed_key(request)),
                (b"x-leak", f"token {SECRET}".encode()),
            ],
        )

    h2up.handle("/pkg.Svc/Call", grpc_error)
    got = h2_get(gw, h2up, "/pkg.Svc/Call", token, method="POST", extra=[("te", "trailers")])
    assert got.status == 200 and got.trailers is not None, got
    trailers = dict(got.trailers)
    assert trailers[b"grpc-status"] == b"16"
    assert trailers[b"grpc-message"] == b"bad key Bearer [REDACTED:injected-credential:h2]"
    assert trailers[b"x-leak"] == f"token {TAG}".encode()
    (flow,) = recorded(gw, "/pkg.Svc/Call")
    assert flow.response.trailers is not None
    assert_clean(gw, got.raw(), token=token)


def raw_answer(head_bytes: bytes, body: bytes = b"") -> Any:
    """A RawUpstream handler writing `head_bytes` (with `{key}` replaced by the credential it
    received) and `body`."""

    def handler(sock: socket.socket, request: RawRequest) -> None:
        key = request.headers.get("authorization", "").encode()
        sock.sendall((head_bytes + body).replace(b"{key}", key))

    return handler


def h1_get(gateway: Gateway, up: RawUpstream, path: str, token: str, extra: str = "") -> bytes:
    """GET over HTTP/1.1 in a CONNECT tunnel, raw; everything the gateway answered."""
    sock, established = open_tunnel(gateway.port or 0, f"127.0.0.1:{up.port}", basic(token))
    assert established.status == 200
    data = b""
    with gateway.ssl_context().wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        tls.settimeout(15)
        tls.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Connection: close\r\n\r\n".encode()
        )
        try:
            while chunk_ := tls.recv(65536):
                data += chunk_
        except (ConnectionResetError, ssl.SSLError):
            pass
    return data


def test_the_reason_phrase_is_scrubbed_for_the_agent_and_the_log(
    gw: Gateway, raw: RawUpstream, token: str
) -> None:
    body = b'{"error": "no"}'
    raw.handle(
        "/reason",
        raw_answer(
            b"HTTP/1.1 401 Invalid key {key} or " + SECRET.encode() + b"\r\n"
            b"content-type: application/json\r\ncontent-length: 15\r\n\r\n",
            body,
        ),
    )
    got = h1_get(gw, raw, "/reason", token)
    assert got.startswith(b"HTTP/1.1 401 Unauthorized\r\n"), got[:100]
    with gw.client(token) as client:
        response = client.get(raw.url("/reason"))
    assert response.status_code == 401 and response.reason_phrase == "Unauthorized"
    flows = recorded(gw, "/reason", count=2)
    assert {f.response.reason for f in flows} == {"Unauthorized"}
    counts = flows[0].metadata["sluicegate"]["redaction"]["response_head"]
    assert counts == {"injected-credential:raw": 1, "github-token": 1}
    assert_clean(gw, got, response.content, token=token)


def test_a_header_name_holding_the_key_is_dropped(
    gw: Gateway, raw: RawUpstream, token: str
) -> None:
    # The raw key, not its `Bearer` form: a header name cannot hold a space.
    leaky = f"HTTP/1.1 200 OK\r\nx-echo-{UPSTREAM_KEY}: 1\r\nx-fine: yes\r\n"
    leaky += "content-type: application/json\r\ncontent-length: 2\r\n\r\n"
    raw.handle("/name", raw_answer(leaky.encode(), b"{}"))
    with gw.client(token) as client:
        response = client.get(raw.url("/name"))
    assert response.status_code == 200 and response.headers["x-fine"] == "yes"
    assert not [k for k in response.headers if k.startswith("x-echo")]
    assert_clean(gw, str(response.headers.multi_items()), token=token)


def test_request_and_response_headers_cookies_and_urls_are_redacted(
    gw: Gateway, raw: RawUpstream, token: str
) -> None:
    raw.handle(
        "/headers",
        raw_answer(
            b"HTTP/1.1 302 Found\r\n"
            b"set-cookie: sid=" + SECRET.encode() + b"; Path=/; HttpOnly\r\n"
            b"location: https://example.test/cb?access_token=" + SECRET.encode() + b"&x=1\r\n"
            b"x-debug: upstream saw {key}\r\n"
            b"content-length: 0\r\n\r\n"
        ),
    )
    sent = {
        "cookie": f"theme=dark; token={SECRET}",
        "referer": f"https://example.test/page?token={SECRET}",
        "x-custom": f"carry {SECRET} along",
        "x-request-id": "req_8d7f6e5c4b3a2918f7e6d5c4b3a29187",
    }
    with gw.client(token, follow_redirects=False) as client:
        response = client.get(raw.url("/headers"), headers=sent)
    assert response.status_code == 302
    (got,) = raw.received
    assert got.headers["cookie"] == "theme=dark; token=[REDACTED:key-token]"
    assert got.headers["referer"].startswith("https://example.test/page?token=%5BREDACTED")
    assert got.headers["x-custom"] == f"carry {TAG} along"
    assert got.headers["x-request-id"] == sent["x-request-id"]  # no false positive
    assert response.headers["set-cookie"] == f"sid={TAG}; Path=/; HttpOnly"
    assert "access_token=%5BREDACTED" in response.headers["location"]
    assert response.headers["location"].endswith("&x=1")
    assert response.headers["x-debug"] == "upstream saw Bearer [REDACTED:injected-credential:raw]"
    (flow,) = recorded(gw, "/headers")
    redaction = flow.metadata["sluicegate"]["redaction"]
    assert redaction["request_head"] and redaction["response_head"]
    assert_clean(gw, str(response.headers.multi_items()), token=token)
    assert SECRET not in json.dumps(got.headers)


@pytest.mark.parametrize(
    "path",
    [
        f"/v1/files/{SECRET}",
        "/v1/auth/eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0"
        ".dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U/check",
    ],
    ids=["github-token", "jwt"],
)
def test_a_secret_in_the_path_is_refused_before_it_leaves(
    gw: Gateway, raw: RawUpstream, h2up: H2Upstream, token: str, path: str
) -> None:
    got = h1_get(gw, raw, path, token)
    assert got.startswith(b"HTTP/1.1 403"), got[:100]
    assert b'"code": "secret_in_path"' in got
    h2 = h2_get(gw, h2up, path, token)
    assert h2.status == 403 and error_code(h2.body) == "secret_in_path"
    assert raw.received == [] and h2up.received == []
    assert_clean(gw, got, h2.raw(), token=token)


def test_ordinary_paths_and_headers_pass_unchanged(
    gw: Gateway, raw: RawUpstream, token: str
) -> None:
    path = "/v1/files/file-AbC123dEf456GhI789jKl"
    raw.handle(path, raw_answer(b"HTTP/1.1 204 No Content\r\n\r\n"))
    headers = {
        "user-agent": "OpenAI/Python 1.54.3",
        "idempotency-key": "stainless-python-retry-3f8e2b8c-7f0e-4a8b-9a3f-2d1c0b9e8f7a",
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "openai-organization": "org-AbCdEf1234567890",
    }
    with gw.client(token) as client:
        response = client.get(raw.url(path), headers=headers)
    assert response.status_code == 204
    (got,) = raw.received
    assert {k: got.headers[k] for k in headers} == headers


# -- 2. header values an HTTP/1.1 peer would split are refused ------------------------------------


SMUGGLED = f"/smuggled-admin HTTP/1.1\r\nHost: 127.0.0.1\r\nx-carry: {SECRET}\r\n\r\nGET /second"


@pytest.mark.parametrize(
    "value",
    [
        b"x\r\n\r\nGET " + SMUGGLED.encode(),
        b"x\nGET " + SMUGGLED.encode(),
        b"x\rGET /bare-cr",
        b"x\x00y",
    ],
    ids=["crlf", "lf", "bare-cr", "nul"],
)
def test_http2_header_values_with_line_breaks_or_nul_are_refused(
    gw: Gateway, raw: RawUpstream, token: str, value: bytes
) -> None:
    path = f"/first-{len(value)}"
    raw.handle(path, raw_answer(b"HTTP/1.1 204 No Content\r\n\r\n"))
    raw.handle("/smuggled-admin", raw_answer(b"HTTP/1.1 204 No Content\r\n\r\n"))
    got = h2_get(gw, raw, path, token, extra=[(b"x-split", value)])
    assert raw.received == []  # neither the first nor a smuggled second request
    if refused_by_h2(got):
        return  # h2 >= 4.2 (mitmproxy 12) resets the stream itself: nothing reaches any hook
    assert got.status == 400, got
    assert error_code(got.body) == "invalid_header"
    (flow,) = recorded(gw, path)  # the refusal is recorded
    assert flow.metadata["sluicegate"]["refusal"]["code"] == "invalid_header"
    assert_clean(gw, got.raw(), token=token)


def test_http2_trailers_with_line_breaks_are_refused(
    gw: Gateway, h2up: H2Upstream, token: str
) -> None:
    got = h2_get(
        gw,
        h2up,
        "/trailer-split",
        token,
        method="POST",
        body=b"{}",
        extra=[("content-type", "application/json")],
        trailers=[(b"x-t", b"a\r\nx-injected: 1")],
    )
    assert h2up.received == []
    assert refused_by_h2(got) or (got.status, error_code(got.body)) == (400, "invalid_header")


def test_a_response_header_with_a_line_break_is_refused(
    gw: Gateway, h2up: H2Upstream, token: str
) -> None:
    def split(request: H2Message) -> H2Reply:
        fields = [(b":status", b"200"), (b"content-type", b"application/json")]
        fields.append((b"x-split", b"a\r\nset-cookie: injected=1\r\nx-key: " + echoed_key(request)))
        return H2Reply(fields, b"{}")

    h2up.handle("/response-split", split)
    got = h2_get(gw, h2up, "/response-split", token)
    assert got.status == 502 and got.header("set-cookie") is None and got.header("x-split") is None
    code = error_code(got.body)
    if code == "invalid_header":
        (flow,) = recorded(gw, "/response-split")
        assert flow.metadata["sluicegate"]["refusal"]["code"] == "invalid_header"
    else:
        # h2 >= 4.2 (mitmproxy 12) refused the upstream's headers itself, before any hook: the
        # gateway's answer to mitmproxy's own 502
        assert code == "upstream_protocol_error", got
    assert_clean(gw, got.raw(), token=token)


def test_requests_with_request_trailers_and_te_reach_the_http2_upstream_inspected(
    gw: Gateway, h2up: H2Upstream, token: str
) -> None:
    h2up.handle("/with-trailers", lambda _: H2Reply([(b":status", b"204")]))
    got = h2_get(
        gw,
        h2up,
        "/with-trailers",
        token,
        method="POST",
        body=b'{"a": 1}',
        extra=[("content-type", "application/json"), ("te", "trailers")],
        trailers=[(b"x-checksum", b"abc"), (b"x-leak", f"k {SECRET}".encode())],
    )
    assert got.status == 204, got
    (received,) = h2up.received
    assert received.trailers is not None
    trailers = dict(received.trailers)
    assert trailers[b"x-checksum"] == b"abc"
    assert trailers[b"x-leak"] == f"k {TAG}".encode()
    assert received.header("te") == "trailers"
    assert_clean(gw, got.raw(), token=token)


# -- 3. no upgrade to anything but a WebSocket ----------------------------------------------------


def test_a_non_websocket_upgrade_is_stripped_and_a_101_refused(
    gw: Gateway, raw: RawUpstream, token: str
) -> None:
    relayed = b"RAW " + SECRET.encode() + b" {key}\n"
    raw.handle(
        "/upgrade",
        raw_answer(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: tcp\r\nConnection: Upgrade\r\n\r\n",
            relayed,
        ),
    )
    got = h1_get(
        gw, raw, "/upgrade", token, extra="Upgrade: tcp\r\nConnection: Upgrade, keep-alive\r\n"
    )
    assert got.startswith(b"HTTP/1.1 502"), got[:200]
    assert b'"code": "upgrade_refused"' in got
    assert b"RAW" not in got
    (sent,) = raw.received
    assert "upgrade" not in sent.headers
    assert "upgrade" not in sent.headers.get("connection", "").lower()
    (flow,) = recorded(gw, "/upgrade")
    assert flow.response.status_code == 502
    assert_clean(gw, got, token=token)


@pytest.mark.parametrize("upgrade", ["h2c", "SPDY/3.1", "websocket"])
def test_a_101_the_request_did_not_ask_for_is_refused(
    gw: Gateway, raw: RawUpstream, token: str, upgrade: str
) -> None:
    raw.handle(
        "/surprise",
        raw_answer(
            f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: {upgrade}\r\n"
            "Connection: Upgrade\r\n\r\n".encode(),
            b"RAW {key}",
        ),
    )
    got = h1_get(gw, raw, "/surprise", token)
    assert got.startswith(b"HTTP/1.1 502") and b"upgrade_refused" in got, got[:200]
    assert b"RAW" not in got
    assert_clean(gw, got, token=token)


# -- 4. transfer codings other than chunked --------------------------------------------------------


def test_a_gzip_transfer_coding_is_refused_both_ways(
    gw: Gateway, raw: RawUpstream, token: str
) -> None:
    packed = gzip.compress(json.dumps({"k": SECRET}).encode())
    raw.handle(
        "/te",
        raw_answer(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: gzip, chunked\r\n\r\n",
            chunk(packed) + LAST_CHUNK,
        ),
    )
    with gw.client(token) as client:
        response = client.get(raw.url("/te"), headers={"te": "gzip, trailers;q=0.5"})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "unsupported_transfer_encoding"
    (sent,) = raw.received
    assert sent.headers.get("te") == "trailers"
    raw.reset()
    sock, established = open_tunnel(gw.port or 0, f"127.0.0.1:{raw.port}", basic(token))
    assert established.status == 200
    with gw.ssl_context().wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        tls.sendall(
            b"POST /te HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: gzip, chunked\r\n\r\n" + chunk(packed) + LAST_CHUNK
        )
        answer = read_response(tls)
    assert (answer.status, answer.code) == (400, "unsupported_transfer_encoding")
    assert raw.received == []
    assert_clean(gw, response.content, answer.body, token=token)


# -- 5. HTTP/1.1 trailers: read and inspected, never a crash --------------------------------------


def chunked_with_trailers(body: bytes, *trailers: bytes) -> bytes:
    return chunk(body) + b"0\r\n" + b"".join(t + b"\r\n" for t in trailers) + b"\r\n"


def test_http1_response_trailers_are_inspected_not_a_crash(
    gw: Gateway, raw: RawUpstream, token: str
) -> None:
    raw.handle(
        "/h1-trailers",
        raw_answer(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\ntrailer: x-key, x-note\r\n\r\n",
            chunked_with_trailers(
                b'{"ok": true}', b"x-key: saw {key}", b"x-note: " + SECRET.encode()
            ),
        ),
    )
    with gw.client(token, timeout=10) as client:  # HTTP/1.1: trailers are not sent to it
        response = client.get(raw.url("/h1-trailers"))
    assert response.status_code == 200 and response.json() == {"ok": True}
    got = h2_get(gw, raw, "/h1-trailers", token)  # HTTP/2 client: trailers, inspected
    assert got.status == 200 and got.trailers is not None, got
    trailers = dict(got.trailers)
    assert trailers[b"x-key"] == b"saw Bearer [REDACTED:injected-credential:raw]"
    assert trailers[b"x-note"] == TAG.encode()
    flows = recorded(gw, "/h1-trailers", count=2)
    assert all(f.response.trailers is not None for f in flows)
    assert "has crashed" not in gw.logs
    assert_clean(gw, response.content, got.raw(), token=token)


def test_http1_request_trailers_are_inspected_not_a_crash(
    gw: Gateway, raw: RawUpstream, token: str
) -> None:
    seen = bytearray()

    def read_chunked_then_answer(sock: socket.socket, _: RawRequest) -> None:
        while not seen.endswith(b"0\r\n\r\n"):
            data = sock.recv(65536)
            if not data:
                break
            seen.extend(data)
        sock.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")

    raw.handle("/h1-request-trailers", read_chunked_then_answer)
    sock, established = open_tunnel(gw.port or 0, f"127.0.0.1:{raw.port}", basic(token))
    assert established.status == 200
    with gw.ssl_context().wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        tls.settimeout(15)
        tls.sendall(
            b"POST /h1-request-trailers HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
            + chunked_with_trailers(b'{"a": 1}', b"x-note: " + SECRET.encode())
        )
        answer = read_response(tls)
    assert answer.status == 204
    assert b'{"a": 1}' in seen and SECRET.encode() not in seen  # HTTP/1.1: no trailers sent
    (flow,) = recorded(gw, "/h1-request-trailers")
    assert flow.request.trailers is not None
    assert flow.request.trailers["x-note"] == TAG
    assert "has crashed" not in gw.logs
    assert_clean(gw, answer.body, token=token)


# -- 7. heads that never finish; non-HTTP bytes in a tunnel ----------------------------------------


class CountingListener:
    """A TCP listener that only counts the connections made to it."""

    def __init__(self) -> None:
        self.accepted = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            sock.close()

    def close(self) -> None:
        self._listener.close()


def test_half_sent_request_heads_are_closed_after_the_header_timeout(
    start_gateway: Any, upstream: Any, token: str
) -> None:
    gateway = start_gateway(lambda c: c["gateway"].update(header_timeout_seconds=2))
    socks = []
    for i in range(300):
        sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=20)
        # Half a head, with the proxy token even: nothing is authenticated before it is whole.
        sock.sendall(f"GET {upstream.url('/echo')} HTTP/1.1\r\nx-n: {i}\r\n".encode())
        socks.append(sock)
    # A keep-alive client idle between requests is no half-sent head.
    with gateway.client(token) as client:
        assert client.get(upstream.url("/echo")).status_code == 200
        time.sleep(3)
        answers = []
        for sock in socks:
            data = b""
            while chunk_ := sock.recv(65536):
                data += chunk_
            answers.append(data)
            sock.close()
        assert client.get(upstream.url("/echo")).status_code == 200
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[:1]
    assert b'"code": "header_timeout"' in answers[0]
    assert [r.path for r in upstream.received] == ["/echo", "/echo"]


def test_a_tunnel_without_a_token_carrying_non_http_bytes_opens_no_connection(
    start_gateway: Any, token: str
) -> None:
    target = CountingListener()
    try:
        gateway = start_gateway(
            lambda c: c["routes"].append(
                {"name": "tcp", "host": "127.0.0.1", "port": target.port, "scheme": "http"}
            )
        )
        sock, established = open_tunnel(gateway.port or 0, f"127.0.0.1:{target.port}")
        assert established.status == 200  # inner tokens are allowed: the tunnel opens
        sock.sendall(b"SSH-2.0-OpenSSH_9.6\r\n\x00\x01\x02 not http at all\r\n\r\n")
        sock.settimeout(10)
        answer = b""
        try:
            while chunk_ := sock.recv(65536):
                answer += chunk_
        except (ConnectionResetError, TimeoutError):
            pass
        sock.close()
        time.sleep(0.5)
        assert target.accepted == 0
        assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:200]
    finally:
        target.close()
