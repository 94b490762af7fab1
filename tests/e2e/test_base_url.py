"""Base-URL mode: agents that cannot use a proxy are given the gateway as their API's base URL.

The official openai SDK runs with `base_url=http://127.0.0.1:<port>/openai/v1` and no proxy at
all (its HTTP client ignores the environment), against the local upstream the route points to:
the upstream receives the injected key, never the caller's token or the planted secret; the
agent gets the answer with the echoed key masked; the flow is recorded with its caller, route
and base-URL prefix. curl sends the requests an SDK never would (no token, unknown prefix,
traversal, proxy-style requests), each refused with the documented JSON error and nothing sent
upstream. Secrets are grepped for in what the agent got, the log and the recording.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from mitmproxy import io

from tests.conftest import UPSTREAM_KEY, UPSTREAM_KEY_ENV
from tests.support.gateway import REPO, Gateway, recording_section
from tests.support.rule_secrets import example
from tests.support.upstream import FakeUpstream

GITHUB_EXAMPLE = example("github-token")
GITHUB = GITHUB_EXAMPLE.secret
LISTENER = re.compile(r"base-URL listener at http://127\.0\.0\.1:(\d+)")
REQUEST_ID = "x-sluicegate-request-id"


def base_url_port(gw: Gateway) -> int:
    found = LISTENER.search(gw.settled_logs())
    assert found, gw.logs
    return int(found.group(1))


class BaseUrlGateway:
    def __init__(self, gw: Gateway, recordings: Path, collector: Collector) -> None:
        self.gw = gw
        self.recordings = recordings
        self.collector = collector
        self.port = base_url_port(gw)
        self.root = f"http://127.0.0.1:{self.port}"

    def flows(self, path: str | None = None, count: int = 0, timeout: float = 10) -> list[Any]:
        """The recorded flows (for `path`), once at least `count` are there: a flow is written
        when it ends, a moment after its client has read the last byte."""
        deadline = time.monotonic() + timeout
        while True:
            out: list[Any] = []
            for session in sorted(self.recordings.rglob("*.mitm")):
                with session.open("rb") as f:
                    out.extend(io.FlowReader(f).stream())
            if path is not None:
                out = [f for f in out if f.request.path == path]
            if len(out) >= count or time.monotonic() > deadline:
                return out
            time.sleep(0.05)

    def recorded_bytes(self) -> bytes:
        return b"".join(p.read_bytes() for p in self.recordings.rglob("*") if p.is_file())


class Collector:
    """An OpenTelemetry collector's OTLP/HTTP input on loopback: the spans it received."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                for resource in body["resourceSpans"]:
                    for scope in resource["scopeSpans"]:
                        collector.spans.extend(scope["spans"])
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def attributes(self) -> list[dict[str, Any]]:
        return [
            {a["key"]: next(iter(a["value"].values())) for a in span["attributes"]}
            for span in self.spans
        ]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def base_gw(start_gateway, tmp_path: Path) -> Iterator[BaseUrlGateway]:
    recordings = tmp_path / "recordings"
    collector = Collector()

    def edit(cfg: dict) -> None:
        cfg["recording"] = recording_section(recordings)
        cfg["base_url"] = {
            "listen_port": 0,
            "prefixes": {"/openai": "openai", "/internal": "internal"},
        }
        cfg["monitoring"] = {
            "listen_port": 0,
            "traces": {"endpoint": collector.url, "flush_seconds": 0.2},
        }
        cfg["policy"] = {
            "rules": [
                {
                    "id": "no-files",
                    "action": "block",
                    "match": {"routes": ["openai"], "paths": ["/v1/files(/.*)?"]},
                }
            ]
        }

    yield BaseUrlGateway(start_gateway(edit), recordings, collector)
    collector.close()


def sdk(root: str, api_key: str) -> openai.OpenAI:
    """The openai SDK pointed at the base URL; its client ignores HTTPS_PROXY & co."""
    return openai.OpenAI(
        api_key=api_key,
        base_url=f"{root}/openai/v1",
        http_client=httpx.Client(trust_env=False, timeout=20),
        max_retries=0,
    )


