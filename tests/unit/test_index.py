"""recording/index.py and the audit chain: what a run must account for, and what breaks it."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy.io import tnetstring
from mitmproxy.test import tflow

from sluicegate.cli import sessions as sessions_cli
from sluicegate.recording import chain, index
from sluicegate.recording.audit import AuditLog, AuditRun, signed_runs, verify_audit
from sluicegate.recording.audit import genesis as audit_genesis
from sluicegate.recording.store import Limits, SessionStore

SIGNER = chain.Signer.generate()
LIMITS = Limits(
    rotate_bytes=1 << 20,
    rotate_seconds=3600,
    idle_seconds=300,
    retention_seconds=None,
    retention_bytes=None,
    min_free_bytes=0,
)


def record() -> tuple[str, bytes]:
    f = tflow.tflow(resp=True)
    return f.id, tnetstring.dumps(f.get_state())


def run_once(
    directory: Path,
    flows: int = 2,
    identities: tuple[str, ...] = ("alice",),
    *,
    killed: bool = False,
) -> str:
    """One gateway run; `killed`: stopped (kill -9) before its first checkpoint, so its index
    holds its opening and its sessions only."""
    store = SessionStore(directory, SIGNER, LIMITS, audit_log=directory / "audit.jsonl")
    audit = AuditLog(directory / "audit.jsonl", run=store.index.run)
    store.audit_state = lambda: audit.state
    for identity in identities:
        for _ in range(flows):
            prepared: list[Any] = []

            def line(session: str, i: int, who: str = identity, out: list = prepared) -> str:
                out.append(audit.prepare({"identity": who, "session": session, "index": i}))
                return str(out[-1].hash)

            store.write(identity, *record(), line)
            audit.commit(prepared[-1])
    if killed:  # what the kernel keeps of a process killed now: what it wrote, nothing more
        for session in store.sessions.values():
            os.close(session.fd)
            os.close(session.chain_fd)
        store.index.close()
    else:
        store.checkpoint()
        store.close()
    audit.close()
    return store.index.run


def verdicts(directory: Path) -> dict[str, chain.Verdict]:
    out = {}
    for path in directory.glob("*/*.mitm"):
        text = Path(f"{path}{chain.CHAIN_SUFFIX}").read_text()
        out[str(path.relative_to(directory))] = chain.verify(path.read_bytes(), text)
    return out


def kinds(findings: list[chain.Finding]) -> set[str]:
    return {f.kind for f in findings if f.fatal}


def test_runs_link_and_account_for_their_sessions(tmp_path: Path) -> None:
    first = run_once(tmp_path, identities=("alice", "bob"))
    second = run_once(tmp_path)
    verdict = index.verify_index(tmp_path, SIGNER.public_key)
    assert verdict is not None and not kinds(verdict.findings)
    assert [r.name for r in verdict.runs] == [first, second]
    assert [r.state for r in verdict.runs] == ["sealed", "sealed"]
    assert len(verdict.sessions) == 3
    assert all(s.sealed is not None and s.sealed[0] == 2 for s in verdict.sessions.values())
    checks = index.check_sessions(verdict, verdicts(tmp_path))
    assert not any(kinds(found) for found in checks.values())


def test_an_edited_index_line_is_not_signed(tmp_path: Path) -> None:
    run = run_once(tmp_path)
    path = tmp_path / "index" / f"{run}.index"
    lines = path.read_text().splitlines(keepends=True)
    entry = json.loads(lines[1])
    entry["identity"] = "mallory"
    lines[1] = json.dumps(entry) + "\n"
    path.write_text("".join(lines))
    verdict = index.verify_index(tmp_path, SIGNER.public_key)
    assert verdict is not None and "index_bad_signature" in kinds(verdict.findings)


def test_a_removed_index_line_breaks_the_run(tmp_path: Path) -> None:
    run = run_once(tmp_path, identities=("alice", "bob"))
    path = tmp_path / "index" / f"{run}.index"
    lines = path.read_text().splitlines(keepends=True)
    bob = next(i for i, line in enumerate(lines) if '"bob"' in line)
    path.write_text("".join(lines[:bob] + lines[bob + 1 :]))
    verdict = index.verify_index(tmp_path, SIGNER.public_key)
    assert verdict is not None and "index_broken" in kinds(verdict.findings)


def test_an_earlier_run_cut_after_the_next_started_is_found(tmp_path: Path) -> None:
    first = run_once(tmp_path)
    run_once(tmp_path)
    path = tmp_path / "index" / f"{first}.index"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))  # its seal
    verdict = index.verify_index(tmp_path, SIGNER.public_key)
    assert verdict is not None and "run_changed" in kinds(verdict.findings)


def test_two_runs_following_the_same_run_are_a_fork(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = run_once(tmp_path)
    tail = index.tail_of(tmp_path / "index" / f"{first}.index")
    monkeypatch.setattr(index, "latest_run", lambda _: tail)  # two gateways starting at once
    a = SessionStore(tmp_path, SIGNER, LIMITS)
    b = SessionStore(tmp_path, SIGNER, LIMITS)
    a.close()
    b.close()
    verdict = index.verify_index(tmp_path, SIGNER.public_key)
    assert verdict is not None and "run_fork" in kinds(verdict.findings)


def test_retention_deletions_are_indexed_first(tmp_path: Path) -> None:
    clock = [1_700_000_000.0]
    limits = Limits(**{**LIMITS.__dict__, "retention_seconds": 10})
    store = SessionStore(tmp_path, SIGNER, limits, lambda: clock[0])
    store.write("alice", *record())
    store.close()
    later = SessionStore(tmp_path, SIGNER, limits, lambda: clock[0] + 3600)
    (old,) = tmp_path.glob("*/*.mitm")
    import os

    os.utime(old, (clock[0], clock[0]))
    assert later.enforce_retention() == [str(old.relative_to(tmp_path))]
    later.close()
    verdict = index.verify_index(tmp_path, SIGNER.public_key)
    assert verdict is not None
    checks = index.check_sessions(verdict, verdicts(tmp_path))
    assert not any(kinds(found) for found in checks.values())


# -- the audit chain -------------------------------------------------------------------------------


def audit_setup(tmp_path: Path) -> tuple[list[bytes], dict[str, AuditRun], dict[Any, str]]:
    run = run_once(tmp_path, flows=4)
    verdict = index.verify_index(tmp_path, SIGNER.public_key)
    assert verdict is not None
    runs = signed_runs(verdict.runs)
    anchors = {
        (str(v.session), i): h for v in verdicts(tmp_path).values() for i, h in v.audit.items()
    }
    assert run in runs and len(anchors) == 4
    return (tmp_path / "audit.jsonl").read_bytes().splitlines(), runs, anchors


def test_an_intact_audit_log_verifies(tmp_path: Path) -> None:
    lines, runs, anchors = audit_setup(tmp_path)
    findings, checked = verify_audit(lines, runs, anchors)
    assert checked == 4 and not kinds(findings)


@pytest.mark.parametrize(
    ("tamper", "kind"),
    [
        (lambda ls: ls[:1] + ls[2:], "audit_broken"),
        (lambda ls: ls[:-1], "audit_cut"),
        (lambda ls: [ls[1], ls[0], *ls[2:]], "audit_broken"),
        (lambda ls: [*ls, ls[-1]], "audit_broken"),
        (lambda ls: [ls[0].replace(b'"alice"', b'"mallory"'), *ls[1:]], "audit_modified"),
        (lambda ls: [*ls[:-1], ls[-1].replace(b'"alice"', b'"mallory"')], "audit_modified"),
    ],
)
def test_audit_tampering_is_found(tmp_path: Path, tamper: Any, kind: str) -> None:
    lines, runs, anchors = audit_setup(tmp_path)
    findings, _ = verify_audit(tamper(lines), runs, anchors)
    assert kind in kinds(findings)


def test_a_rotated_away_head_is_a_warning(tmp_path: Path) -> None:
    lines, runs, anchors = audit_setup(tmp_path)
    findings, _ = verify_audit(lines[2:], runs, anchors)
    assert not kinds(findings)
    assert "audit_head_missing" in {f.kind for f in findings}


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_changed_byte_of_an_index_is_found(tmp_path_factory: Any, data: st.DataObject) -> None:
    directory = tmp_path_factory.mktemp("idx")
    run = run_once(directory)
    path = directory / "index" / f"{run}.index"
    raw = bytearray(path.read_bytes())
    at = data.draw(st.integers(0, 10**6)) % (len(raw) - 1)  # the final newline aside
    shift = data.draw(st.integers(1, 0x5E))
    raw[at] = 0x20 + (raw[at] - 0x20 + shift) % 0x5F if 0x20 <= raw[at] < 0x7F else 0x41
    path.write_bytes(bytes(raw))
    verdict = index.verify_index(directory, SIGNER.public_key)
    assert verdict is None or kinds(verdict.findings) or not verdict.runs


@pytest.mark.parametrize("field", [b"head", b"count", b"reason", b"sessions", b"audit"])
def test_a_renamed_field_of_an_index_line_is_a_finding(tmp_path: Path, field: bytes) -> None:
    """Found by Hypothesis: `"head"` edited into `"hgad"` crashed the verifier (KeyError)."""
    run = run_once(tmp_path)
    path = tmp_path / "index" / f"{run}.index"
    raw = path.read_bytes()
    assert b'"' + field + b'":' in raw
    path.write_bytes(raw.replace(b'"' + field + b'":', b'"x' + field[1:] + b'":', 1))
    verdict = index.verify_index(tmp_path, SIGNER.public_key)
    assert verdict is not None and kinds(verdict.findings)


def test_a_flow_without_its_audit_line_is_reported(tmp_path: Path) -> None:
    lines, runs, anchors = audit_setup(tmp_path)
    sessions = {session: next(iter(runs)) for session, _ in anchors}
    (last,) = [place for place in anchors if place[1] == 3]
    findings, _ = verify_audit(lines, runs, {**anchors, (last[0], 4): "0" * 64}, sessions)
    assert "audit_line_missing" in {f.kind for f in findings}


# -- a run killed before its first checkpoint, and runs no index opened ---------------------------


def verify_cli(directory: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    key = directory.parent / f"{directory.name}.pub.pem"
    key.write_bytes(SIGNER.public_pem())
    code = sessions_cli.main(["verify", "--dir", str(directory), "--public-key", str(key)])
    return code, capsys.readouterr().out


def forge(line: bytes, run: str, **changes: Any) -> bytes:
    entry = {**json.loads(line), "run": run, **changes}
    return json.dumps(entry, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def test_a_run_killed_before_its_first_checkpoint_is_an_unsigned_tail(tmp_path: Path) -> None:
    run = run_once(tmp_path, flows=3, killed=True)
    verdict = index.verify_index(tmp_path, SIGNER.public_key)
    assert verdict is not None and [r.audit for r in verdict.runs] == [None]
    lines = (tmp_path / "audit.jsonl").read_bytes().splitlines()
    anchors = {
        (str(v.session), i): h for v in verdicts(tmp_path).values() for i, h in v.audit.items()
    }
    findings, checked = verify_audit(lines, signed_runs(verdict.runs), anchors)
    assert checked == 3 and not kinds(findings)
    assert [(f.kind, f.fatal) for f in findings] == [("audit_unsigned_tail", False)]
    assert f"run {run}: audit lines seq 0 to 2" in str(findings[0])
    # Its lines still chain from the run's genesis: one removed, moved or edited is tampering.
    edited = forge(lines[0], run, index=7)
    for tampered in ([lines[0], lines[2]], [lines[1], lines[0], lines[2]], [edited, *lines[1:]]):
        assert "audit_broken" in kinds(verify_audit(tampered, signed_runs(verdict.runs), {})[0])


def test_verify_reports_a_killed_run_as_a_crash_and_a_forged_run_as_tampering(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "rec"
    run_once(directory, flows=2, killed=True)
    code, out = verify_cli(directory, capsys)
    assert code == sessions_cli.EXIT_UNSEALED, out
    assert "audit_unsigned_tail" in out and "audit_unknown_run" not in out
    assert "FAILED" not in out

    # Lines appended by hand under a run this directory's index never opened (a made-up name,
    # or a run copied from another gateway's directory): tampering, whatever they chain to.
    audit = directory / "audit.jsonl"
    lines = audit.read_bytes().splitlines()
    forged_run = "20200101T000000Z-1-abcdef"
    first = forge(lines[0], forged_run, seq=0, prev=audit_genesis(forged_run), index=99)
    audit.write_bytes(audit.read_bytes() + first)
    code, out = verify_cli(directory, capsys)
    assert code == sessions_cli.EXIT_FAILED, out
    assert f"FAILED    audit_unknown_run: 1 audit line(s) of run {forged_run}" in out


def test_a_run_copied_from_another_directory_is_unknown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    run_once(here)
    foreign = run_once(elsewhere, killed=True)  # same key, even: the index is what knows runs
    with (here / "audit.jsonl").open("ab") as f:
        f.write((elsewhere / "audit.jsonl").read_bytes())
    code, out = verify_cli(here, capsys)
    assert code == sessions_cli.EXIT_FAILED, out
    assert f"audit_unknown_run: 2 audit line(s) of run {foreign}" in out


def test_lines_claiming_a_run_sealed_without_an_audit_log_are_inserted(tmp_path: Path) -> None:
    store = SessionStore(tmp_path, SIGNER, LIMITS)  # no audit log: its seal signs no audit state
    store.close()
    verdict = index.verify_index(tmp_path, SIGNER.public_key)
    assert verdict is not None
    runs = signed_runs(verdict.runs)
    assert runs[store.index.run].final
    run = store.index.run
    line = forge(b'{"identity":"alice"}', run, seq=0, prev=audit_genesis(run))
    findings, _ = verify_audit([line], runs, {})
    assert "audit_inserted" in kinds(findings)


def test_with_fsync_a_run_is_on_disk_before_its_first_audit_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Power loss must not leave audit lines of a run whose index file's name was lost."""
    synced: list[Path] = []
    monkeypatch.setattr(index, "_fsync_directory", synced.append)
    fsynced = dataclasses.replace(LIMITS, fsync=True)
    store = SessionStore(tmp_path / "rec", SIGNER, fsynced)
    assert synced == [tmp_path / "rec" / "index", tmp_path / "rec"]
    store.close()
    synced.clear()
    SessionStore(tmp_path / "rec", SIGNER, fsynced).close()
    assert synced == [tmp_path / "rec" / "index"]  # the directory existed already
    synced.clear()
    SessionStore(tmp_path / "other", SIGNER, LIMITS).close()
    assert synced == []
