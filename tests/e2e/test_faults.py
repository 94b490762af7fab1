"""Faults and hostile input through a real gateway: nothing leaks, nothing is lost.

Every test checks both halves: no secret, injected key or caller token reaches the client, the log
or the recording; and the client gets the complete answer or a clear error while the recording
holds the flow. Upstream faults come from a raw upstream (`tests/support/raw_upstream.py`) whose
handlers write broken HTTP on purpose. One gateway (recording on, the state probe loaded) serves
every test of this module except the recording-failure ones, which need their own configs.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gzip
import json
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from mitmproxy import io

from tests.conftest import UPSTREAM_KEY, UPSTREAM_KEY_ENV
from tests.support.gateway import REPO, Gateway, recording_section
from tests.support.pki import TestCA as CA
from tests.support.raw_upstream import LAST_CHUNK, RawRequest, RawUpstream, chunk, head
from tests.support.state_probe import PATH as STATE_PATH
from tests.support.upstream import FakeUpstream
from tests.support.wire import basic

PROBE_SCRIPT = REPO / "tests" / "support" / "state_probe.py"
SECRET = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
TAG = "[REDACTED:github-token]"
ECHO_TAG = "[REDACTED:injected-credential:raw]"
SSE = "text/event-stream"

pytestmark = pytest.mark.timeout(120)


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw(pki: CA) -> Iterator[RawUpstream]:
    server = RawUpstream(pki.issue("raw-upstream"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def raw_plain() -> Iterator[RawUpstream]:
    server = RawUpstream()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _reset(raw: RawUpstream, raw_plain: RawUpstream) -> None:
    raw.reset()
    raw_plain.reset()


def add_raw_routes(config: dict[str, Any], raw: RawUpstream, raw_plain: RawUpstream) -> None:
    config["routes"] += [
        {
            "name": "raw",
            "host": "127.0.0.1",
            "port": raw.port,
            "credential": {"env": UPSTREAM_KEY_ENV},
        },
        {"name": "rawplain", "host": "127.0.0.1", "port": raw_plain.port, "scheme": "http"},
    ]


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    pki: CA,
    base_config: dict,
    raw: RawUpstream,
    raw_plain: RawUpstream,
) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("faults-gateway")
    config = copy.deepcopy(base_config)
    add_raw_routes(config, raw, raw_plain)
    config["recording"] = recording_section(workdir / "recordings")
    gw = Gateway(
        config,
        workdir,
        upstream_ca=pki.cert_file,
        extra_args=("-s", str(PROBE_SCRIPT)),
        env={UPSTREAM_KEY_ENV: UPSTREAM_KEY},
    )
    gw.start()
    yield gw
    gw.stop()


# -- helpers ---------------------------------------------------------------------------------------


def sse_event(text: str) -> bytes:
    """An OpenAI chat chunk carrying `text`."""
    payload = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}}],
    }
    return f"data: {json.dumps(payload)}\n\n".encode()


DONE = b"data: [DONE]\n\n"


def stream_head(**headers: str) -> bytes:
    return head(200, content_type=SSE, transfer_encoding="chunked", **headers)


def fetch_stream(gateway: Gateway, token: str, url: str) -> tuple[bytes, Exception | None]:
    """Everything the client received of a streamed answer, and the error that ended it."""
    got = bytearray()
    with gateway.client(token) as client:
        try:
            with client.stream("POST", url, json={"stream": True}) as response:
                assert response.status_code == 200
                for part in response.iter_raw():
                    got += part
        except httpx.HTTPError as exc:
            return bytes(got), exc
    return bytes(got), None


def error_codes(stream: bytes) -> list[str]:
    codes = []
    for line in stream.decode("utf-8", "replace").splitlines():
        if line.startswith("data:") and '"error"' in line:
            codes.append(json.loads(line[5:])["error"]["code"])
    return codes


def assert_clean(gateway: Gateway, *seen: bytes | str, token: str | None = None) -> None:
    """No secret, injected key or caller token in what the client saw, the log or a recording."""
    logs = gateway.settled_logs()
    recorded = b"".join(p.read_bytes() for p in (gateway.workdir / "recordings").rglob("*.mitm"))
    needles = [SECRET, UPSTREAM_KEY] + ([token] if token else [])
    for needle in needles:
        for part in seen:
            text = part if isinstance(part, str) else part.decode("utf-8", "replace")
            assert needle not in text
        assert needle not in logs
        assert needle.encode() not in recorded


def recorded_flows(
    gateway: Gateway,
    path: str,
    count: int = 1,
    *,
    prefix: bool = False,
    directory: Path | None = None,
    timeout: float = 10,
) -> list[Any]:
    """The recorded flows for `path` (or every path starting with it), once `count` are there."""
    deadline = time.monotonic() + timeout
    flows: list[Any] = []
    while time.monotonic() < deadline:
        flows = []
        for session in sorted((directory or gateway.workdir / "recordings").glob("*/*.mitm")):
            with session.open("rb") as f:
                flows += [
                    fl
                    for fl in io.FlowReader(f).stream()
                    if fl.request.path == path or (prefix and fl.request.path.startswith(path))
                ]
        if len(flows) >= count:
            return flows
        time.sleep(0.1)
    raise AssertionError(f"{len(flows)} of {count} flows for {path} recorded")


def gateway_state(gateway: Gateway, token: str, raw_plain: RawUpstream) -> dict[str, Any]:
    with gateway.client(token) as client:
        response = client.get(raw_plain.url(STATE_PATH))
    assert response.status_code == 200, response.text
    return response.json()


def wait_released(gateway: Gateway, token: str, raw_plain: RawUpstream) -> dict[str, Any]:
    """The gateway's state once every earlier flow and connection is gone (or the last seen)."""
    deadline = time.monotonic() + 15
    while True:
        state = gateway_state(gateway, token, raw_plain)
        idle = (
            state["flows"] == 0
            and state["live_stream_pipelines"] == 0
            and state["recorder_in_flight"] == 0
            and state["connections"] <= 1
        )
        if idle or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def healthy(gateway: Gateway, token: str, upstream: FakeUpstream) -> bool:
    with gateway.client(token) as client:
        response = client.post(upstream.url("/v1/chat/completions"), json={"messages": []})
    return response.status_code == 200 and "fake model" in response.text


