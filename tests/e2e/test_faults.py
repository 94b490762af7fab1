"""Faults and hostile input through a real gateway: nothing leaks, nothing is lost.

Every test checks both halves: no secret, injected key or caller token reaches the client, the log
or the recording; and the client gets the complete answer or a clear error while the recording
holds the flow. Upstream faults come from a raw upstream (`tests/support/raw_upstream.py`) whose
handlers write broken HTTP on purpose. One gateway (recording on, the state probe loaded) serves
every test of this module except the recording-failure ones, which need their own configs.
"""

from __future__ import annotations

import copy
import gzip
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mitmproxy import io

from sluicegate.engine.chain import Signer
from tests.conftest import UPSTREAM_KEY, UPSTREAM_KEY_ENV
from tests.support.gateway import REPO, Gateway
from tests.support.pki import TestCA as CA
from tests.support.raw_upstream import LAST_CHUNK, RawRequest, RawUpstream, chunk, head
from tests.support.state_probe import PATH as STATE_PATH
from tests.support.upstream import FakeUpstream

PROBE_SCRIPT = REPO / "tests" / "support" / "state_probe.py"
SECRET = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
TAG = "[REDACTED:github-token]"
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


def recording(directory: Path, **settings: Any) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    signing = directory.parent / f"{directory.name}-signing.pem"
    signing.write_bytes(Signer.generate().private_pem())
    return {"directory": str(directory), "signing_key": {"file": str(signing)}, **settings}


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
    config["recording"] = recording(workdir / "recordings")
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


def recorded_flows(gateway: Gateway, path: str, count: int = 1, timeout: float = 10) -> list[Any]:
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
        sock.sendall(stream_head() + chunk(sse_event("fine")))
        sock.sendall(chunk(b"data: \xff\xfe not utf-8 " + SECRET.encode() + b"\n\n"))
        sock.sendall(chunk(sse_event(f"after {SECRET}")) + chunk(DONE) + LAST_CHUNK)

    raw.handle("/sse-utf8", handler)
    got, error = fetch_stream(gateway, token, raw.url("/sse-utf8"))
    assert error is None
    # Released text arrives; text still held back when the stream is cut is dropped, never sent.
    assert b'"fin' in got and b"after" not in got
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
    if fault == "truncated-gzip":
        assert response.json()["error"]["code"] == "content_decode_failed"
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
