"""The Recorder addon on mitmproxy test flows: what is stored, what never is, failing closed."""

from __future__ import annotations

import base64
import dataclasses
import errno
import gzip
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from mitmproxy import http, io
from mitmproxy.test import taddons, tflow

from sluicegate.mitm import flowstate
from sluicegate.mitm.recorder import Recorder
from sluicegate.mitm.snapshot import seal_context
from sluicegate.recording import chain, sealing
from sluicegate.recording import store as store_mod
from tests.support.tokens import TestIdP

KEY = "sk-proj-INJECTEDsecret0123456789abcdef"
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.CALLERtokenSIGNATURE"
REDACTED_ORIGINAL = "my password is hunter2-original"


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> TestIdP:
    return TestIdP(tmp_path_factory.mktemp("idp"))


class Env:
    """A configured Recorder in a mitmproxy test context."""

    def __init__(self, tmp: Path, idp: TestIdP) -> None:
        self.tmp = tmp
        self.dir = tmp / "recordings"
        self.signer = chain.Signer.generate()
        self.key_file = tmp / "signing.pem"
        self.key_file.write_bytes(self.signer.private_pem())
        private_pem, public_pem = sealing.generate_keypair()
        self.auditor_private = sealing.load_private_key(private_pem)
        self.auditor_public_file = tmp / "auditor.pub.pem"
        self.auditor_public_file.write_bytes(public_pem)
        self.idp = idp
        self.addon = Recorder()
        self._n = 0

    def configure(self, tctx: taddons.context, **recording: Any) -> None:
        self._n += 1
        section = {"directory": str(self.dir), "signing_key": {"file": str(self.key_file)}}
        section.update(recording)
        path = self.tmp / f"config{self._n}.yaml"
        config = {"version": 1, "auth": self.idp.auth_config(), "recording": section}
        path.write_text(yaml.safe_dump(config))
        tctx.configure(self.addon, sluicegate_config=str(path))
        assert self.addon.config is not None, "recorder did not configure"

    def sessions(self) -> list[Path]:
        return sorted(self.dir.glob("*/*.mitm"))

    def flows(self) -> list[http.HTTPFlow]:
        out = []
        for path in self.sessions():
            with path.open("rb") as f:
                out += list(io.FlowReader(f).stream())
        return out

    def audit(self) -> list[dict[str, Any]]:
        path = self.dir / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def all_bytes(self) -> bytes:
        return b"".join(p.read_bytes() for p in sorted(self.dir.rglob("*")) if p.is_file())


@pytest.fixture
def env(tmp_path: Path, idp: TestIdP) -> Iterator[tuple[Env, taddons.context]]:
    e = Env(tmp_path, idp)
    with taddons.context(e.addon) as tctx:
        e.configure(tctx)
        yield e, tctx


def authenticated_flow(**kw: Any) -> http.HTTPFlow:
    """A finished flow as the chain leaves it: caller, route, credential to scrub, facts."""
    f = tflow.tflow(resp=True, **kw)
    st = flowstate.state(f)
    st.caller = flowstate.Caller(
        subject="alice@example.com",
        groups=("agents", "admins"),
        issuer="https://idp.test",
        token_id="jti-1",
        fingerprint="fp1234",
    )
    st.route = "openai"
    st.scrub = [
        flowstate.ScrubLiteral("injected-credential:openai", KEY),
        flowstate.ScrubLiteral(
            "injected-credential:openai", base64.b64encode(KEY.encode()).decode()
        ),
        flowstate.ScrubLiteral("caller-token:fp1234", TOKEN),
    ]
    return f


def run(addon: Recorder, f: http.HTTPFlow, hook: str = "response") -> None:
    addon.requestheaders(f)
    getattr(addon, hook)(f)


# -- what is stored -------------------------------------------------------------------------