def rss(gateway: Gateway) -> int:
    assert gateway.proc is not None
    with open(f"/proc/{gateway.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# -- upstream faults: streamed answers -------------------------------------------------------------


def test_upstream_closing_mid_stream_ends_it_in_error_with_whole_events(
    gateway: Gateway, raw: RawUpstream, token: str
) -> None:
    def handler(sock: socket.socket, _: RawRequest) -> None:
        sock.sendall(stream_head() + chunk(sse_event(f"key {SECRET} ")) + chunk(sse_event("more")))
        sock.sendall(b"5\r\ndata:")  # half a chunk, then the upstream is gone

    raw.handle("/sse-cut", handler)
    got, error = fetch_stream(gateway, token, raw.url("/sse-cut"))
    assert isinstance(error, httpx.RemoteProtocolError)  # the client knows it is incomplete
    assert TAG.encode() in got and got.endswith(b"\n\n")
    (flow,) = recorded_flows(gateway, "/sse-cut")
    assert flow.error is not None
    assert flow.response.raw_content == got
    assert raw.received[0].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert_clean(gateway, got, token=token)


def test_malformed_sse_cuts_the_stream_with_an_error_event(
    gateway: Gateway, raw: RawUpstream, token: str
) -> None:
    def handler(sock: socket.socket, _: RawRequest) -> None:
        sock.sendall(stream_head() + chunk(sse_event("fine, ")))
        sock.sendall(chunk(b"data: \xff\xfe not utf-8 " + SECRET.encode() + b"\n\n"))
        sock.sendall(chunk(sse_event(f"after {SECRET}")) + chunk(DONE) + LAST_CHUNK)

    raw.handle("/sse-utf8", handler)
    got, error = fetch_stream(gateway, token, raw.url("/sse-utf8"))
    assert error is None
    # Released text arrives; text still held back when the stream is cut is dropped, never sent
    # (a word whose end could start a secret is held whole: "fine" would be).
    assert b'"fine, ' in got and b"after" not in got
    assert error_codes(got) == ["sse_invalid_utf8"]
    (flow,) = recorded_flows(gateway, "/sse-utf8")
    assert flow.metadata["sluicegate"]["stream"]["cut"] == "sse_invalid_utf8"
    assert_clean(gateway, got, token=token)


def test_invalid_json_in_events_is_redacted_as_text(
    gateway: Gateway, raw: RawUpstream, token: str
) -> None:
    broken = b'data: {"choices": [{"delta": {"content": "key ' + SECRET.encode() + b'"}\n\n'
    tail = b"data: not json at all " + SECRET.encode() + b"\n\n"

    def handler(sock: socket.socket, _: RawRequest) -> None:
        sock.sendall(stream_head() + chunk(broken) + chunk(tail) + chunk(DONE) + LAST_CHUNK)

    raw.handle("/sse-json", handler)
    got, error = fetch_stream(gateway, token, raw.url("/sse-json"))
    assert error is None and got.endswith(DONE)
    assert got.count(TAG.encode()) == 2
    recorded_flows(gateway, "/sse-json")
    assert_clean(gateway, got, token=token)


def test_a_truncated_gzip_stream_is_cut_with_a_decode_error(
    gateway: Gateway, raw: RawUpstream, token: str
) -> None:
    body = gzip.compress(sse_event("hello ") + sse_event(f"then {SECRET}") + DONE)

    def handler(sock: socket.socket, _: RawRequest) -> None:
        sock.sendall(stream_head(content_encoding="gzip") + chunk(body[: len(body) - 12]))
        sock.sendall(LAST_CHUNK)  # properly framed: only the gzip stream is cut short

    raw.handle("/sse-gzip", handler)
    got, error = fetch_stream(gateway, token, raw.url("/sse-gzip"))
    assert error is None
    assert error_codes(got) == ["content_decode_failed"]
    assert DONE not in got
    recorded_flows(gateway, "/sse-gzip")
    assert_clean(gateway, got, token=token)


def test_a_close_delimited_stream_arrives_complete(
    gateway: Gateway, raw: RawUpstream, token: str
) -> None:
    def handler(sock: socket.socket, _: RawRequest) -> None:
        sock.sendall(head(200, content_type=SSE, connection="close"))  # no length, no chunking
        sock.sendall(sse_event("one ") + sse_event(f"two {SECRET}") + DONE)

    raw.handle("/sse-eof", handler)
    got, error = fetch_stream(gateway, token, raw.url("/sse-eof"))
    assert error is None and got.endswith(DONE) and TAG.encode() in got
    (flow,) = recorded_flows(gateway, "/sse-eof")
    assert flow.error is None and flow.response.raw_content == got
    assert_clean(gateway, got, token=token)


# -- upstream faults: buffered answers -------------------------------------------------------------


def body_with_secrets() -> bytes:
    return json.dumps(
        {"note": f"key {SECRET}", "echo": f"Incorrect API key {UPSTREAM_KEY}"}
    ).encode()


LEAKY_HEADER = f"x-debug: {SECRET} {UPSTREAM_KEY}".encode()


@pytest.mark.parametrize(
    "fault",
    [
        "closed-mid-body",
        "declared-longer",
        "broken-chunking",
        "truncated-gzip",
        "head-cut",  # mitmproxy quotes the partial head in its error
        "bad-header-line",  # ... and the line it cannot parse
    ],
)
def test_a_broken_buffered_answer_is_a_clear_error_without_any_of_it(
    gateway: Gateway, raw: RawUpstream, token: str, fault: str
) -> None:
    body = body_with_secrets()

    def handler(sock: socket.socket, _: RawRequest) -> None:
        json_head: dict[str, str] = {"content_type": "application/json"}
        if fault == "head-cut":
            sock.sendall(b"HTTP/1.1 200 OK\r\n" + LEAKY_HEADER + b"\r\n")
        elif fault == "bad-header-line":
            sock.sendall(b"HTTP/1.1 200 OK\r\n" + LEAKY_HEADER.replace(b":", b"") + b"\r\n\r\n")
        elif fault == "closed-mid-body":
            sock.sendall(head(200, content_length=str(len(body)), **json_head) + body[:-20])
        elif fault == "declared-longer":
            sock.sendall(head(200, content_length=str(len(body) + 500), **json_head) + body)
        elif fault == "broken-chunking":
            sock.sendall(head(200, transfer_encoding="chunked", **json_head) + chunk(body[:40]))
            sock.sendall(b"zz\r\n" + body[40:])
        else:
            cut = gzip.compress(body)[:-10]
            sock.sendall(
                head(200, content_length=str(len(cut)), content_encoding="gzip", **json_head) + cut
            )

    raw.handle(f"/{fault}", handler)
    with gateway.client(token) as client:
        response = client.post(raw.url(f"/{fault}"), json={})
    assert response.status_code == 502
    error = response.json()["error"]  # our JSON error, never mitmproxy's HTML page
    assert error["request_id"] == response.headers["x-sluicegate-request-id"]
    if fault == "truncated-gzip":
        assert error["code"] == "content_decode_failed"
    else:
        assert error["code"] in ("upstream_closed", "upstream_protocol_error"), error
    (flow,) = recorded_flows(gateway, f"/{fault}")
    assert flow.error is not None or flow.response.status_code == 502
    assert_clean(gateway, response.text, token=token)


def test_a_client_cut_off_mid_head_leaves_its_token_out_of_the_log(
    gateway: Gateway, raw: RawUpstream, token: str
) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port or 0), timeout=10) as sock:
        target = f"127.0.0.1:{raw.port}"
        sock.sendall(
            f"CONNECT {target} HTTP/1.1\r\nProxy-Authorization: Bearer {token}\r\n".encode()
        )
    deadline = time.monotonic() + 5
    while "before completing request headers" not in gateway.logs:
        assert time.monotonic() < deadline, "mitmproxy did not log the cut-off head"
        time.sleep(0.1)
    assert_clean(gateway, token=token)


