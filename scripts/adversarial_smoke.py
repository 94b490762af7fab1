"""Adversarial smoke run: known attack classes against a real gateway; exit 1 on any leak.

    python scripts/adversarial_smoke.py [-k SUBSTRING] [-v]

One real `mitmdump -s addons/gateway.py` (token auth, an injected upstream key, the default rule
pack both ways, recording on) in front of local upstreams the script starts: the fake
OpenAI-style API (HTTP/1.1), a raw HTTP/1.1 upstream that writes any bytes, and an HTTP/2-only
upstream. Each case is one attack (README "Redaction" and "Failure behaviour" list what the
gateway does with each part of a message). A case passes when the gateway redacted or refused as
documented; the whole run fails when any case failed, or when the injected key, the caller's
token or a planted secret shows up anywhere it must not: what a client received, what an upstream
received (for secrets the agent sent), the gateway's log, or a recording.

CI runs it (scripts/dev.sh test); it takes well under a minute. Add a case: write a function
`def case_x(s: Smoke) -> None` that performs the attack (`s.seen(...)` every byte the client
got, `s.check(condition, what)` what must hold) and decorate it with `@case("name")`.
"""

from __future__ import annotations

import argparse
import base64
import copy
import gzip
import json
import socket
import ssl
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "addons"), str(ROOT)]

import httpx  # noqa: E402

from tests.conftest import UPSTREAM_KEY, UPSTREAM_KEY_ENV, make_config  # noqa: E402
from tests.support.gateway import Gateway, recording_section  # noqa: E402
from tests.support.h2_wire import (  # noqa: E402
    H2Message,
    H2Reply,
    H2Upstream,
    h2_exchange,
    request_fields,
)
from tests.support.pki import TestCA  # noqa: E402
from tests.support.raw_upstream import RawRequest, RawUpstream  # noqa: E402
from tests.support.tokens import TestIdP  # noqa: E402
from tests.support.upstream import FakeUpstream  # noqa: E402
from tests.support.wire import basic, open_tunnel  # noqa: E402

# A secret of the default rule pack, planted by agents (must not reach an upstream) and by
# upstreams (must not reach the agent).
SECRET = "ghp_" + "Sm0keTestTokenAbCdEfGhIjKlMnOpQrStUv12"
TAG = "[REDACTED:github-token]"


class CaseFailed(AssertionError):
    pass


class Smoke:
    """What a case gets: the gateway, the upstreams, a caller token, and the bookkeeping."""

    def __init__(
        self,
        gateway: Gateway,
        token: str,
        api: FakeUpstream,
        raw: RawUpstream,
        h2: H2Upstream,
    ) -> None:
        self.gateway = gateway
        self.token = token
        self.api = api
        self.raw = raw
        self.h2 = h2
        self.client_bytes: list[bytes] = []

    def client(self, **kw: Any) -> httpx.Client:
        return self.gateway.client(self.token, **kw)

    def seen(self, *parts: bytes | str) -> None:
        """Everything a client received: checked for the key, the token and the secret."""
        for part in parts:
            self.client_bytes.append(part.encode() if isinstance(part, str) else part)

    def check(self, condition: object, what: str) -> None:
        if not condition:
            raise CaseFailed(what)


Case = Callable[[Smoke], None]
CASES: list[tuple[str, Case]] = []


def case(name: str) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        CASES.append((name, fn))
        return fn

    return register


# -- cases -----------------------------------------------------------------------------------------


@case("request query and body: a secret never reaches the upstream")
def case_request_query_and_body(s: Smoke) -> None:
    with s.client() as client:
        response = client.post(
            s.api.url(f"/echo?key={SECRET}"), json={"prompt": f"use {SECRET} please"}
        )
    s.seen(response.content)
    s.check(response.status_code == 200, f"status {response.status_code}")
    s.check(TAG in response.text, "the echo shows the redaction tag")


@case("response body: an echoed injected key is scrubbed")
def case_response_body_echo(s: Smoke) -> None:
    s.api.script.echo_credential = True
    try:
        with s.client() as client:
            response = client.post(s.api.url("/v1/chat/completions"), json={"messages": []})
    finally:
        s.api.script.echo_credential = False
    s.seen(response.content, str(response.headers))
    s.check(response.status_code == 200, f"status {response.status_code}")


