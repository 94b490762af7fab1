"""recording/index.py and the audit chain: what a run must account for, and what breaks it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy.io import tnetstring
from mitmproxy.test import tflow

from sluicegate.recording import chain, index
from sluicegate.recording.audit import AuditLog, AuditRun, verify_audit
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


def run_once(directory: Path, flows: int = 2, identities: tuple[str, ...] = ("alice",)) -> str:
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
    runs = {r.name: AuditRun(*r.audit, r.audit_final, r.state) for r in verdict.runs if r.audit}
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