def test_flow_with_every_metadata_field_is_saved_and_loads(env) -> None:
    e, _ = env
    f = authenticated_flow()
    flowstate.record(f, "caller", flowstate.state(f).caller.as_metadata())
    flowstate.record(f, "route", "openai")
    flowstate.record(f, "redaction", {"request": {"aws-key": 2}, "response": {"email": 1}})
    flowstate.record(
        f,
        "policy",
        {
            "decision": "approved",
            "rule": "hold-deletes",
            "rules": {"hold-deletes": 1},
            "approver": "bob@example.com",
            "decided_at": 1700000000.5,
            "held_seconds": 12.25,
        },
    )
    flowstate.record(f, "timings", {"auth_ms": 0.4})
    live_before = f.get_state()
    run(e.addon, f)
    assert f.get_state() == live_before, "the live flow must not change"

    (saved,) = e.flows()
    assert saved.id == f.id
    sg = saved.metadata["sluicegate"]
    assert sg["caller"]["subject"] == "alice@example.com"
    assert sg["caller"]["groups"] == ["agents", "admins"]
    assert sg["caller"]["token_id"] == "jti-1"
    assert sg["route"] == "openai"
    assert sg["redaction"]["request"] == {"aws-key": 2}
    assert sg["policy"]["approver"] == "bob@example.com"
    assert sg["timings"]["auth_ms"] == 0.4 and "total_ms" in sg["timings"]
    assert sg["gateway"]["version"] and sg["gateway"]["mitmproxy"]
    assert sg["recording"] == {
        "event": "response",
        "recorded_at": sg["recording"]["recorded_at"],
        "notes": [],
        "errors": [],
    }
    (line,) = e.audit()
    assert line["identity"] == "alice@example.com"
    assert line["decision"] == "approved"
    assert line["rules"] == {"aws-key": 2, "email": 1, "hold-deletes": 1}
    assert line["status"] == 200 and line["method"] == "GET" and line["host"] == "address"
    assert line["session"] == str(e.sessions()[0].relative_to(e.dir)) and line["index"] == 0


def test_non_plain_metadata_is_caught_loudly_and_the_flow_still_saved(env, caplog) -> None:
    e, _ = env
    f = authenticated_flow()
    f.metadata["third-party"] = {"tags": {"a", "b"}, "ok": 1}
    with caplog.at_level(logging.ERROR, logger="sluicegate.recorder"):
        run(e.addon, f)
    (saved,) = e.flows()
    assert saved.metadata["third-party"] == {"tags": "<unserializable:set>", "ok": 1}
    assert saved.metadata["sluicegate"]["recording"]["errors"] == [
        "metadata.third-party.tags: set cannot be saved"
    ]
    assert "third-party.tags: set cannot be saved" in caplog.text
    assert f.metadata["third-party"]["tags"] == {"a", "b"}  # live flow untouched


def test_secrets_never_reach_any_file(env) -> None:
    e, _ = env
    f = authenticated_flow()
    f.request.path = f"/v1/x?key={KEY}"
    f.request.headers["authorization"] = f"Bearer {KEY}"
    f.request.headers["proxy-authorization"] = (
        "Basic " + base64.b64encode(f"agent:{TOKEN}".encode()).decode()
    )
    f.request.headers["x-api-key"] = "agent-own-key-123"
    f.request.content = json.dumps({"echo": TOKEN}).encode()
    f.response.headers["content-encoding"] = "gzip"
    f.response.raw_content = gzip.compress(
        f"Incorrect API key provided: {KEY}. b64={base64.b64encode(KEY.encode()).decode()}".encode()
    )
    f.response.trailers = http.Headers(x_debug=KEY)
    f.comment = f"note {KEY}"
    # mitmproxy keeps an earlier state when a flow is edited or replayed: it may predate redaction.
    f.request.headers["x-before-redaction"] = "still-secret-original"
    f.backup()
    del f.request.headers["x-before-redaction"]
    run(e.addon, f)
    assert b"still-secret-original" not in e.all_bytes()

    data = e.all_bytes()
    for secret in (KEY, TOKEN, base64.b64encode(KEY.encode()).decode(), "agent-own-key-123"):
        assert secret.encode() not in data
    (saved,) = e.flows()
    assert saved.request.headers["authorization"] == "Bearer [credential:openai]"
    assert "proxy-authorization" not in saved.request.headers
    assert saved.request.headers["x-api-key"] == "[masked]"
    assert saved.request.path == "/v1/x?key=[credential:openai]"
    assert saved.request.json() == {"echo": "[caller-token:fp1234]"}
    assert "content-encoding" not in saved.response.headers  # stored decoded, greppable
    assert saved.response.text.startswith("Incorrect API key provided: [credential:openai].")
    assert int(saved.response.headers["content-length"]) == len(saved.response.raw_content)
    assert saved.response.trailers["x-debug"] == "[credential:openai]"