def test_a_body_longer_than_declared_is_cut_at_the_declared_length(
    gateway: Gateway, raw: RawUpstream, token: str
) -> None:
    declared = b'{"ok": true}'

    def handler(sock: socket.socket, _: RawRequest) -> None:
        extra = b" trailing " + body_with_secrets()
        sock.sendall(head(200, content_type="application/json", content_length="12"))
        sock.sendall(declared + extra)

    raw.handle("/declared-shorter", handler)
    with gateway.client(token) as client:
        first = client.post(raw.url("/declared-shorter"), json={})
        second = client.post(raw.url("/declared-shorter"), json={})
    assert (first.status_code, first.content) == (200, declared)
    assert (second.status_code, second.content) == (200, declared)  # the rest never leaks later
    recorded_flows(gateway, "/declared-shorter", count=2)
    assert_clean(gateway, first.text, second.text, token=token)


# -- hostile clients -------------------------------------------------------------------------------


def raw_exchange(gateway: Gateway, request: bytes, timeout: float = 20) -> bytes:
    """Send `request` on a fresh connection; everything the gateway answers until it closes."""
    data = b""
    with socket.create_connection(("127.0.0.1", gateway.port or 0), timeout=timeout) as sock:
        try:
            sock.sendall(request)
            while chunk_ := sock.recv(65536):
                data += chunk_
        except (ConnectionResetError, BrokenPipeError):
            pass
    return data