@case("response header value: an echoed injected key is scrubbed")
def case_response_header_value(s: Smoke) -> None:
    def handler(sock: Any, request: Any) -> None:
        key = request.headers.get("authorization", "")
        body = b'{"ok": true}'
        sock.sendall(
            f"HTTP/1.1 200 OK\r\nx-debug: {key}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )

    s.raw.handle("/header-value", handler)
    with s.client() as client:
        response = client.get(s.raw.url("/header-value"))
    s.seen(response.content, str(response.headers.multi_items()))
    s.check(response.status_code == 200, f"status {response.status_code}")


def _answer(head: bytes, body: bytes = b"") -> Any:
    """A raw upstream handler: `head` + `body`, `{key}` replaced by the credential received."""

    def handler(sock: socket.socket, request: RawRequest) -> None:
        key = request.headers.get("authorization", "").encode()
        sock.sendall((head + body).replace(b"{key}", key))

    return handler


def _h2(s: Smoke, up: RawUpstream | H2Upstream, path: str, **kw: Any) -> H2Message:
    authority = f"127.0.0.1:{up.port}"
    fields = request_fields(kw.pop("method", "GET"), authority, path, kw.pop("extra", ()))
    got = h2_exchange(s.gateway.port or 0, str(s.gateway.ca_file), authority, s.token, fields, **kw)
    s.seen(got.raw())
    return got


def _h1_raw(s: Smoke, up: RawUpstream, request: bytes) -> bytes:
    """`request` as written over HTTP/1.1 in a tunnel; everything answered until close."""
    sock, established = open_tunnel(s.gateway.port or 0, f"127.0.0.1:{up.port}", basic(s.token))
    s.check(established.status == 200, f"CONNECT answered {established.status}")
    data = b""
    with s.gateway.ssl_context().wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        tls.settimeout(15)
        tls.sendall(request)
        try:
            while part := tls.recv(65536):
                data += part
        except (ConnectionResetError, ssl.SSLError):
            pass
    s.seen(data)
    return data


@case("HTTP/2 response trailer: grpc-message echoing the key is scrubbed")
def case_h2_trailer(s: Smoke) -> None:
    def grpc(request: H2Message) -> H2Reply:
        key = (request.header("authorization") or "").encode()
        return H2Reply(
            [(b":status", b"200"), (b"content-type", b"application/json")],
            b"{}",
            [(b"grpc-status", b"16"), (b"grpc-message", b"bad key " + key)],
        )

    s.h2.handle("/pkg.Svc/Call", grpc)
    got = _h2(s, s.h2, "/pkg.Svc/Call", method="POST", extra=[("te", "trailers")])
    s.check(got.status == 200 and got.trailers, f"status {got.status}, trailers {got.trailers}")


@case("reason phrase: `401 Invalid key <key>` is replaced by the standard phrase")
def case_reason_phrase(s: Smoke) -> None:
    s.raw.handle(
        "/reason",
        _answer(b"HTTP/1.1 401 Invalid key {key}\r\ncontent-length: 2\r\n\r\n", b"{}"),
    )
    got = _h1_raw(s, s.raw, b"GET /reason HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    s.check(got.startswith(b"HTTP/1.1 401 Unauthorized\r\n"), f"answered {got[:40]!r}")


@case("response header name holding the key is dropped")
def case_header_name(s: Smoke) -> None:
    head = f"HTTP/1.1 200 OK\r\nx-echo-{UPSTREAM_KEY}: 1\r\ncontent-length: 0\r\n\r\n"
    s.raw.handle("/header-name", _answer(head.encode()))
    with s.client() as client:
        response = client.get(s.raw.url("/header-name"))
    s.seen(str(response.headers.multi_items()))
    s.check(response.status_code == 200, f"status {response.status_code}")


@case("request Cookie, Referer, X-* and response Set-Cookie, Location carry no secret")
def case_headers_both_ways(s: Smoke) -> None:
    s.raw.handle(
        "/headers",
        _answer(
            b"HTTP/1.1 302 Found\r\nset-cookie: sid=" + SECRET.encode() + b"; Path=/\r\n"
            b"location: https://example.test/cb?access_token=" + SECRET.encode() + b"\r\n"
            b"content-length: 0\r\n\r\n"
        ),
    )
    sent = {
        "cookie": f"a=1; token={SECRET}",
        "referer": f"https://example.test/?t={SECRET}",
        "x-note": SECRET,
    }
    with s.client(follow_redirects=False) as client:
        response = client.get(s.raw.url("/headers"), headers=sent)
    s.seen(str(response.headers.multi_items()))
    s.check(response.status_code == 302, f"status {response.status_code}")


@case("a secret in the request path is refused (403 secret_in_path), HTTP/1.1 and HTTP/2")
def case_path(s: Smoke) -> None:
    got = _h1_raw(
        s, s.raw, f"GET /v1/x/{SECRET} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    s.check(b"secret_in_path" in got, f"answered {got[:60]!r}")
    h2 = _h2(s, s.h2, f"/v1/x/{SECRET}")
    s.check(h2.status == 403, f"HTTP/2 answered {h2.status}")


@case("HTTP/2 header value with CRLF smuggling a request to HTTP/1.1 is refused")
def case_crlf(s: Smoke) -> None:
    # Ends in a non-space: h2 itself refuses values surrounded by whitespace (connection error).
    smuggled = f"x\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\nx-c: {SECRET}\r\n\r\nGET /x".encode()
    got = _h2(s, s.raw, "/first", extra=[(b"x-split", smuggled)])
    # 400 invalid_header; h2 >= 4.2 (mitmproxy 12) resets such a stream itself.
    s.check(got.status == 400 or (got.reset and not got.headers), f"status {got.status}: {got}")
    s.check(not s.raw.received, "a request reached the upstream")


@case("a 101 that is no WebSocket never becomes a raw relay")
def case_upgrade(s: Smoke) -> None:
    s.raw.handle(
        "/upgrade",
        _answer(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: tcp\r\nConnection: Upgrade\r\n\r\n",
            b"RAW {key} " + SECRET.encode(),
        ),
    )
    got = _h1_raw(
        s,
        s.raw,
        b"GET /upgrade HTTP/1.1\r\nHost: x\r\nUpgrade: tcp\r\nConnection: Upgrade\r\n\r\n",
    )
    s.check(b"upgrade_refused" in got and b"RAW" not in got, f"answered {got[:60]!r}")


@case("Transfer-Encoding: gzip, chunked is refused, not forwarded undecoded")
def case_transfer_coding(s: Smoke) -> None:
    packed = gzip.compress(SECRET.encode())
    s.raw.handle(
        "/te",
        _answer(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(packed), packed),
        ),
    )
    with s.client() as client:
        response = client.get(s.raw.url("/te"))
    s.seen(response.content)
    s.check(response.status_code == 502, f"status {response.status_code}")


@case("HTTP/1.1 trailers: no crash, no hang, inspected")
def case_h1_trailers(s: Smoke) -> None:
    s.raw.handle(
        "/h1-trailers",
        _answer(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n",
            b"2\r\n{}\r\n0\r\nx-key: {key}\r\nx-note: " + SECRET.encode() + b"\r\n\r\n",
        ),
    )
    with s.client(timeout=10) as client:
        response = client.get(s.raw.url("/h1-trailers"))
    s.seen(response.content)
    s.check(response.status_code == 200, f"status {response.status_code}")
    got = _h2(s, s.raw, "/h1-trailers")
    s.check(got.status == 200 and got.trailers, f"HTTP/2: {got.status}, {got.trailers}")


@case("a tunnel without a token carrying non-HTTP bytes opens no upstream connection")
def case_connect_junk(s: Smoke) -> None:
    before = len(s.raw.received)
    sock, established = open_tunnel(s.gateway.port or 0, f"127.0.0.1:{s.raw.port}")
    s.check(established.status == 200, f"CONNECT answered {established.status}")
    sock.sendall(b"SSH-2.0-OpenSSH_9.6\r\n\x00\x01 not http\r\n\r\n")
    sock.settimeout(10)
    try:
        while part := sock.recv(65536):
            s.seen(part)
    except (ConnectionResetError, TimeoutError):
        pass
    sock.close()
    s.check(len(s.raw.received) == before, "bytes reached the upstream")


# -- bodies as lenient readers see them (README "Redaction": bodies by type and charset) -----------


def _last_body(s: Smoke) -> bytes:
    s.check(len(s.api.received) == 1, f"{len(s.api.received)} requests reached the upstream")
    return s.api.received[-1].body


@case("request body in UTF-16 without a byte-order mark, labelled UTF-8: redacted")
def case_utf16_request(s: Smoke) -> None:
    body = json.dumps({"prompt": f"use {SECRET}"}).encode("utf-16-le")
    with s.client() as client:
        response = client.post(
            s.api.url("/echo"), content=body, headers={"content-type": "application/json"}
        )
    s.seen(response.content)
    s.check(response.status_code == 200, f"status {response.status_code}")
    got = json.loads(_last_body(s))  # json.loads(bytes) reads UTF-16 by its NULs
    s.check(SECRET not in json.dumps(got) and TAG in got["prompt"], "UTF-16 body not redacted")


@case("escaped JSON labelled text/plain with trailing data: redacted as JSON")
def case_json_labelled_text(s: Smoke) -> None:
    escaped = SECRET.replace("_", "\\u005f")
    body = ('{"prompt": "use ' + escaped + '"} trailing').encode()
    with s.client() as client:
        response = client.post(
            s.api.url("/echo"), content=body, headers={"content-type": "text/plain"}
        )
    s.seen(response.content)
    s.check(response.status_code == 200, f"status {response.status_code}")
    first, _ = json.JSONDecoder().raw_decode(_last_body(s).decode())
    s.check(first == {"prompt": f"use {TAG}"}, f"read as {first!r}")


@case("two different Content-Type headers: refused")
def case_two_content_types(s: Smoke) -> None:
    headers = [("content-type", "application/octet-stream"), ("content-type", "application/json")]
    with s.client() as client:
        response = client.post(s.api.url("/echo"), content=b'{"a": 1}', headers=headers)
    s.seen(response.content)
    s.check(response.status_code == 415, f"status {response.status_code}")
    s.check(s.api.received == [], "the request reached the upstream")


@case("multipart part in base64: decoded, redacted, encoded again")
def case_multipart_base64(s: Smoke) -> None:
    part = base64.b64encode(f"notes {SECRET}".encode())
    body = (
        b'--b1\r\ncontent-disposition: form-data; name="notes"\r\n'
        b"content-transfer-encoding: base64\r\n\r\n" + part + b"\r\n--b1--\r\n"
    )
    with s.client() as client:
        response = client.post(
            s.api.url("/echo"),
            content=body,
            headers={"content-type": "multipart/form-data; boundary=b1"},
        )
    s.seen(response.content)
    s.check(response.status_code == 200, f"status {response.status_code}")
    encoded = _last_body(s).split(b"\r\n\r\n", 1)[1].split(b"\r\n", 1)[0]
    s.check(base64.b64decode(encoded) == f"notes {TAG}".encode(), "base64 part not redacted")


@case("a fake tag beside a secret protects nothing")
def case_fake_tag(s: Smoke) -> None:
    with s.client() as client:
        response = client.post(s.api.url("/echo"), json={"prompt": f"{SECRET}[REDACTED:a]"})
    s.seen(response.content)
    s.check(response.status_code == 200 and TAG in response.text, f"status {response.status_code}")


@case("a response body in UTF-16 echoing the injected key: scrubbed")
def case_utf16_echo(s: Smoke) -> None:
    def handler(sock: Any, request: Any) -> None:
        key = request.headers.get("authorization", "")
        body = json.dumps({"error": f"bad key {key}"}).encode("utf-16")
        sock.sendall(
            b"HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )

    s.raw.handle("/utf16-echo", handler)
    with s.client() as client:
        response = client.get(s.raw.url("/utf16-echo"))
    s.seen(response.content)
    for codec in ("utf-16-le", "utf-16-be"):
        s.check(UPSTREAM_KEY.encode(codec) not in response.content, "the key reached the client")


@case("a 64 KiB adversarial body does not stall a small request")
def case_adversarial_body(s: Smoke) -> None:
    outcome: dict[str, int] = {}

    def big() -> None:
        with s.client(timeout=120) as client:
            response = client.post(
                s.api.url("/echo"), content=b"pwd" * 21846, headers={"content-type": "text/plain"}
            )
            outcome["status"] = response.status_code

    worker = threading.Thread(target=big)
    worker.start()
    time.sleep(0.3)
    began = time.monotonic()
    with s.client(timeout=60) as client:
        small = client.post(s.api.url("/echo"), json={"prompt": "hello"})
    waited = time.monotonic() - began
    worker.join(120)
    s.check(small.status_code == 200 and waited < 10, f"small request took {waited:.1f} s")
    s.check(outcome.get("status") == 200, f"adversarial body answered {outcome}")


# -- the run ---------------------------------------------------------------------------------------


def start(workdir: Path) -> tuple[Gateway, TestIdP, FakeUpstream, RawUpstream, H2Upstream]:
    pki = TestCA(workdir / "pki")
    idp = TestIdP(workdir / "idp")
    api = FakeUpstream(pki.issue("api-upstream"))
    plain = FakeUpstream()
    raw = RawUpstream(pki.issue("raw-upstream"))
    h2 = H2Upstream(pki.issue("h2-upstream"))
    config = copy.deepcopy(make_config(idp, api, plain))
    key = {"env": UPSTREAM_KEY_ENV}
    config["routes"] += [
        {"name": "raw", "host": "127.0.0.1", "port": raw.port, "credential": key},
        {"name": "h2", "host": "127.0.0.1", "port": h2.port, "credential": key},
    ]
    config["recording"] = recording_section(workdir / "recordings")
    gateway = Gateway(
        config,
        workdir / "gateway",
        upstream_ca=pki.cert_file,
        env={UPSTREAM_KEY_ENV: UPSTREAM_KEY},
    )
    gateway.start()
    return gateway, idp, api, raw, h2


def leaks(smoke: Smoke, received: bytes) -> list[str]:
    """Where the key, the token or the secret turned up."""
    found = []
    logs = smoke.gateway.settled_logs()
    recordings = b"".join(p.read_bytes() for p in smoke.gateway.workdir.rglob("*.mitm"))
    client = b"\n".join(smoke.client_bytes)
    for name, needle in (("injected key", UPSTREAM_KEY), ("caller token", smoke.token)):
        if needle.encode() in client:
            found.append(f"{name} reached a client")
        if needle in logs:
            found.append(f"{name} in the gateway log")
        if needle.encode() in recordings:
            found.append(f"{name} in a recording")
    if SECRET.encode() in client:
        found.append("planted secret reached a client")
    if SECRET.encode() in received:
        found.append("planted secret reached an upstream")
    if SECRET in logs:
        found.append("planted secret in the gateway log")
    if SECRET.encode() in recordings:
        found.append("planted secret in a recording")
    # The caller's token must never reach an upstream either.
    if smoke.token.encode() in received:
        found.append("caller token reached an upstream")
    return found


def upstream_bytes(smoke: Smoke) -> bytes:
    parts = [got.raw() for got in smoke.api.received]
    for got in smoke.raw.received:
        head = "".join(f"{k}: {v}\n" for k, v in got.headers.items())
        parts.append(f"{got.method} {got.path}\n{head}".encode() + got.body)
    parts += [got.raw() for got in smoke.h2.received]
    return b"\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", default="", help="run only cases whose name contains this")
    parser.add_argument("-v", action="store_true", help="print the gateway log at the end")
    args = parser.parse_args()
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sluicegate-smoke-") as tmp:
        gateway, idp, api, raw, h2 = start(Path(tmp))
        failed: list[str] = []
        try:
            smoke = Smoke(gateway, idp.mint(), api, raw, h2)
            received: list[bytes] = []
            for name, fn in CASES:
                if args.k not in name:
                    continue
                try:
                    fn(smoke)
                except Exception as exc:
                    detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                    failed.append(f"{name}: {detail}")
                    print(f"FAIL  {name}: {detail}")
                else:
                    print(f"ok    {name}")
                received.append(upstream_bytes(smoke))
                for server in (api, raw, h2):
                    server.reset()
            gateway.stop()  # seals the recordings; the log is complete
            for leak in leaks(smoke, b"\n".join(received)):
                failed.append(f"LEAK: {leak}")
                print(f"LEAK  {leak}")
            if args.v:
                print(gateway.logs)
        finally:
            gateway.stop()
            for server in (api, raw, h2):
                server.close()
    elapsed = time.monotonic() - began
    print(f"{len(failed)} problem(s) in {elapsed:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