def test_flows_of_one_connection_record_its_current_state(env) -> None:
    """Connection states are reused between flows only while the connection is unchanged."""
    e, _ = env
    first = authenticated_flow()
    client, server = first.client_conn, first.server_conn
    expected = []

    def record(flow: http.HTTPFlow) -> None:
        run(e.addon, flow)
        expected.append((client.get_state(), server.get_state()))

    record(first)
    record(authenticated_flow(client_conn=client, server_conn=server))
    client.alpn_offers.append(b"h2")  # a list changed in place counts too
    record(authenticated_flow(client_conn=client, server_conn=server))
    client.sni = "changed.example"
    server.timestamp_end = server.timestamp_start + 5
    record(authenticated_flow(client_conn=client, server_conn=server))
    saved = e.flows()
    assert len(saved) == 4
    for (client_state, server_state), stored in zip(expected, saved, strict=True):
        assert stored.client_conn.get_state() == client_state
        assert stored.server_conn.get_state() == server_state
    assert [f.client_conn.alpn_offers for f in saved] == [[], [], [b"h2"], [b"h2"]]
    assert saved[2].client_conn.sni != "changed.example" == saved[3].client_conn.sni
    assert saved[3].server_conn.timestamp_end == server.timestamp_end


def test_a_secret_in_a_known_connection_state_is_still_scrubbed(env) -> None:
    e, _ = env
    first = authenticated_flow()
    run(e.addon, first)
    first.client_conn.sni = f"{KEY}.example"
    second = authenticated_flow(client_conn=first.client_conn, server_conn=first.server_conn)
    run(e.addon, second)
    third = authenticated_flow(client_conn=first.client_conn, server_conn=first.server_conn)
    run(e.addon, third)  # the connection's state (with the key) is a known encoding now
    assert KEY.encode() not in e.all_bytes()
    assert [f.client_conn.sni for f in e.flows()[1:]] == ["[credential:openai].example"] * 2


def test_marker_restored_by_injection_is_kept(env) -> None:
    e, _ = env
    f = authenticated_flow()
    f.request.headers["authorization"] = "Bearer [credential:openai]"
    run(e.addon, f)
    assert e.flows()[0].request.headers["authorization"] == "Bearer [credential:openai]"


def test_streamed_body_is_recorded_as_the_client_received_it(env) -> None:
    e, _ = env
    f = authenticated_flow()
    f.response.headers["content-type"] = "text/event-stream"
    f.response.raw_content = None  # mitmproxy keeps no body for streamed responses
    streamed = b'data: {"delta": "Hel"}\n\ndata: {"delta": "lo [REDACTED:email]"}\n\n'
    flowstate.state(f).streamed_body = bytearray(streamed)
    run(e.addon, f)
    assert e.flows()[0].response.raw_content == streamed


def test_stream_without_captured_body_is_noted(env) -> None:
    e, _ = env
    f = authenticated_flow()
    f.response.raw_content = None
    run(e.addon, f)
    (saved,) = e.flows()
    assert saved.response.raw_content == b""
    assert saved.metadata["sluicegate"]["recording"]["notes"] == ["response_body_not_captured"]


def test_undecodable_body_is_dropped_not_stored_raw(env) -> None:
    e, _ = env
    f = authenticated_flow()
    f.response.headers["content-encoding"] = "gzip"
    f.response.raw_content = b"not gzip " + KEY.encode()
    run(e.addon, f)
    (saved,) = e.flows()
    assert saved.response.raw_content == b""
    assert "response_body_dropped_undecodable" in saved.metadata["sluicegate"]["recording"]["notes"]


def test_anonymous_refused_flow_is_recorded(env) -> None:
    e, _ = env
    f = tflow.tflow()
    flowstate.state(f)
    from sluicegate.mitm import guard

    guard.answer(f, 407, "missing_token", "Authenticate with a token.")
    run(e.addon, f)
    (saved,) = e.flows()
    assert saved.response.status_code == 407
    assert saved.metadata["sluicegate"]["refusal"]["code"] == "missing_token"
    assert e.sessions()[0].parent.name.startswith("anonymous-")
    (line,) = e.audit()
    assert line["identity"] == "anonymous" and line["decision"] == "refused"
    assert line["refusal"] == "missing_token"