def proxy_get(url: str, token: str, extra: str = "") -> bytes:
    return (
        f"GET {url} HTTP/1.1\r\nHost: upstream\r\nProxy-Authorization: {basic(token)}\r\n"
        f"{extra}Connection: close\r\n\r\n"
    ).encode()


@pytest.mark.parametrize(
    "extra",
    [
        "x-huge: " + "a" * (1 << 20) + "\r\n",  # one huge value
        "".join(f"x-h{i}: v\r\n" for i in range(1000)),  # many small headers, a small head
    ],
    ids=["huge-value", "many-headers"],
)
def test_oversized_headers_get_a_clear_431(
    gateway: Gateway, raw_plain: RawUpstream, upstream: FakeUpstream, token: str, extra: str
) -> None:
    raw_plain.handle("/headers", lambda sock, _: sock.sendall(head(204, connection="close")))
    answer = raw_exchange(gateway, proxy_get(raw_plain.url("/headers"), token, extra))
    status, _, rest = answer.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 431"), answer[:200]
    assert b'"code": "headers_too_large"' in rest
    assert raw_plain.received == []
    assert healthy(gateway, token, upstream)


def test_an_endless_header_is_cut_off_before_the_gateway_buffers_it(
    gateway: Gateway, upstream: FakeUpstream, token: str
) -> None:
    before = rss(gateway)
    answer = b""
    sent = 0
    with socket.create_connection(("127.0.0.1", gateway.port or 0), timeout=10) as sock:
        sock.sendall(b"GET http://127.0.0.1/ HTTP/1.1\r\nx-endless: ")  # no token: anyone can
        try:
            while sent < 64 << 20:
                sock.sendall(b"a" * (1 << 20))
                sent += 1 << 20
        except (ConnectionResetError, BrokenPipeError):
            pass
        with contextlib.suppress(ConnectionResetError):
            answer = sock.recv(65536)
    assert sent < 64 << 20, "the gateway kept reading an endless header"
    assert rss(gateway) - before < 16 << 20
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431")
    assert healthy(gateway, token, upstream)


