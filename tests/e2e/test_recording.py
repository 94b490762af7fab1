"""Recording through the running gateway: stock mitmproxy tools open it, nothing secret is in it,
tampering is found, a crash loses nothing that was answered, and recording failures fail closed.

Auth, injection, redaction and streaming are played by `tests/support/recording_contracts.py`
(their flowstate contracts) until those addons are on main.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mitmproxy import io

from sluicegate.recording import chain, sealing
from tests.conftest import UPSTREAM_KEY, UPSTREAM_KEY_ENV
from tests.support.gateway import MITMDUMP, REPO, Gateway
from tests.support.pki import TestCA
from tests.support.tokens import TestIdP
from tests.support.upstream import FakeUpstream

CONTRACTS = REPO / "tests" / "support" / "recording_contracts.py"
CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi, my pw is hunter2"}]}


@dataclasses.dataclass
class Keys:
    signing: Path
    signing_public: Path
    auditor_private: Path
    auditor_public: Path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("keys")
    for kind, name in (("signing", "signing.pem"), ("seal", "auditor.pem")):
        assert sessions_cli("keygen", kind, str(d / name)).returncode == 0
    return Keys(d / "signing.pem", d / "signing.pem.pub", d / "auditor.pem", d / "auditor.pem.pub")


def recording_config(base: dict, directory: Path, keys: Keys, **extra: Any) -> dict:
    cfg = copy.deepcopy(base)
    cfg["recording"] = {
        "directory": str(directory),
        "signing_key": {"file": str(keys.signing)},
        "seal_to": str(keys.auditor_public),
        **extra,
    }
    return cfg


def start(workdir: Path, config: dict, pki: TestCA, *, contracts: bool = True) -> Gateway:
    extra = ("-s", str(CONTRACTS)) if contracts else ()
    return Gateway(
        config,
        workdir,
        upstream_ca=pki.cert_file,
        extra_args=extra,
        env={UPSTREAM_KEY_ENV: UPSTREAM_KEY},
    ).start()


def sessions_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sluicegate", "sessions", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "addons")},
        timeout=60,
    )


def read_flows(path: Path) -> list[Any]:
    with path.open("rb") as f:
        return list(io.FlowReader(f).stream())


# -- one recorded session, shared ----------------------------------------------------------------


@dataclasses.dataclass
class Recorded:
    directory: Path
    audit: Path
    token: str
    stream_body: bytes
    chat_answer: dict
    logs: str
    exit_code: int | None

    def sessions(self) -> list[Path]:
        return sorted(self.directory.glob("*/*.mitm"))

    def flows(self) -> list[Any]:
        return [f for s in self.sessions() for f in read_flows(s)]

    def every_byte(self) -> bytes:
        files = [*self.directory.rglob("*"), self.audit]
        return b"".join(p.read_bytes() for p in files if p.is_file())


@pytest.fixture(scope="module")
def recorded(
    tmp_path_factory: pytest.TempPathFactory,
    base_config: dict,
    pki: TestCA,
    keys: Keys,
    idp: TestIdP,
    upstream: FakeUpstream,
    plain_upstream: FakeUpstream,
) -> Iterator[Recorded]:
    """Drive varied traffic through a recording gateway, then stop it with SIGTERM."""
    work = tmp_path_factory.mktemp("recorded")
    audit = work / "audit" / "audit.jsonl"
    cfg = recording_config(base_config, work / "recordings", keys, audit_log=str(audit))
    gw = start(work / "gw", cfg, pki)
    token = idp.mint("alice@example.com", ["agents"])
    upstream.reset()
    try:
        with gw.client(token) as client:
            upstream.script.text = "The answer is 42."
            chat = client.post(upstream.url("/v1/chat/completions"), json=CHAT)
            assert chat.status_code == 200, chat.text
            upstream.script.echo_credential = True
            assert client.post(upstream.url("/v1/chat/completions"), json=CHAT).status_code == 200
            upstream.script.echo_credential = False
            echoed = client.get(upstream.url("/echo?q=1"))
            # The upstream saw the key; Redaction masked it before the agent saw the echo.
            assert UPSTREAM_KEY not in echoed.text
            assert "[REDACTED:key-authorization]" in echoed.text
            with client.stream(
                "POST", upstream.url("/v1/chat/completions"), json={**CHAT, "stream": True}
            ) as streamed:
                stream_body = streamed.read()
            assert b"data: [DONE]" in stream_body
        with gw.client() as client:
            inner = client.get(
                upstream.url("/echo?inner=1"), headers={"authorization": f"Bearer {token}"}
            )
            assert inner.status_code == 200
        with gw.client(token) as client:
            assert client.get(plain_upstream.url("/echo?plain=1")).status_code == 200
        with pytest.raises(httpx.ProxyError, match="407"):
            httpx.get(upstream.url("/echo"), proxy=gw.proxy_url("x", user="refuse"))
    finally:
        code = gw.stop(signal.SIGTERM)
    directory = Path(cfg["recording"]["directory"])
    yield Recorded(directory, audit, token, stream_body, chat.json(), gw.logs, code)


def test_sessions_load_in_flowreader_with_every_flow(recorded: Recorded) -> None:
    flows = recorded.flows()
    paths = sorted(f.request.path for f in flows)
    assert paths == sorted(
        [
            "/v1/chat/completions",
            "/v1/chat/completions",
            "/v1/chat/completions",
            "/echo?q=1",
            "/echo?inner=1",
            "/echo?plain=1",
            "",  # the CONNECT refused with 407 (authority form: no path)
        ]
    ), paths
    by_identity = {s.parent.name.split("-")[0] for s in recorded.sessions()}
    assert by_identity == {"alice@example.com", "anonymous"}


def test_refused_connect_is_recorded_as_anonymous(recorded: Recorded) -> None:
    refused = [f for f in recorded.flows() if f.response and f.response.status_code == 407]
    assert len(refused) == 1
    sg = refused[0].metadata["sluicegate"]
    assert sg["refusal"]["code"] == "malformed"  # CallerAuth: the proxy password `x` is no JWT
    assert sg["recording"]["event"] == "http_connect_error"
    assert "caller" not in sg


def test_recorded_request_is_what_left_with_the_credential_marked(recorded: Recorded) -> None:
    chats = [f for f in recorded.flows() if f.request.path == "/v1/chat/completions"]
    for flow in chats:
        assert flow.request.headers["authorization"] == "Bearer [credential:openai]"
        assert "proxy-authorization" not in flow.request.headers
        assert flow.metadata["sluicegate"]["caller"]["subject"] == "alice@example.com"
        assert flow.metadata["sluicegate"]["route"] == "openai"
        assert "hunter2" not in flow.request.text
    echo = next(f for f in recorded.flows() if f.request.path == "/echo?q=1")
    assert "[REDACTED:key-authorization]" in echo.response.text  # as the agent saw it


def test_streamed_sse_is_recorded_as_the_client_received_it(recorded: Recorded) -> None:
    (streamed,) = [
        f
        for f in recorded.flows()
        if f.response and "text/event-stream" in f.response.headers.get("content-type", "")
    ]
    assert streamed.response.raw_content == recorded.stream_body


def test_no_secret_in_any_byte_written(recorded: Recorded) -> None:
    data = recorded.every_byte()
    assert data, "nothing was recorded"
    for secret in (UPSTREAM_KEY, recorded.token, "hunter2"):
        assert secret.encode() not in data
    assert b"[credential:openai]" in data


def test_sigterm_seals_every_session_with_a_verifiable_signature(
    recorded: Recorded, keys: Keys
) -> None:
    assert recorded.exit_code == 0, recorded.logs[-2000:]
    out = sessions_cli(
        "verify", "--dir", str(recorded.directory), "--public-key", str(keys.signing_public)
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("OK ") == len(recorded.sessions()) == 2


def test_audit_log_has_one_line_per_flow(recorded: Recorded) -> None:
    lines = [json.loads(line) for line in recorded.audit.read_text().splitlines()]
    assert len(lines) == len(recorded.flows())
    chat = next(line for line in lines if line["path"] == "/v1/chat/completions")
    assert chat["identity"] == "alice@example.com"
    assert chat["route"] == "openai" and chat["status"] == 200
    assert chat["rules"] == {"password": 1} and chat["decision"] == "allowed"
    assert chat["session"].endswith(".mitm") and chat["duration_ms"] > 0
    refused = next(line for line in lines if line["status"] == 407)
    assert refused["identity"] == "anonymous" and refused["decision"] == "refused"


def test_mitmdump_prints_the_recording(recorded: Recorded, tmp_path: Path) -> None:
    for session in recorded.sessions():
        out = subprocess.run(
            [str(MITMDUMP), "-n", "-r", str(session), "--set", f"confdir={tmp_path}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        for flow in read_flows(session):
            assert flow.request.path.split("?")[0] in out.stdout


def test_server_replay_serves_the_recorded_responses(
    recorded: Recorded, tmp_path: Path, upstream: FakeUpstream
) -> None:
    (alice,) = [s for s in recorded.sessions() if s.parent.name.startswith("alice")]
    replay = Gateway(None, tmp_path)
    replay.args = [
        str(MITMDUMP),
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        "0",
        "--set",
        f"confdir={replay.confdir}",
        "--server-replay",
        str(alice),
        "--set",
        "server_replay_extra=kill",
        "--set",
        "connection_strategy=lazy",
    ]
    replay.start()
    try:
        with replay.client() as client:
            upstream.script.text = "something new"
            redacted = {
                **CHAT,
                "messages": [{"role": "user", "content": "hi, my pw is [REDACTED:password]"}],
            }
            answer = client.post(upstream.url("/v1/chat/completions"), json=redacted)
    finally:
        replay.stop()
    assert answer.status_code == 200
    assert answer.json() == recorded.chat_answer
    assert upstream.received == []


def test_client_replay_resends_the_recorded_requests_without_secrets(
    recorded: Recorded, tmp_path: Path, pki: TestCA, upstream: FakeUpstream
) -> None:
    (alice,) = [s for s in recorded.sessions() if s.parent.name.startswith("alice")]
    out = subprocess.run(
        [
            str(MITMDUMP),
            "-n",
            "--client-replay",
            str(alice),
            "--set",
            f"confdir={tmp_path}",
            "--set",
            f"ssl_verify_upstream_trusted_ca={pki.cert_file}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    chats = [r for r in upstream.received if r.path == "/v1/chat/completions"]
    assert len(chats) == 3
    for got in chats:
        assert got.header("authorization") == "Bearer [credential:openai]"
        assert "[REDACTED:password]" in got.body.decode()
        assert UPSTREAM_KEY.encode() not in got.raw()


def test_mitmweb_shows_who_did_what_in_every_recorded_flow(recorded: Recorded) -> None:
    """Stock mitmweb shows a flow's comment and mark: caller, route, decision, the refusal and
    redaction counts are there, refusals are marked, and no value is."""
    flows = recorded.flows()
    assert flows and all(f.comment.startswith("sluicegate: ") for f in flows)
    for flow in flows:
        assert flow.metadata["sluicegate"]["request_id"] in flow.comment
        assert recorded.token not in flow.comment and UPSTREAM_KEY not in flow.comment
    chat = next(f for f in flows if f.request.path == "/v1/chat/completions")
    assert chat.comment.startswith("sluicegate: alice@example.com (agents) via openai: allowed")
    assert "redacted in request: " in chat.comment and "password x1" in chat.comment
    assert chat.marked == ""
    (refused,) = [f for f in flows if f.response and f.response.status_code == 407]
    assert refused.marked == ":no_entry:"
    assert "anonymous via no route: refused; 407 malformed" in refused.comment


def test_cli_flows_print_the_refusal_reason_and_iso_times(recorded: Recorded) -> None:
    out = sessions_cli("flows", "--dir", str(recorded.directory), "--decision", "refused").stdout
    lines = out.splitlines()
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ", lines[1]), lines
    assert "reason: malformed" in out
    rows = sessions_cli("flows", "--dir", str(recorded.directory), "--json").stdout.splitlines()
    reasons = {json.loads(r)["reason"] for r in rows}
    assert None in reasons and any(r and r.startswith("malformed") for r in reasons)


def test_cli_lists_filters_shows_and_unseals(recorded: Recorded, keys: Keys) -> None:
    d = str(recorded.directory)
    listing = sessions_cli("list", "--dir", d, "--json")
    rows = [json.loads(line) for line in listing.stdout.splitlines()]
    assert {r["identity"] for r in rows} == {"alice@example.com", "anonymous"}
    assert all(r["sealed"] == "shutdown" for r in rows)

    found = sessions_cli("flows", "--dir", d, "--rule", "pass*", "--json")
    matches = [json.loads(line) for line in found.stdout.splitlines()]
    assert len(matches) == 3 and {m["path"] for m in matches} == {"/v1/chat/completions"}
    refused = sessions_cli("flows", "--dir", d, "--decision", "refused", "--json")
    assert [json.loads(x)["status"] for x in refused.stdout.splitlines()] == [407]
    hosts = sessions_cli("flows", "--dir", d, "--identity", "alice*", "--since", "1h")
    assert hosts.returncode == 0 and "/echo?plain=1" in hosts.stdout

    flow_id = matches[0]["flow_id"]
    shown = sessions_cli("show", flow_id[:12], "--dir", d, "--bodies")
    assert shown.returncode == 0 and "[REDACTED:password]" in shown.stdout
    assert "Bearer [credential:openai]" in shown.stdout

    unsealed = sessions_cli(
        "unseal",
        flow_id,
        "--dir",
        d,
        "--private-key",
        str(keys.auditor_private),
        "--part",
        "request",
    )
    assert unsealed.returncode == 0, unsealed.stderr
    assert json.loads(unsealed.stdout)["messages"][0]["content"] == "hi, my pw is hunter2"
    other = recorded.directory.parent / "other-auditor.pem"
    other.write_bytes(sealing.generate_keypair()[0])
    refused_key = sessions_cli("unseal", flow_id, "--dir", d, "--private-key", str(other))
    assert refused_key.returncode != 0 and "hunter2" not in refused_key.stdout


# -- tampering -------------------------------------------------------------------------------------


def tampered_copy(recorded: Recorded, tmp_path: Path) -> tuple[Path, list[tuple[int, int]], bytes]:
    (alice,) = [s for s in recorded.sessions() if s.parent.name.startswith("alice")]
    target = tmp_path / "copy" / alice.name
    target.parent.mkdir()
    shutil.copy(alice, target)
    shutil.copy(Path(str(alice) + ".chain"), Path(str(target) + ".chain"))
    data = target.read_bytes()
    spans, broken = chain.split_records(data)
    assert broken is None and len(spans) >= 4
    return target, spans, data


def verify_cli(path: Path, keys: Keys) -> subprocess.CompletedProcess[str]:
    return sessions_cli("verify", str(path), "--public-key", str(keys.signing_public))


def flow_ids(path: Path) -> list[str]:
    return [f.id for f in read_flows(path)]


def test_verify_finds_an_edited_byte(recorded: Recorded, tmp_path: Path, keys: Keys) -> None:
    path, spans, data = tampered_copy(recorded, tmp_path)
    ids = flow_ids(path)
    (i,) = [i for i, (o, n) in enumerate(spans) if b"/echo?q=1" in data[o : o + n]]
    offset, length = spans[i]
    edited = data[offset : offset + length].replace(b"/echo?q=1", b"/echo?q=2")
    path.write_bytes(data[:offset] + edited + data[offset + length :])
    assert len(flow_ids(path)) == len(ids)  # still loads: a quiet edit
    out = verify_cli(path, keys)
    assert out.returncode == 1
    assert f"modified: flow #{i} id {ids[i]}" in out.stdout


def test_verify_finds_a_dropped_flow(recorded: Recorded, tmp_path: Path, keys: Keys) -> None:
    path, spans, data = tampered_copy(recorded, tmp_path)
    ids = flow_ids(path)
    offset, length = spans[1]
    path.write_bytes(data[:offset] + data[offset + length :])
    out = verify_cli(path, keys)
    assert out.returncode == 1
    assert f"removed: flow #1 id {ids[1]}" in out.stdout


def test_verify_finds_swapped_flows(recorded: Recorded, tmp_path: Path, keys: Keys) -> None:
    path, spans, data = tampered_copy(recorded, tmp_path)
    ids = flow_ids(path)
    (o1, n1), (o2, n2) = spans[1], spans[2]
    path.write_bytes(data[:o1] + data[o2 : o2 + n2] + data[o1 : o1 + n1] + data[o2 + n2 :])
    assert flow_ids(path) == [ids[0], ids[2], ids[1], *ids[3:]]  # still loads: only reordered
    out = verify_cli(path, keys)
    assert out.returncode == 1
    assert "moved" in out.stdout and (ids[1] in out.stdout or ids[2] in out.stdout)


# -- crashes and failures ----------------------------------------------------------------------


def test_sigkill_under_load_keeps_every_answered_flow(
    tmp_path: Path,
    base_config: dict,
    pki: TestCA,
    keys: Keys,
    idp: TestIdP,
    upstream: FakeUpstream,
    plain_upstream: FakeUpstream,
) -> None:
    cfg = recording_config(base_config, tmp_path / "rec", keys)
    gw = start(tmp_path / "gw", cfg, pki)
    token = idp.mint("loader", ["agents"])
    answered: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    started = threading.Barrier(101)

    def worker() -> None:
        with httpx.Client(proxy=gw.proxy_url(token), timeout=10) as client:
            started.wait()
            while not stop.is_set():
                marker = uuid.uuid4().hex
                try:
                    r = client.post(plain_upstream.url(f"/echo?m={marker}"), content=b"x" * 512)
                except httpx.HTTPError:
                    return
                if r.status_code == 200 and marker in r.text:
                    with lock:
                        answered.append(marker)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(100)]
    for t in threads:
        t.start()
    started.wait()
    deadline = time.monotonic() + 20
    while len(answered) < 300 and time.monotonic() < deadline:
        time.sleep(0.05)
    gw.stop(signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join(timeout=15)
    with lock:
        done = set(answered)
    assert len(done) >= 100, f"only {len(done)} flows answered before the kill"

    recorded = set()
    for session in Path(cfg["recording"]["directory"]).glob("*/*.mitm"):
        for flow in read_flows(session):
            m = re.search(r"m=([0-9a-f]{32})", flow.request.path)
            if m:
                recorded.add(m.group(1))
        out = verify_cli(session, keys)
        assert out.returncode == 3, out.stdout  # consistent, just not sealed
    missing = done - recorded
    assert not missing, f"{len(missing)} of {len(done)} answered flows are not in the recording"


def test_recording_failure_refuses_before_forwarding_until_it_works_again(
    tmp_path: Path,
    base_config: dict,
    pki: TestCA,
    keys: Keys,
    token: str,
    plain_upstream: FakeUpstream,
) -> None:
    directory = tmp_path / "rec"
    gw = start(tmp_path / "gw", recording_config(base_config, directory, keys), pki)
    try:
        with gw.client(token) as client:
            assert client.get(plain_upstream.url("/echo?before")).status_code == 200
            shutil.rmtree(directory)
            directory.write_text("not a directory any more")
            refused = client.get(plain_upstream.url("/echo?during"))
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "recording_unavailable"
            assert [r.path for r in plain_upstream.received] == ["/echo?before"]
            directory.unlink()
            directory.mkdir()
            deadline = time.monotonic() + 5  # a probe write clears the failure (twice a second)
            while client.get(plain_upstream.url("/echo?after")).status_code != 200:
                assert time.monotonic() < deadline, "recording did not recover"
                time.sleep(0.1)
    finally:
        gw.stop()
    assert [r.path for r in plain_upstream.received] == ["/echo?before", "/echo?after"]
    recorded = [
        (f.request.path, f.response.status_code)
        for session in directory.glob("*/*.mitm")
        for f in read_flows(session)
    ]
    assert ("/echo?after", 200) in recorded
    # The refusals while recovering are recorded too, once writing worked again.
    assert all(status == 503 for path, status in recorded if path != "/echo?after")
    assert "recording_unavailable" in gw.logs


def test_recording_can_be_disabled_but_says_so(
    tmp_path: Path, base_config: dict, pki: TestCA, token: str, plain_upstream: FakeUpstream
) -> None:
    gw = start(tmp_path / "gw", base_config, pki, contracts=False)
    try:
        with gw.client(token) as client:
            assert client.get(plain_upstream.url("/echo")).status_code == 200
    finally:
        gw.stop()
    assert "flows are NOT recorded" in gw.logs