@pytest.mark.parametrize("hook", ["error", "http_connect_error"])
def test_errored_and_refused_connect_flows_are_recorded(env, hook: str) -> None:
    e, _ = env
    f = tflow.tflow(err=hook == "error")
    if hook == "http_connect_error":
        f.request.method = "CONNECT"
        f.response = http.Response.make(407, b"proxy auth required")
    getattr(e.addon, hook)(f)
    (saved,) = e.flows()
    assert saved.metadata["sluicegate"]["recording"]["event"] == hook
    assert e.audit()[0]["event"] == hook


def test_each_flow_is_recorded_once(env) -> None:
    e, _ = env
    f = authenticated_flow()
    run(e.addon, f)
    e.addon.error(f)
    assert len(e.flows()) == 1


def test_websocket_flow_is_recorded_at_its_end_with_messages_scrubbed(env) -> None:
    e, _ = env
    f = tflow.twebsocketflow()
    flowstate.state(f).scrub = [flowstate.ScrubLiteral("injected-credential:ws", KEY)]
    f.websocket.messages[0].content = f"hello {KEY}".encode()
    e.addon.response(f)  # the 101: not yet
    assert e.flows() == []
    e.addon.websocket_end(f)
    (saved,) = e.flows()
    assert saved.websocket.messages[0].content == b"hello [credential:ws]"
    assert KEY.encode() not in e.all_bytes()


def test_shutdown_records_flows_in_flight_and_seals(env) -> None:
    e, tctx = env
    waiting = authenticated_flow()
    waiting.response = None
    e.addon.requestheaders(waiting)
    run(e.addon, authenticated_flow())
    tctx.master.should_exit.set()
    e.addon.done()
    events = [f.metadata["sluicegate"]["recording"]["event"] for f in e.flows()]
    assert sorted(events) == ["response", "shutdown"]
    (path,) = e.sessions()
    text = path.with_name(path.name + ".chain").read_text()
    assert chain.verify(path.read_bytes(), text, trusted_key=e.signer.public_key).status == "ok"


def test_identities_get_separate_sessions_and_chains_verify(env) -> None:
    e, _ = env
    for subject in ("alice", "bob", "alice"):
        f = authenticated_flow()
        flowstate.state(f).caller = flowstate.Caller(subject, (), "iss", None, "fp")
        run(e.addon, f)
    e.addon._close("shutdown")
    sessions = e.sessions()
    assert len(sessions) == 2
    for path in sessions:
        text = path.with_name(path.name + ".chain").read_text()
        verdict = chain.verify(path.read_bytes(), text, trusted_key=e.signer.public_key)
        assert verdict.status == "ok", verdict.findings


# -- sealed originals -------------------------------------------------------------------------


def test_sealed_originals_only_open_with_the_auditor_key(env) -> None:
    e, tctx = env
    e.configure(tctx, seal_to=str(e.auditor_public_file))
    assert flowstate.keep_originals
    f = authenticated_flow()
    flowstate.keep_original(f, "request", f"{REDACTED_ORIGINAL} with {KEY}".encode())
    f.request.content = b"my password is [REDACTED:password]"
    run(e.addon, f)
    assert REDACTED_ORIGINAL.encode() not in e.all_bytes()
    (saved,) = e.flows()
    sealed = saved.metadata["sluicegate"]["sealed"]
    assert sealed["key_id"] == sealing.key_id(e.auditor_private.public_key())
    original = sealing.unseal(e.auditor_private, sealed["request"], seal_context(f.id, "request"))
    assert original == f"{REDACTED_ORIGINAL} with [credential:openai]".encode()
    with pytest.raises(sealing.SealError):
        sealing.unseal(e.auditor_private, sealed["request"], seal_context("other", "request"))


def test_originals_are_not_kept_without_seal_to(env) -> None:
    assert not flowstate.keep_originals
    f = tflow.tflow()
    flowstate.keep_original(f, "request", b"original")
    assert flowstate.state(f).originals == {}


# -- failing closed ---------------------------------------------------------------------------