def test_the_openai_sdk_through_the_base_url(
    base_gw: BaseUrlGateway, upstream: FakeUpstream, token: str
) -> None:
    upstream.script.echo_credential = True  # upstreams echo keys in their answers
    client = sdk(base_gw.root, token)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-test",
        messages=[{"role": "user", "content": f"deploy with {GITHUB_EXAMPLE.text}"}],
    )
    answer = raw.parse()
    assert raw.headers.get(REQUEST_ID)
    text = answer.choices[0].message.content or ""
    assert "Hello from the fake model." in text
    assert UPSTREAM_KEY not in text and "[REDACTED:" in text

    stream = client.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": f"again {GITHUB_EXAMPLE.text}"}],
        stream=True,
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert "Hello" in streamed and UPSTREAM_KEY not in streamed

    # What left the gateway: the route's path, the injected key, no token, no secret.
    assert [got.path for got in upstream.received] == ["/v1/chat/completions"] * 2
    for got in upstream.received:
        assert got.header("authorization") == f"Bearer {UPSTREAM_KEY}"
        assert got.header("host") == f"127.0.0.1:{upstream.port}"
        wire = got.raw()
        assert token.encode() not in wire and GITHUB.encode() not in wire
        assert b"[REDACTED:github-token]" in wire

    # Recorded like a proxied flow, with its prefix; no secret in the recording or the log.
    flows = base_gw.flows("/v1/chat/completions", count=2)
    assert len(flows) == 2
    meta = flows[0].metadata["sluicegate"]
    assert meta["route"] == "openai" and meta["base_url"] == "/openai"
    assert meta["caller"]["subject"] == "agent-alice"
    assert meta["request_id"] == raw.headers[REQUEST_ID]
    assert "via openai (base URL /openai): allowed" in flows[0].comment  # what mitmweb shows
    recorded = base_gw.recorded_bytes()
    logs = base_gw.gw.settled_logs()
    for value in (token, UPSTREAM_KEY, GITHUB):
        assert value.encode() not in recorded
        assert value not in logs

    # A span per flow went to the OTLP collector, naming the route and decision, no secret.
    deadline = time.monotonic() + 20
    while len(base_gw.collector.spans) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    spans = {a["sluicegate.request_id"]: a for a in base_gw.collector.attributes()}
    first = spans[raw.headers[REQUEST_ID]]
    assert first["sluicegate.route"] == "openai" and first["sluicegate.decision"] == "allowed"
    assert first["sluicegate.base_url"] == "/openai"
    assert first["http.response.status_code"] == "200"
    exported = json.dumps(base_gw.collector.spans)
    for value in (token, UPSTREAM_KEY, GITHUB):
        assert value not in exported


def test_policy_and_a_plain_http_route_apply_too(
    base_gw: BaseUrlGateway, upstream: FakeUpstream, plain_upstream: FakeUpstream, token: str
) -> None:
    auth = {"authorization": f"Bearer {token}"}
    with httpx.Client(trust_env=False, timeout=20) as client:
        blocked = client.get(f"{base_gw.root}/openai/v1/files", headers=auth)
        echoed = client.post(
            f"{base_gw.root}/internal/echo?x=1", headers=auth, json={"note": GITHUB_EXAMPLE.text}
        )
        anthropic_style = client.post(
            f"{base_gw.root}/internal/echo", headers={"x-api-key": token}, json={}
        )
    assert blocked.status_code == 403 and blocked.json()["error"]["code"] == "policy_blocked"
    assert upstream.received == []  # blocked before it left
    assert echoed.status_code == 200, echoed.text
    seen = echoed.json()
    assert seen["path"] == "/echo?x=1"
    assert GITHUB not in seen["body"] and "[REDACTED:github-token]" in seen["body"]
    lowered = {k.lower(): v for k, v in seen["headers"].items()}
    assert "authorization" not in lowered  # an http route carries no credential, nor the token
    assert anthropic_style.status_code == 200
    assert "x-api-key" not in {k.lower() for k in anthropic_style.json()["headers"]}
    # Agents may speak TLS to the listener: it presents a certificate of the gateway CA.
    tls_root = base_gw.root.replace("http://", "https://")
    with httpx.Client(trust_env=False, timeout=20, verify=base_gw.gw.ssl_context()) as client:
        over_tls = client.get(f"{tls_root}/internal/echo", headers=auth)
        openai_over_tls = client.post(
            f"{tls_root}/openai/v1/chat/completions", headers=auth, json={"messages": []}
        )
    assert over_tls.status_code == 200 and over_tls.json()["path"] == "/echo"
    assert openai_over_tls.status_code == 200, openai_over_tls.text
    assert upstream.received[-1].header("authorization") == f"Bearer {UPSTREAM_KEY}"
    assert len(plain_upstream.received) == 3


