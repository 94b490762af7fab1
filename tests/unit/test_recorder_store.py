"""Session files: rotation by size, age and idleness, retention, failures that never go silent."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import io
from mitmproxy.io import tnetstring
from mitmproxy.test import tflow

from sluicegate.recording import chain
from sluicegate.recording import store as store_mod
from sluicegate.recording.audit import AuditLog
from sluicegate.recording.store import Limits, RecordingUnavailable, SessionStore

SIGNER = chain.Signer.generate()


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def make_store(tmp_path: Path, clock: Clock | None = None, **limits: Any) -> SessionStore:
    settings = {
        "rotate_bytes": 1 << 20,
        "rotate_seconds": 3600,
        "idle_seconds": 300,
        "retention_seconds": None,
        "retention_bytes": None,
        "min_free_bytes": 0,
        **limits,
    }
    return SessionStore(tmp_path / "rec", SIGNER, Limits(**settings), clock or Clock())


def record() -> tuple[str, bytes]:
    f = tflow.tflow(resp=True)
    return f.id, tnetstring.dumps(f.get_state())


def verify(store: SessionStore, relative: str) -> chain.Verdict:
    path = store.directory / relative
    text = path.with_name(path.name + chain.CHAIN_SUFFIX).read_text()
    return chain.verify(path.read_bytes(), text, trusted_key=SIGNER.public_key)


def test_records_load_in_mitmproxy_and_sessions_are_private(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    ids = []
    for _ in range(3):
        flow_id, data = record()
        receipt = store.write("alice", flow_id, data)
        ids.append(flow_id)
    path = store.directory / receipt.session
    with path.open("rb") as f:
        assert [fl.id for fl in io.FlowReader(f).stream()] == ids
    assert receipt.index == 2
    assert path.stat().st_mode & 0o077 == 0
    assert path.parent.stat().st_mode & 0o077 == 0
    assert verify(store, receipt.session).status == "unsealed"
    store.close()
    assert verify(store, receipt.session).status == "ok"


def test_rotation_by_size_seals_the_old_session(tmp_path: Path) -> None:
    store = make_store(tmp_path, rotate_bytes=1)
    first = store.write("alice", *record())
    second = store.write("alice", *record())
    assert first.session != second.session and second.index == 0
    verdict = verify(store, first.session)
    assert verdict.status == "ok" and verdict.flows_in_chain == 1


def test_rotation_by_age_and_idle_close(tmp_path: Path) -> None:
    clock = Clock()
    store = make_store(tmp_path, clock, rotate_seconds=100, idle_seconds=30)
    first = store.write("alice", *record())
    clock.now += 20
    assert store.write("alice", *record()).session == first.session
    clock.now += 90
    third = store.write("alice", *record())
    assert third.session != first.session
    clock.now += 31
    store.tick()
    assert store.sessions == {}
    assert verify(store, third.session).status == "ok"
    seal = chain.summarize((store.directory / (third.session + ".chain")).read_text())["seal"]
    assert seal["reason"] == "idle"


def test_identities_never_share_a_session(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    a = store.write("alice", *record())
    b = store.write("../bob/..", *record())
    assert a.session.split("/")[0] != b.session.split("/")[0]
    assert ".." not in b.session


def test_retention_by_age_spares_open_sessions(tmp_path: Path) -> None:
    clock = Clock()
    store = make_store(tmp_path, clock, rotate_bytes=1, retention_seconds=3600)
    old = store.write("alice", *record())
    current = store.write("alice", *record())  # rotates: `old` is closed
    path = store.directory / old.session
    os.utime(path, (clock.now - 7200, clock.now - 7200))
    open_path = store.directory / current.session
    os.utime(open_path, (clock.now - 7200, clock.now - 7200))
    assert store.enforce_retention() == [old.session]
    assert not path.exists() and not Path(str(path) + ".chain").exists()
    assert open_path.exists()


def test_retention_by_size_deletes_oldest_first(tmp_path: Path) -> None:
    clock = Clock()
    store = make_store(tmp_path, clock, rotate_bytes=1)
    written = []
    for i in range(4):
        receipt = store.write("alice", *record())
        path = store.directory / receipt.session
        os.utime(path, (clock.now + i, clock.now + i))
        written.append(receipt.session)
    sizes = [
        (store.directory / s).stat().st_size + (store.directory / (s + ".chain")).stat().st_size
        for s in written
    ]
    store.limits = Limits(**{**store.limits.__dict__, "retention_bytes": sum(sizes) - 1})
    assert store.enforce_retention() == [written[0]]


def test_failed_write_leaves_no_partial_record_and_refuses_until_a_probe_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(tmp_path)
    first = store.write("alice", *record())
    real_write = store_mod.os.write
    calls = {"n": 0}

    def half_then_fail(fd: int, data: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod.os, "write", half_then_fail)
    with pytest.raises(RecordingUnavailable) as e:
        store.write("alice", *record())
    assert e.value.code == "disk_full"
    with pytest.raises(RecordingUnavailable):
        store.ready()  # within the probe interval: still refused
    path = store.directory / first.session
    with path.open("rb") as f:
        assert len(list(io.FlowReader(f).stream())) == 1  # truncated back, still loadable
    verdict = verify(store, first.session)  # the seal could not be written either, nor a head
    assert verdict.status == "unsealed"
    assert [(f.kind, f.index) for f in verdict.findings] == [("unsigned_tail", 0)]

    store._next_probe = 0.0
    with pytest.raises(RecordingUnavailable):
        store.ready()  # the probe write fails too
    monkeypatch.setattr(store_mod.os, "write", real_write)
    store._next_probe = 0.0
    store.ready()
    assert store.write("alice", *record()).session != first.session


def test_session_file_removed_while_open_continues_in_a_new_one(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    first = store.write("alice", *record())
    (store.directory / first.session).unlink()
    second = store.write("alice", *record())
    assert second.session != first.session
    assert (store.directory / second.session).exists()


def test_ready_reports_missing_directory_and_low_disk(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.ready()
    shutil.rmtree(store.directory)  # the run's index lives in it too
    with pytest.raises(RecordingUnavailable) as e:
        store.ready(max_age=0)
    assert e.value.code == "recording_dir_missing"
    store.directory.mkdir()
    store.limits = Limits(**{**store.limits.__dict__, "min_free_bytes": 2**62})
    with pytest.raises(RecordingUnavailable) as e:
        store.ready()
    assert e.value.code == "disk_low"


class Monotonic:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_ready_reuses_a_passed_check_for_at_most_a_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(tmp_path)
    store.monotonic = mono = Monotonic()
    checks = {"n": 0}
    real_statvfs = os.statvfs

    def counting_statvfs(path: Any) -> Any:
        checks["n"] += 1
        return real_statvfs(path)

    monkeypatch.setattr(store_mod.os, "statvfs", counting_statvfs)
    store.ready()
    for _ in range(50):
        store.ready()
    assert checks["n"] == 1  # one free-space check for 51 requests within the second

    store.limits = Limits(**{**store.limits.__dict__, "min_free_bytes": 2**62})
    mono.now += 0.5
    store.ready()  # still trusted: a write that fails would refuse instead
    mono.now += store_mod.READY_TTL - 0.5
    with pytest.raises(RecordingUnavailable) as e:
        store.ready()  # the second is over: checked again
    assert e.value.code == "disk_low"
    with pytest.raises(RecordingUnavailable):
        store.ready()  # a problem is never cached as a pass
    assert checks["n"] == 3


def test_a_vanished_directory_is_refused_at_once_despite_the_cache(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.monotonic = Monotonic()  # the clock stands still: the passed check stays fresh
    store.ready()
    shutil.rmtree(store.directory)
    store.directory.write_text("a file where the directory was")
    with pytest.raises(RecordingUnavailable) as e:
        store.ready()
    assert e.value.code == "recording_dir_missing"
    store.directory.unlink()
    store.directory.mkdir()
    store.ready()


def test_a_failed_write_invalidates_the_cached_check(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.monotonic = Monotonic()
    store.ready()
    shutil.rmtree(store.directory)
    store.directory.write_text("a file where the directory was")
    with pytest.raises(RecordingUnavailable):
        store.write("alice", *record())
    with pytest.raises(RecordingUnavailable) as e:
        store.ready()  # same instant, but the failure makes it look again
    assert e.value.code in ("recording_dir_missing", "write_failed")


def test_audit_log_lines_survive_rotation_by_rename(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.write({"n": 1})
    (tmp_path / "audit.jsonl").rename(tmp_path / "audit.jsonl.1")
    log.write({"n": 2})
    first = json.loads((tmp_path / "audit.jsonl.1").read_text())
    second = json.loads((tmp_path / "audit.jsonl").read_text())
    assert (first["n"], first["seq"]) == (1, 0)
    assert (second["n"], second["seq"]) == (2, 1)  # the sequence goes on in the new file
    log.close()