@pytest.fixture
def broken_disk(monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], None]:
    """`broken_disk(True)`: every write under the store fails with ENOSPC."""
    real_write = store_mod.os.write

    def fail(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def set_broken(broken: bool) -> None:
        monkeypatch.setattr(store_mod.os, "write", fail if broken else real_write)

    return set_broken


def test_refuse_mode_withholds_unrecorded_response_and_refuses_until_writes_work(
    env, broken_disk, monkeypatch
) -> None:
    e, _ = env
    run(e.addon, authenticated_flow())  # a session is open
    broken_disk(True)
    f = authenticated_flow()
    run(e.addon, f)
    assert f.response.status_code == 503
    assert json.loads(f.response.content)["error"]["code"] == "recording_unavailable"

    g = tflow.tflow()
    e.addon.requestheaders(g)
    assert g.response is not None and g.response.status_code == 503

    broken_disk(False)
    monkeypatch.setattr(store_mod, "_PROBE_INTERVAL", 0.0)
    e.addon.store._next_probe = 0.0
    h = tflow.tflow()
    e.addon.requestheaders(h)
    assert h.response is None
    e.addon.response(authenticated_flow())
    flows = e.flows()
    assert len(flows) == 2  # the first and the last; the failed one left no partial record
    for path in e.sessions():
        text = path.with_name(path.name + ".chain").read_text()
        assert chain.verify(path.read_bytes(), text).status in ("ok", "unsealed")


def test_continue_mode_forwards_and_logs_loudly(env, broken_disk, caplog) -> None:
    e, tctx = env
    e.configure(tctx, on_failure="continue")
    broken_disk(True)
    f = authenticated_flow()
    with caplog.at_level(logging.ERROR, logger="sluicegate.recorder"):
        run(e.addon, f)
        g = tflow.tflow()
        e.addon.requestheaders(g)
    assert f.response.status_code == 200 and g.response is None
    assert "recording FAILED" in caplog.text and "UNRECORDED" in caplog.text


def test_missing_directory_refuses_before_forwarding(env) -> None:
    e, _ = env
    e.addon.store.monotonic = lambda: 100.0  # the passed check stays fresh: existence is not
    run(e.addon, authenticated_flow())
    for path in sorted(e.dir.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    e.dir.rmdir()
    f = tflow.tflow()
    e.addon.requestheaders(f)
    assert f.response is not None and f.response.status_code == 503
    e.dir.mkdir()
    g = tflow.tflow()
    e.addon.requestheaders(g)
    assert g.response is None


def test_disk_low_within_the_cached_second_withholds_the_response(env, broken_disk) -> None:
    """The request passed a free-space check less than a second old; its record cannot be
    written, so the answer is withheld (503) and the next request is checked again."""
    e, _ = env
    e.addon.store.monotonic = lambda: 100.0  # the clock stands still: the check stays cached
    run(e.addon, authenticated_flow())
    e.addon.store.limits = dataclasses.replace(e.addon.store.limits, min_free_bytes=2**62)
    broken_disk(True)
    f = authenticated_flow()
    e.addon.requestheaders(f)
    assert f.response is not None and f.response.status_code == 200  # not refused: forwarded
    e.addon.response(f)
    assert f.response is not None and f.response.status_code == 503
    assert json.loads(f.response.content)["error"]["code"] == "recording_unavailable"
    g = tflow.tflow()
    e.addon.requestheaders(g)
    assert g.response is not None and g.response.status_code == 503


def test_low_disk_refuses_before_forwarding(env) -> None:
    e, tctx = env
    e.configure(tctx, min_free_bytes=2**62)
    f = tflow.tflow()
    e.addon.requestheaders(f)
    assert f.response is not None and f.response.status_code == 503
    assert json.loads(f.response.content)["error"]["code"] == "recording_unavailable"


def test_scrub_failure_refuses_instead_of_writing(env, monkeypatch) -> None:
    e, _ = env
    from sluicegate.mitm import snapshot as snapshot_mod

    monkeypatch.setattr(snapshot_mod, "scrub_value", lambda value, pairs: value)
    f = authenticated_flow()
    f.comment = f"only the final sweep would catch {KEY}"
    run(e.addon, f)
    assert f.response.status_code == 503
    assert KEY.encode() not in e.all_bytes()


def test_recording_disabled_without_section_warns(tmp_path: Path, idp: TestIdP, caplog) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "auth": idp.auth_config()}))
    addon = Recorder()
    with (
        caplog.at_level(logging.WARNING, logger="sluicegate.recorder"),
        taddons.context(addon) as tctx,
    ):
        tctx.configure(addon, sluicegate_config=str(path))
        f = tflow.tflow(resp=True)
        run(addon, f)
    assert addon.store is None and f.response.status_code == 200
    assert "flows are NOT recorded" in caplog.text


