"""The record is complete, and its absence is detectable.

A real gateway records mixed traffic (HTTP/1.1, HTTP/2, SSE, plain HTTP, concurrent clients, a
refusal); every request an upstream received is a recorded flow. Then `sessions verify` must find
each way of making the record lie by omission: a session deleted whole, copied to a second file
or moved to another caller's directory, an audit line edited, removed or cut, a session's tail cut
(which a crash must not be mistaken for), an index or a whole earlier run deleted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest
from mitmproxy import io

from sluicegate.recording import chain, index
from tests.conftest import UPSTREAM_KEY, UPSTREAM_KEY_ENV
from tests.support.gateway import REPO, Gateway, recording_section
from tests.support.pki import TestCA
from tests.support.tokens import TestIdP
from tests.support.upstream import FakeUpstream

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hello"}]}
MARK = "x-test-mark"


def sessions_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sluicegate", "sessions", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "addons")},
        timeout=120,
    )


def start_recording(work: Path, base_config: dict, pki: TestCA, directory: Path) -> Gateway:
    """A recording gateway; a later start on the same directory keeps its signing key."""
    key = signing_key(directory)
    section = (
        {"directory": str(directory), "signing_key": {"file": str(key)}}
        if key.exists()
        else recording_section(directory)
    )
    config = {**base_config, "recording": section}
    return Gateway(
        config, work, upstream_ca=pki.cert_file, env={UPSTREAM_KEY_ENV: UPSTREAM_KEY}
    ).start()


def signing_key(directory: Path) -> Path:
    return directory.parent / f"{directory.name}-signing.pem"


def verify(directory: Path, key: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return sessions_cli("verify", "--dir", str(directory), "--public-key", str(key), *extra)


def read_flows(path: Path) -> list[Any]:
    with path.open("rb") as f:
        return list(io.FlowReader(f).stream())


class PreferHttp2(ssl.SSLContext):
    def set_alpn_protocols(self, protocols: Iterable[str]) -> None:
        super().set_alpn_protocols(sorted(protocols, key=lambda p: p != "h2"))


def http2_client(gateway: Gateway, token: str) -> httpx.Client:
    context = PreferHttp2(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(gateway.ca_file)
    return httpx.Client(http2=True, proxy=gateway.proxy_url(token), verify=context, timeout=20)


def marked() -> dict[str, str]:
    return {MARK: uuid.uuid4().hex}


# -- one recording of mixed traffic, shared --------------------------------------------------------


@dataclasses.dataclass
class Recording:
    directory: Path
    key: Path
    received: list[str]  # marks the upstreams received
    recorded: list[str]  # marks of the recorded flows

    def sessions(self) -> dict[str, Path]:
        """Caller (first part of the directory name) -> its session file."""
        return {p.parent.name.split("-")[0]: p for p in self.directory.glob("*/*.mitm")}

    def copy(self, tmp_path: Path) -> Path:
        target = tmp_path / "rec"
        shutil.copytree(self.directory, target)
        return target


@pytest.fixture(scope="module")
def recording(
    tmp_path_factory: pytest.TempPathFactory,
    base_config: dict,
    pki: TestCA,
    idp: TestIdP,
    upstream: FakeUpstream,
    plain_upstream: FakeUpstream,
) -> Recording:
    work = tmp_path_factory.mktemp("integrity")
    directory = work / "recordings"
    gw = start_recording(work / "gw", base_config, pki, directory)
    alice, bob = idp.mint("alice", ["agents"]), idp.mint("bob", ["agents"])
    upstream.reset()
    plain_upstream.reset()
    try:
        with gw.client(alice) as client:
            for _ in range(3):
                r = client.post(upstream.url("/v1/chat/completions"), json=CHAT, headers=marked())
                assert r.status_code == 200
            with client.stream(
                "POST",
                upstream.url("/v1/chat/completions"),
                json={**CHAT, "stream": True},
                headers=marked(),
            ) as streamed:
                assert b"[DONE]" in streamed.read()
            assert client.get(plain_upstream.url("/echo"), headers=marked()).status_code == 200
        with http2_client(gw, bob) as client:
            answers = [client.get(upstream.url("/echo"), headers=marked()) for _ in range(3)]
            assert [a.http_version for a in answers] == ["HTTP/2"] * 3

        def burst() -> None:
            with gw.client(bob) as client:
                for _ in range(5):
                    client.get(plain_upstream.url("/echo"), headers=marked())

        threads = [threading.Thread(target=burst) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        with pytest.raises(httpx.ProxyError, match="407"), gw.client("not-a-jwt") as client:
            client.get(upstream.url("/echo"), headers=marked())  # refused: nothing forwarded
    finally:
        assert gw.stop(signal.SIGTERM) == 0, gw.logs[-3000:]
    received = [got.header(MARK) or "" for got in [*upstream.received, *plain_upstream.received]]
    recorded = [
        f.request.headers.get(MARK, "")
        for path in directory.glob("*/*.mitm")
        for f in read_flows(path)
    ]
    return Recording(directory, signing_key(directory), received, recorded)


def test_every_forwarded_request_is_recorded_once(recording: Recording) -> None:
    assert len(recording.received) == 3 + 1 + 1 + 3 + 20
    assert all(recording.received)
    forwarded = [m for m in recording.recorded if m in set(recording.received)]
    assert sorted(forwarded) == sorted(recording.received)
    # ... and nothing else but the refused CONNECT (its request never reached an upstream).
    assert len(recording.recorded) == len(recording.received) + 1


def test_an_untouched_recording_verifies(recording: Recording) -> None:
    out = verify(recording.directory, recording.key)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ended cleanly" in out.stdout
    assert "audit.jsonl" in out.stdout and "consistent" in out.stdout
    assert out.stdout.count("OK ") == 3  # alice, bob, anonymous


def test_a_deleted_session_is_found(recording: Recording, tmp_path: Path) -> None:
    directory = recording.copy(tmp_path)
    bob = next(p for p in directory.glob("bob-*/*.mitm"))
    bob.unlink()
    Path(f"{bob}{chain.CHAIN_SUFFIX}").unlink()
    out = verify(directory, recording.key)
    assert out.returncode == 1, out.stdout
    assert f"session_missing: {bob.relative_to(directory)}" in out.stdout


def test_a_session_copied_to_a_second_file_is_found(recording: Recording, tmp_path: Path) -> None:
    directory = recording.copy(tmp_path)
    alice = next(p for p in directory.glob("alice-*/*.mitm"))
    twin = alice.with_name("20200101T000000Z-1-000000.mitm")
    shutil.copy(alice, twin)
    shutil.copy(f"{alice}{chain.CHAIN_SUFFIX}", f"{twin}{chain.CHAIN_SUFFIX}")
    out = verify(directory, recording.key)
    assert out.returncode == 1, out.stdout
    assert "session_unindexed" in out.stdout
    assert f"misplaced: recorded as {alice.relative_to(directory)}" in out.stdout


def test_a_session_moved_to_another_callers_directory_is_found(
    recording: Recording, tmp_path: Path
) -> None:
    directory = recording.copy(tmp_path)
    alice = next(p for p in directory.glob("alice-*/*.mitm"))
    bob_dir = next(directory.glob("bob-*"))
    for path in (alice, Path(f"{alice}{chain.CHAIN_SUFFIX}")):
        path.rename(bob_dir / path.name)
    out = verify(directory, recording.key)
    assert out.returncode == 1, out.stdout
    assert f"session_missing: {alice.relative_to(directory)}" in out.stdout
    assert "misplaced" in out.stdout


def edit_audit(directory: Path, edit: Any) -> None:
    audit = directory / "audit.jsonl"
    lines = audit.read_bytes().splitlines(keepends=True)
    audit.write_bytes(b"".join(edit(lines)))


def test_an_edited_audit_line_is_found(recording: Recording, tmp_path: Path) -> None:
    directory = recording.copy(tmp_path)

    def edit(lines: list[bytes]) -> list[bytes]:
        entry = json.loads(lines[0])
        entry["status"] = 204
        lines[0] = json.dumps(entry, separators=(",", ":"), sort_keys=True).encode() + b"\n"
        return lines

    edit_audit(directory, edit)
    out = verify(directory, recording.key)
    assert out.returncode == 1, out.stdout
    assert "audit_modified" in out.stdout


def test_a_removed_audit_line_is_found(recording: Recording, tmp_path: Path) -> None:
    directory = recording.copy(tmp_path)
    edit_audit(directory, lambda lines: lines[:2] + lines[3:])
    out = verify(directory, recording.key)
    assert out.returncode == 1, out.stdout
    assert "audit_broken" in out.stdout


def test_a_cut_audit_tail_is_found(recording: Recording, tmp_path: Path) -> None:
    directory = recording.copy(tmp_path)
    edit_audit(directory, lambda lines: lines[:-3])
    out = verify(directory, recording.key)
    assert out.returncode == 1, out.stdout
    assert "audit_cut" in out.stdout


def cut_session_tail(session: Path, flows: int = 1) -> None:
    """Remove the last `flows` records, their chain lines and the seal: what a crash leaves."""
    data = session.read_bytes()
    spans, _ = chain.split_records(data)
    session.write_bytes(data[: spans[-flows][0]])
    sidecar = Path(f"{session}{chain.CHAIN_SUFFIX}")
    lines = sidecar.read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line)["type"] != "seal"]
    removed = 0
    while removed < flows:  # the last flow lines and the signed heads after them
        removed += json.loads(kept.pop())["type"] == "flow"
    sidecar.write_text("".join(kept))


def test_a_cut_session_tail_is_not_mistaken_for_a_crash(
    recording: Recording, tmp_path: Path
) -> None:
    directory = recording.copy(tmp_path)
    alice = next(p for p in directory.glob("alice-*/*.mitm"))
    cut_session_tail(alice)
    assert sessions_cli("verify", "--no-index", str(alice)).returncode == 3  # looks like a crash
    out = verify(directory, recording.key)
    assert out.returncode == 1, out.stdout
    assert "session_cut" in out.stdout


def test_a_deleted_index_is_found(recording: Recording, tmp_path: Path) -> None:
    directory = recording.copy(tmp_path)
    shutil.rmtree(directory / "index")
    out = verify(directory, recording.key)
    assert out.returncode == 1, out.stdout
    assert "no_index" in out.stdout
    assert verify(directory, recording.key, "--no-index").returncode == 0


# -- runs: a crash, a restart, a run deleted whole -------------------------------------------------


def traffic(gw: Gateway, token: str, plain: FakeUpstream, n: int = 3) -> None:
    with gw.client(token) as client:
        for _ in range(n):
            assert client.get(plain.url("/echo")).status_code == 200


def test_a_crash_is_told_apart_from_a_cut_after_the_next_start(
    tmp_path: Path, base_config: dict, pki: TestCA, token: str, plain_upstream: FakeUpstream
) -> None:
    directory = tmp_path / "rec"
    key = signing_key(directory)
    first = start_recording(tmp_path / "gw1", base_config, pki, directory)
    traffic(first, token, plain_upstream)
    time.sleep(2.5)  # the recorder checkpoints every second
    first.stop(signal.SIGKILL)
    killed = verify(directory, key)
    assert killed.returncode == 3, killed.stdout  # open: running, or killed
    assert "still running, or killed" in killed.stdout
    (crashed_session,) = directory.glob("*/*.mitm")

    second = start_recording(tmp_path / "gw2", base_config, pki, directory)
    traffic(second, token, plain_upstream)
    assert second.stop(signal.SIGTERM) == 0
    out = verify(directory, key)
    assert out.returncode == 3, out.stdout  # consistent; the crash is reported, not hidden
    assert "stopped without closing" in out.stdout
    assert "CRASHED" in out.stdout and "FAILED" not in out.stdout

    cut_session_tail(crashed_session)  # below what the index checkpointed before the kill
    cut = verify(directory, key)
    assert cut.returncode == 1, cut.stdout
    assert "session_cut" in cut.stdout


def test_flows_killed_before_their_signed_head_are_an_unsigned_tail(
    tmp_path: Path, base_config: dict, pki: TestCA, token: str, plain_upstream: FakeUpstream
) -> None:
    """Chain v2 signs a head per 256 flows or per second: flows written less than a second
    before a kill -9 have none. `sessions verify` says so (exit 3), never calls it tampering."""
    directory = tmp_path / "rec"
    key = signing_key(directory)
    gw = start_recording(tmp_path / "gw", base_config, pki, directory)
    traffic(gw, token, plain_upstream)  # the session opens with the first flow: no head due yet
    gw.stop(signal.SIGKILL)
    (session,) = directory.glob("*/*.mitm")
    sidecar = Path(f"{session}{chain.CHAIN_SUFFIX}")
    types = [json.loads(line)["type"] for line in sidecar.read_text().splitlines()]
    assert types == ["open", "flow", "flow", "flow"], types
    out = sessions_cli("verify", "--no-index", "--public-key", str(key), str(session))
    assert out.returncode == 3, out.stdout
    assert "unsigned_tail" in out.stdout and "FAILED" not in out.stdout


def index_types(directory: Path) -> list[list[str]]:
    return [
        [json.loads(line)["type"] for line in path.read_text().splitlines()]
        for path in sorted((directory / "index").glob("*.index"))
    ]


def killed_before_the_first_checkpoint(
    tmp_path: Path, base_config: dict, pki: TestCA, token: str, plain_upstream: FakeUpstream
) -> Path:
    """A recording directory whose only run was killed (-9) right after its first flows, before
    the recorder's first tick (1 s after start) checkpointed anything. A race with that tick,
    which a loaded machine may lose a few times in a row: then the run's index is written again
    without its checkpoints (re-chained and signed with the gateway's key), which is what the
    gateway would have left had its tick come a moment later."""
    for attempt in range(3):
        directory = tmp_path / f"rec{attempt}"
        gw = start_recording(tmp_path / f"gw{attempt}", base_config, pki, directory)
        traffic(gw, token, plain_upstream, n=2)
        gw.stop(signal.SIGKILL)
        if index_types(directory) == [["open", "session"]]:
            return directory
    (path,) = (directory / "index").glob("*.index")
    run = path.name.removesuffix(".index")
    signer = chain.Signer.from_pem(signing_key(directory).read_bytes())
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    head, lines = index.genesis(run), []
    for seq, entry in enumerate(e for e in kept if e["type"] != "checkpoint"):
        unsigned = {k: v for k, v in entry.items() if k != "sig"}
        lines.append(chain.dump_line(signer.signed({**unsigned, "seq": seq, "prev": head})))
        head = index.line_hash(lines[-1])
    path.write_bytes(b"".join(lines))
    assert index_types(directory) == [["open", "session"]]
    return directory


def test_a_kill_before_the_first_checkpoint_is_a_crash_not_an_unknown_run(
    tmp_path: Path, base_config: dict, pki: TestCA, token: str, plain_upstream: FakeUpstream
) -> None:
    """Killed less than a second after its first flows, a run has signed only its opening: no
    checkpoint of its audit lines yet. Whole-directory `sessions verify` reports the crash
    (exit 3, the audit lines an unsigned tail), before and after the next start, and never
    `audit_unknown_run` (tampering). Audit lines of a run no index opened still are."""
    directory = killed_before_the_first_checkpoint(
        tmp_path, base_config, pki, token, plain_upstream
    )
    key = signing_key(directory)
    audit_lines = (directory / "audit.jsonl").read_bytes().splitlines()
    (killed_run,) = {json.loads(line)["run"] for line in audit_lines}
    assert len(audit_lines) == 2
    killed = verify(directory, key)
    assert killed.returncode == 3, killed.stdout
    assert "audit_unknown_run" not in killed.stdout and "FAILED" not in killed.stdout
    assert "audit_unsigned_tail" in killed.stdout
    assert "still running, or killed" in killed.stdout

    second = start_recording(tmp_path / "gw-next", base_config, pki, directory)
    traffic(second, token, plain_upstream)
    assert second.stop(signal.SIGTERM) == 0
    out = verify(directory, key)
    assert out.returncode == 3, out.stdout
    assert "CRASHED" in out.stdout and "FAILED" not in out.stdout
    assert "audit_unknown_run" not in out.stdout and "audit_unsigned_tail" in out.stdout

    # The same lines under a run no index of this directory opened: forged (or copied here).
    forged_run = "20200101T000000Z-1-abcdef"
    edit_audit(
        directory,
        lambda lines: [
            *lines,
            *(line.replace(killed_run.encode(), forged_run.encode()) for line in lines[:2]),
        ],
    )
    forged = verify(directory, key)
    assert forged.returncode == 1, forged.stdout
    assert f"audit_unknown_run: 2 audit line(s) of run {forged_run}" in forged.stdout


def test_a_quiet_session_gets_its_head_signed_within_seconds(
    tmp_path: Path, base_config: dict, pki: TestCA, token: str, plain_upstream: FakeUpstream
) -> None:
    directory = tmp_path / "rec"
    key = signing_key(directory)
    gw = start_recording(tmp_path / "gw", base_config, pki, directory)
    traffic(gw, token, plain_upstream)
    time.sleep(2.5)  # the recorder's tick signs heads that are due
    gw.stop(signal.SIGKILL)
    (session,) = directory.glob("*/*.mitm")
    out = verify(directory, key)
    assert out.returncode == 3, out.stdout  # unsealed: killed
    assert "unsigned_tail" not in out.stdout and "FAILED" not in out.stdout
    lines = [
        json.loads(line) for line in Path(f"{session}{chain.CHAIN_SUFFIX}").read_text().splitlines()
    ]
    assert lines[-1]["type"] == "head" and lines[-1]["count"] == 3
    assert sum(line["type"] == "flow" and "sig" not in line for line in lines) == 3


def test_an_earlier_run_deleted_whole_is_found(
    tmp_path: Path, base_config: dict, pki: TestCA, token: str, plain_upstream: FakeUpstream
) -> None:
    directory = tmp_path / "rec"
    key = signing_key(directory)
    runs = []
    for n in range(2):
        gw = start_recording(tmp_path / f"gw{n}", base_config, pki, directory)
        traffic(gw, token, plain_upstream, n=2)
        assert gw.stop(signal.SIGTERM) == 0
        runs.append(sorted((directory / "index").glob("*.index"))[-1])
    assert verify(directory, key).returncode == 0
    # The first run, everything it wrote: its index, its sessions and its audit lines.
    first_run = runs[0].name.removesuffix(".index")
    first_sessions = [
        json.loads(line)["session"]
        for line in runs[0].read_text().splitlines()
        if json.loads(line)["type"] == "session"
    ]
    runs[0].unlink()
    for relative in first_sessions:
        (directory / relative).unlink()
        Path(f"{directory / relative}{chain.CHAIN_SUFFIX}").unlink()
    edit_audit(directory, lambda lines: [x for x in lines if first_run.encode() not in x])
    out = verify(directory, key)
    assert out.returncode == 1, out.stdout
    assert "run_missing" in out.stdout