def curl(*args: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    """(status, headers, JSON body) of one curl request, without any proxy."""
    no_proxy = [] if "-x" in args else ["--noproxy", "*"]
    done = subprocess.run(
        ["curl", "-sS", *no_proxy, "-D", "-", "--max-time", "20", *args],
        capture_output=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, json.loads(body)


REFUSALS = [
    ("/openai/v1/chat/completions", False, 401, "missing_token"),
    ("/nope/v1/chat/completions", True, 404, "base_url_unknown_prefix"),
    ("/", True, 404, "base_url_unknown_prefix"),
    ("/openaiX/v1/models", True, 404, "base_url_unknown_prefix"),
    ("/openai/../internal/echo", True, 400, "invalid_path"),
    ("/openai/%2e%2e/internal/echo", True, 400, "invalid_path"),
    ("/openai/v1/..%2Finternal", True, 400, "invalid_path"),
    ("/internal/%252e%252e/echo", True, 400, "invalid_path"),
    ("/openai//v1/models", True, 400, "invalid_path"),
    ("/openai/v1;x/models", True, 400, "invalid_path"),
]


def test_refusals_are_json_and_send_nothing(
    base_gw: BaseUrlGateway, upstream: FakeUpstream, plain_upstream: FakeUpstream, token: str
) -> None:
    for path, with_token, status, code in REFUSALS:
        args = ["--path-as-is", f"{base_gw.root}{path}"]
        if with_token:
            args = ["-H", f"Authorization: Bearer {token}", *args]
        got_status, headers, body = curl(*args)
        assert (got_status, body["error"]["code"]) == (status, code), (path, body)
        assert body["error"]["type"] == "sluicegate_error"
        assert headers[REQUEST_ID] == body["error"]["request_id"]
        if status == 401:
            assert headers["www-authenticate"].startswith("Bearer")
        assert token not in json.dumps(body)
    assert upstream.received == [] and plain_upstream.received == []


def test_a_bad_token_and_a_proxy_style_request(
    base_gw: BaseUrlGateway, upstream: FakeUpstream, token: str
) -> None:
    status, _, body = curl(
        "-H", f"Authorization: Bearer {token[:-4]}AAAA", f"{base_gw.root}/openai/v1/models"
    )
    assert status == 401 and body["error"]["code"] == "bad_signature"
    # The listener used as a proxy (absolute-form request): not what it is for.
    status, _, body = curl(
        "-x",
        base_gw.root,
        "-H",
        f"Authorization: Bearer {token}",
        f"http://127.0.0.1:{upstream.port}/v1/models",
    )
    assert status == 405 and body["error"]["code"] == "base_url_proxy_request"
    assert upstream.received == []
    assert token not in base_gw.gw.settled_logs()


def raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request written as is; the gateway closes after it."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def test_a_connect_request_is_a_proxy_style_request(
    base_gw: BaseUrlGateway, upstream: FakeUpstream, token: str
) -> None:
    """mitmproxy refuses CONNECT on a reverse-mode listener itself (no hook can answer it):
    the answer is still ours, 405 `base_url_proxy_request` in JSON with a logged request id."""
    for target in (f"127.0.0.1:{upstream.port}", "api.openai.com:443"):
        request = (
            f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
            f"Proxy-Authorization: Bearer {token}\r\n\r\n"
        ).encode()
        status, headers, raw = raw_exchange(base_gw.port, request)
        body = json.loads(raw)
        assert status == 405, raw
        assert body["error"]["code"] == "base_url_proxy_request"
        assert body["error"]["type"] == "sluicegate_error"
        assert "HTTPS_PROXY" in body["error"]["message"]
        assert headers[REQUEST_ID] == body["error"]["request_id"]
        assert headers["content-type"] == "application/json"
        assert body["error"]["request_id"] in base_gw.gw.settled_logs()
    assert upstream.received == []
    assert token not in base_gw.gw.settled_logs()


def test_a_port_in_use_stops_the_gateway_with_exit_3(base_config: dict, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = {**base_config, "base_url": {"listen_port": port, "prefixes": {"/o": "openai"}}}
        gw = Gateway(config, tmp_path / "busy", env={UPSTREAM_KEY_ENV: UPSTREAM_KEY})
        assert gw.run_to_exit() == 3
    assert f"base_url: cannot listen on 127.0.0.1:{port}" in gw.logs
    assert "address already in use" in gw.logs


# -- Node's openai SDK: Node before 24 ignores HTTPS_PROXY, which is what base-URL mode is for ----

NODE_AGENT = r"""
const OpenAI = require('openai');
const client = new OpenAI({maxRetries: 0});  // OPENAI_BASE_URL and OPENAI_API_KEY from the env
(async () => {
  const {data, response} = await client.chat.completions.create({
    model: 'gpt-test', messages: [{role: 'user', content: process.argv[2]}],
  }).withResponse();
  const stream = await client.chat.completions.create({
    model: 'gpt-test', messages: [{role: 'user', content: 'stream please'}], stream: true,
  });
  let streamed = '';
  for await (const chunk of stream) {
    streamed += (chunk.choices[0] && chunk.choices[0].delta.content) || '';
  }
  process.stdout.write(JSON.stringify({
    text: data.choices[0].message.content, streamed,
    requestId: response.headers.get('x-sluicegate-request-id'),
  }));
})().catch((err) => { process.stdout.write(JSON.stringify({error: String(err)})); });
"""


@pytest.fixture(scope="session")
def node_openai(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with Node's official openai SDK installed (npm), or the test is skipped."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not on this machine")
    directory = tmp_path_factory.mktemp("node-openai")
    done = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--silent", "openai@4"],
        cwd=directory,
        capture_output=True,
        timeout=300,
    )
    if done.returncode != 0:
        pytest.skip(f"npm could not install the openai SDK: {done.stderr[-500:]!r}")
    return directory


def test_the_node_openai_sdk_through_the_base_url(
    base_gw: BaseUrlGateway, upstream: FakeUpstream, token: str, node_openai: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(
        OPENAI_BASE_URL=f"{base_gw.root}/openai/v1",
        OPENAI_API_KEY=token,
        NODE_PATH=str(node_openai / "node_modules"),
    )
    done = subprocess.run(
        ["node", "-e", NODE_AGENT, f"my token {GITHUB_EXAMPLE.text}"],
        cwd=node_openai,
        env=env,
        capture_output=True,
        timeout=60,
    )
    result = json.loads(done.stdout or b"{}")
    assert "error" not in result and done.returncode == 0, (result, done.stderr)
    assert result["text"] == "Hello from the fake model." and result["requestId"]
    assert "Hello" in result["streamed"]
    assert [got.path for got in upstream.received] == ["/v1/chat/completions"] * 2
    for got in upstream.received:
        assert got.header("authorization") == f"Bearer {UPSTREAM_KEY}"
        assert token.encode() not in got.raw() and GITHUB.encode() not in got.raw()


# -- doctor, in an agent environment that only has the base URL -----------------------------------


def doctor(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sluicegate", "doctor", "--timeout", "5"],
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO / "addons"), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_doctor_checks_the_base_url(
    base_gw: BaseUrlGateway, plain_upstream: FakeUpstream, token: str
) -> None:
    good = doctor({"OPENAI_BASE_URL": f"{base_gw.root}/openai/v1", "OPENAI_API_KEY": token})
    assert good.returncode == 0, good.stdout + good.stderr
    assert "PASS  base-url:OPENAI_BASE_URL" in good.stdout
    assert token not in good.stdout + good.stderr
    # A prefix the gateway does not know, and an SDK pointed straight at an API (here: the
    # plain upstream itself), which bypasses the gateway.
    bad = doctor(
        {
            "OPENAI_BASE_URL": f"{base_gw.root}/nope/v1",
            "OPENAI_API_KEY": token,
            "ANTHROPIC_BASE_URL": plain_upstream.base_url,
            "ANTHROPIC_API_KEY": token,
        }
    )
    assert bad.returncode == 1
    lines = bad.stdout.splitlines()
    openai_line = next(line for line in lines if "base-url:OPENAI_BASE_URL" in line)
    assert openai_line.startswith("FAIL") and "no such prefix" in openai_line
    anthropic_line = next(line for line in lines if "base-url:ANTHROPIC_BASE_URL" in line)
    assert anthropic_line.startswith("FAIL") and "bypasses it" in anthropic_line
    # No token in the placeholder's place: the gateway says so, and doctor names the fix.
    placeholder = doctor(
        {"OPENAI_BASE_URL": f"{base_gw.root}/openai/v1", "OPENAI_API_KEY": "sk-placeholder-x"}
    )
    assert placeholder.returncode == 1 and "rejected the API key as a token" in placeholder.stdout
    for done in (bad, placeholder):
        assert token not in done.stdout + done.stderr


def test_a_script_reload_keeps_the_listener(
    start_gateway, tmp_path: Path, plain_upstream: FakeUpstream, token: str
) -> None:
    script = tmp_path / "gateway.py"
    shutil.copy(REPO / "addons" / "gateway.py", script)

    def edit(cfg: dict) -> None:
        cfg["base_url"] = {"listen_port": 0, "prefixes": {"/internal": "internal"}}

    gw = start_gateway(edit, script=script)
    root = f"http://127.0.0.1:{base_url_port(gw)}"

    def get() -> httpx.Response:
        with httpx.Client(trust_env=False, timeout=20) as client:
            return client.get(f"{root}/internal/echo", headers={"authorization": f"Bearer {token}"})

    assert get().status_code == 200
    script.write_text(script.read_text() + "\n# touched\n")
    deadline = time.monotonic() + 20
    while gw.logs.count("Loading script") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    assert gw.logs.count("Loading script") >= 2
    assert get().status_code == 200
    assert "Async handler" not in gw.logs and "Traceback" not in gw.logs
    assert len(plain_upstream.received) == 2