# -- config ---------------------------------------------------------------------------------------


def test_recording_config_problems_are_named(tmp_path: Path, idp: TestIdP) -> None:
    from sluicegate.config import ConfigError, load_config

    wrong_key = tmp_path / "x25519.pem"
    wrong_key.write_bytes(sealing.generate_keypair()[0])  # an X25519 key, not Ed25519
    not_x25519 = tmp_path / "signing.pub"
    not_x25519.write_bytes(chain.Signer.generate().public_pem())
    path = tmp_path / "c.yaml"
    recording = {
        "directory": "rec",
        "signing_key": {"file": str(wrong_key)},
        "seal_to": str(not_x25519),
        "rotate_bytes": 0,
        "on_failure": "ignore",
    }
    path.write_text(
        yaml.safe_dump({"version": 1, "auth": idp.auth_config(), "recording": recording})
    )
    with pytest.raises(ConfigError) as e:
        load_config(path)
    text = str(e.value)
    assert "recording.on_failure: must be one of 'refuse', 'continue'" in text
    recording["on_failure"] = "refuse"
    path.write_text(
        yaml.safe_dump({"version": 1, "auth": idp.auth_config(), "recording": recording})
    )
    with pytest.raises(ConfigError) as e:
        load_config(path)
    text = str(e.value)
    assert "recording.signing_key: the recording signing key must be an Ed25519 key" in text
    assert "recording.seal_to: the auditor key must be an X25519 public key" in text
    assert "recording.rotate_bytes: must be positive" in text
    assert "BEGIN" not in text


def test_recording_config_defaults(tmp_path: Path, idp: TestIdP) -> None:
    from sluicegate.config import load_config

    key = tmp_path / "k.pem"
    key.write_bytes(chain.Signer.generate().private_pem())
    path = tmp_path / "c.yaml"
    recording = {"directory": "rec", "signing_key": {"file": "k.pem"}}
    path.write_text(
        yaml.safe_dump({"version": 1, "auth": idp.auth_config(), "recording": recording})
    )
    section = load_config(path).recording
    assert section is not None and section.enabled and section.on_failure == "refuse"
    assert section.directory == tmp_path / "rec"
    assert section.audit_log_path == tmp_path / "rec" / "audit.jsonl"
    assert section.seal_to is None and not section.fsync


@pytest.mark.parametrize(
    ("policy", "expected", "rules"),
    [
        ({"request": {"action": "allow", "rule": None}}, "allowed", {}),
        ({"request": {"action": "block", "rule": "no-deletes"}}, "blocked", {"no-deletes": 1}),
        (
            {"request": {"action": "hold", "rule": "prod", "approval": {"outcome": "approved"}}},
            "approved",
            {"prod": 1},
        ),
        (
            {
                "request": {"action": "hold", "rule": "prod", "approval": {"outcome": "denied"}},
                "response": {"action": "block", "rule": "leak"},
            },
            "blocked",
            {"prod": 1, "leak": 1},
        ),
        ({"request": {"action": "hold", "rule": "prod"}}, "held", {"prod": 1}),
        ({"request": {"action": "allow", "rule": "prod", "grant": {}}}, "allowed", {"prod": 1}),
        ({"decision": "rate_limited", "rule": "per-caller"}, "rate_limited", {"per-caller": 1}),
    ],
)
def test_policy_facts_become_decision_and_rules(
    policy: dict[str, Any], expected: str, rules: dict[str, int]
) -> None:
    from sluicegate.mitm.snapshot import decision, rules_fired

    sg = {"policy": policy, "redaction": {"request": {"email": 2}}}
    assert decision(sg, errored=False) == expected
    assert rules_fired(sg) == {"email": 2, **rules}