def test_an_endless_upstream_response_head_is_a_502(
    gateway: Gateway, raw: RawUpstream, token: str
) -> None:
    def handler(sock: socket.socket, _: RawRequest) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nx-endless: ")
        for _ in range(64):
            sock.sendall(b"b" * (1 << 20))

    raw.handle("/endless-head", handler)
    with gateway.client(token) as client:
        response = client.get(raw.url("/endless-head"))
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_protocol_error"
    recorded_flows(gateway, "/endless-head")


# -- clients that go away, read slowly, or come in crowds -----------------------------------------


def endless_events(sock: socket.socket, _: RawRequest) -> None:
    """An SSE stream of small events until the gateway stops reading (at most ~10 s)."""
    sock.sendall(stream_head())
    for i in range(500):
        sock.sendall(chunk(sse_event(f"token {i} ")))
        time.sleep(0.02)


def test_clients_aborting_mid_stream_release_everything(
    gateway: Gateway, raw: RawUpstream, raw_plain: RawUpstream, upstream: FakeUpstream, token: str
) -> None:
    raw.handle("/endless", endless_events)
    aborted = 20

    def abort_after_first_event() -> None:
        with gateway.client(token) as client, client.stream("POST", raw.url("/endless")) as r:
            for part in r.iter_raw():
                if b"token" in part:
                    return  # leaving both blocks drops the connection mid-body

    threads = [threading.Thread(target=abort_after_first_event) for _ in range(aborted)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    state = wait_released(gateway, token, raw_plain)
    assert state["live_stream_pipelines"] == 0, state
    assert state["flows"] == 0 and state["recorder_in_flight"] == 0, state
    assert state["connections"] <= 1, state
    flows = recorded_flows(gateway, "/endless", count=aborted)
    assert all(flow.error is not None for flow in flows)
    assert healthy(gateway, token, upstream)


def test_a_stalled_reader_does_not_make_the_gateway_buffer(
    gateway: Gateway, raw: RawUpstream, raw_plain: RawUpstream, token: str
) -> None:
    sent = [0]
    event = sse_event("x" * (64 << 10))

    def huge_stream(sock: socket.socket, _: RawRequest) -> None:
        sock.sendall(stream_head())
        for _ in range(4096):  # 256 MiB if anyone read it all
            sock.sendall(chunk(event))
            sent[0] += len(event)

    raw.handle("/huge", huge_stream)
    before = rss(gateway)
    with gateway.client(token) as client, client.stream("POST", raw.url("/huge")) as response:
        stream = response.iter_raw()
        next(stream)  # the stream is flowing; now stop reading
        deadline = time.monotonic() + 10
        while True:  # until the upstream is blocked by backpressure
            pushed = sent[0]
            time.sleep(1)
            if sent[0] == pushed or time.monotonic() > deadline:
                break
        grown = rss(gateway) - before
        assert sent[0] < 96 << 20, f"the upstream pushed {sent[0] >> 20} MiB into the gateway"
        assert grown < 64 << 20, f"the gateway grew by {grown >> 20} MiB"
        assert sent[0] == pushed, "the upstream was never throttled"
        print(
            f"stalled reader: upstream pushed {sent[0] >> 20} MiB, gateway grew {grown >> 20} MiB"
        )
    state = wait_released(gateway, token, raw_plain)
    assert state["live_stream_pipelines"] == 0, state


def test_a_slow_reader_gets_the_whole_stream(
    gateway: Gateway, raw: RawUpstream, token: str
) -> None:
    events = [sse_event(f"piece {i} " + "y" * 4000) for i in range(512)] + [DONE]

    def stream(sock: socket.socket, _: RawRequest) -> None:
        sock.sendall(stream_head() + b"".join(chunk(e) for e in events) + LAST_CHUNK)

    raw.handle("/slow-read", stream)
    got = bytearray()
    with gateway.client(token) as client, client.stream("POST", raw.url("/slow-read")) as r:
        for i, part in enumerate(r.iter_raw(8192)):
            got += part
            if i % 16 == 0:
                time.sleep(0.02)
    assert bytes(got) == b"".join(events)


def test_500_concurrent_connections_are_all_answered(
    gateway: Gateway, raw_plain: RawUpstream, upstream: FakeUpstream, token: str
) -> None:
    def answer(sock: socket.socket, request: RawRequest) -> None:
        body = json.dumps({"query": request.path.split("?", 1)[1]}).encode()
        sock.sendall(
            head(200, content_type="application/json", content_length=str(len(body))) + body
        )

    raw_plain.handle("/crowd", answer)
    count = 500

    async def crowd() -> list[bytes]:
        connected = asyncio.Event()
        opened = 0

        async def one(i: int) -> bytes:
            nonlocal opened
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            opened += 1
            if opened == count:
                connected.set()
            await asyncio.wait_for(connected.wait(), 30)  # all 500 open at once
            writer.write(proxy_get(raw_plain.url(f"/crowd?n={i}"), token))
            data = await asyncio.wait_for(reader.read(), 60)
            writer.close()
            return data

        return await asyncio.gather(*(one(i) for i in range(count)))

    answers = asyncio.run(crowd())
    refused = 0
    for i, data in enumerate(answers):
        status = data.split(b" ", 2)[1]
        if status == b"200":
            assert data.endswith(json.dumps({"query": f"n={i}"}).encode())
        else:  # refused clearly: a status and the gateway's JSON error
            assert status.startswith((b"4", b"5")) and b'"error"' in data, data[:300]
            refused += 1
    assert refused == 0, f"{refused} of {count} were refused"
    assert healthy(gateway, token, upstream)


class PreferHttp2(ssl.SSLContext):
    """httpx offers ALPN `http/1.1, h2` in a tunnel and mitmproxy takes the first; offer h2 first,
    as curl, Go and Node agents do."""

    def set_alpn_protocols(self, protocols: Iterable[str]) -> None:
        super().set_alpn_protocols(sorted(protocols, key=lambda p: p != "h2"))


def test_100_http2_streams_on_one_connection_are_each_answered_and_attributed(
    gateway: Gateway, raw: RawUpstream, token: str
) -> None:
    def echo(sock: socket.socket, request: RawRequest) -> None:
        body = json.dumps({"path": request.path, "auth": request.headers.get("authorization")})
        data = body.encode()
        sock.sendall(head(200, content_type="application/json", content_length=str(len(data))))
        sock.sendall(data)

    raw.handle("/h2", echo)
    context = PreferHttp2(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(gateway.ca_file)
    streams = 100

    async def parallel() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(
            http2=True, proxy=gateway.proxy_url(token), verify=context, limits=limits, timeout=60
        ) as client:
            return await asyncio.gather(
                *(client.get(raw.url(f"/h2?stream={i}")) for i in range(streams))
            )

    responses = asyncio.run(parallel())
    assert {r.http_version for r in responses} == {"HTTP/2"}
    for i, response in enumerate(responses):
        assert response.status_code == 200
        assert response.json() == {
            "path": f"/h2?stream={i}",
            "auth": f"Bearer {ECHO_TAG}",
        }
    assert len(raw.received) == streams
    assert {r.headers["authorization"] for r in raw.received} == {f"Bearer {UPSTREAM_KEY}"}
    flows = recorded_flows(gateway, "/h2", count=streams, prefix=True)
    subject = jwt.decode(token, options={"verify_signature": False})["sub"]
    assert {f.metadata["sluicegate"]["caller"]["subject"] for f in flows} == {subject}
    assert len({f.client_conn.id for f in flows}) == 1  # one connection carried them all
    assert_clean(gateway, *(r.text for r in responses), token=token)


# -- recording unavailable: fail closed (refuse) or say so (continue), never lose silently ---------


def recording_gateway(
    start_gateway: Any, directory: Path, raw: RawUpstream, raw_plain: RawUpstream, **settings: Any
) -> Gateway:
    def edit(config: dict[str, Any]) -> None:
        add_raw_routes(config, raw, raw_plain)
        config["recording"] = recording_section(directory, **settings)

    return start_gateway(edit)


def plain_answer(sock: socket.socket, _: RawRequest) -> None:
    body = b'{"ok": true}'
    sock.sendall(head(200, content_type="application/json", content_length="12") + body)


def wait_logged(gateway: Gateway, text: str) -> str:
    deadline = time.monotonic() + 10
    while text not in gateway.logs:
        assert time.monotonic() < deadline, f"not logged: {text}"
        time.sleep(0.1)
    return gateway.logs


def test_low_disk_refuses_before_anything_is_forwarded(
    start_gateway: Any, tmp_path: Path, raw: RawUpstream, raw_plain: RawUpstream, token: str
) -> None:
    gw = recording_gateway(start_gateway, tmp_path / "rec", raw, raw_plain, min_free_bytes=2**62)
    raw_plain.handle("/low-disk", plain_answer)
    with gw.client(token) as client:
        response = client.get(raw_plain.url("/low-disk"))
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "recording_unavailable"
    assert response.headers["retry-after"] == "5"
    assert raw_plain.received == []


def test_low_disk_with_on_failure_continue_forwards_and_logs_each_flow(
    start_gateway: Any, tmp_path: Path, raw: RawUpstream, raw_plain: RawUpstream, token: str
) -> None:
    gw = recording_gateway(
        start_gateway, tmp_path / "rec", raw, raw_plain, min_free_bytes=2**62, on_failure="continue"
    )
    raw_plain.handle("/low-disk", plain_answer)
    with gw.client(token) as client:
        response = client.get(raw_plain.url("/low-disk"))
    assert response.status_code == 200
    logs = wait_logged(gw, "recording unavailable (disk_low)")
    match = re.search(r"on_failure=continue forwards ([0-9a-f-]{36})", logs)
    assert match is not None, logs
    assert len(raw_plain.received) == 1
    # The warning names the flow; writing itself still worked, so the flow is recorded too.
    (flow,) = recorded_flows(gw, "/low-disk", directory=tmp_path / "rec")
    assert flow.id == match.group(1)


def test_a_vanished_directory_with_on_failure_continue_logs_every_lost_flow(
    start_gateway: Any, tmp_path: Path, raw: RawUpstream, raw_plain: RawUpstream, token: str
) -> None:
    directory = tmp_path / "rec"
    gw = recording_gateway(start_gateway, directory, raw, raw_plain, on_failure="continue")
    raw_plain.handle("/gone", plain_answer)
    shutil.rmtree(directory)
    directory.write_text("a file where the recording directory was")  # root ignores modes
    with gw.client(token) as client:
        statuses = [client.get(raw_plain.url(f"/gone?{i}")).status_code for i in range(3)]
    assert statuses == [200, 200, 200]
    logs = wait_logged(gw, "recording FAILED")
    assert logs.count("recording FAILED") == 3  # one loud line per unrecorded flow
    assert "recording_dir_missing" in logs


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root only); skipped where it cannot be mounted."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_never_loses_a_flow_silently(
    small_disk: Path,
    start_gateway: Any,
    raw: RawUpstream,
    raw_plain: RawUpstream,
    token: str,
) -> None:
    body = json.dumps({"filler": "z" * (150 << 10)}).encode()

    def big_answer(sock: socket.socket, _: RawRequest) -> None:
        length = str(len(body))
        sock.sendall(head(200, content_type="application/json", content_length=length) + body)

    raw_plain.handle("/fill", big_answer)
    gw = recording_gateway(start_gateway, small_disk / "rec", raw, raw_plain, min_free_bytes=0)
    outcomes: list[tuple[str, int, str]] = []
    with gw.client(token) as client:
        for i in range(12):
            response = client.get(raw_plain.url(f"/fill?{i}"))
            code = (
                response.json().get("error", {}).get("code", "")
                if response.status_code != 200
                else ""
            )
            outcomes.append((f"/fill?{i}", response.status_code, code))
    gw.stop()
    recorded = {
        f.request.path
        for session in (small_disk / "rec").glob("*/*.mitm")
        for f in io.FlowReader(session.open("rb")).stream()
    }
    answered = [path for path, status, _ in outcomes if status == 200]
    refused = [(path, code) for path, status, code in outcomes if status != 200]
    assert answered and refused, outcomes  # the disk filled up during the test
    assert all(code == "recording_unavailable" for _, code in refused), refused
    assert set(answered) <= recorded, "a flow the agent got an answer for is not recorded"
    assert "disk_full" in gw.logs


def test_a_stream_too_costly_to_redact_is_cut_not_left_to_hold_the_event_loop(
    gateway: Gateway, raw: RawUpstream, token: str
) -> None:
    # Deltas made to keep rules' partial matches open: each costs the stream redactor more than
    # the last (every feed rescans what is held). Unbudgeted, 2,000 of them held mitmproxy's
    # event loop, which every caller shares, for over a minute; the budget cuts the stream.
    def handler(sock: socket.socket, _: RawRequest) -> None:
        sock.sendall(stream_head() + chunk(sse_event("fine, ")))
        for _ in range(2000):
            sock.sendall(chunk(sse_event("api_key=")))
        sock.sendall(chunk(sse_event(f"after {SECRET}")) + chunk(DONE) + LAST_CHUNK)

    raw.handle("/sse-costly", handler)
    got, error = fetch_stream(gateway, token, raw.url("/sse-costly"))
    assert error is None
    assert b'"fine, ' in got and b"after" not in got
    assert error_codes(got) == ["redaction_timeout"]
    (flow,) = recorded_flows(gateway, "/sse-costly")
    assert flow.metadata["sluicegate"]["stream"]["cut"] == "redaction_timeout"
    assert_clean(gateway, got, token=token)
