"""The audit log: one JSON line per recorded flow, for SIEM ingestion, chained and anchored.

Each line is written with a single unbuffered `write` (so it is on its way to disk before the next
flow, and concurrent tail readers never see half a line). The file is opened in append mode and
reopened when it was rotated away (logrotate `create` or a manual move).

Every line carries the gateway run that wrote it (`run`, see index.py), its place in that run's
sequence (`seq`) and the SHA-256 of the run's previous line (`prev`), so a line removed or inserted
breaks the sequence. A line is not signed itself: the hash of each line is in the chain entry of
the flow it describes (`audit` in the session's `.chain`, chained and covered by the next signed
head), and the run's index signs the log's line count and head every second and at the end. So
an edited line no longer matches its flow's entry, and lines cut from the end fall short of the
signed count. Lines after a run's last signed count (a run killed, even before its first
checkpoint, or still running) are consistent but unproven: an `audit_unsigned_tail` warning. A
run no index opened is `audit_unknown_run`: tampering.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sluicegate.recording.chain import Finding
from sluicegate.recording.index import Run
from sluicegate.recording.store import RecordingUnavailable

logger = logging.getLogger("sluicegate.recorder")

_GENESIS_PREFIX = b"sluicegate-audit-v1\x00"


def genesis(run: str) -> str:
    return hashlib.sha256(_GENESIS_PREFIX + run.encode()).hexdigest()


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


@dataclasses.dataclass(frozen=True)
class Prepared:
    """An audit line built for the next place in the sequence, not yet written."""

    line: bytes
    seq: int
    hash: str


class AuditLog:
    def __init__(self, path: Path, fsync: bool = False, run: str = "") -> None:
        self.path = path
        self.fsync = fsync
        self.run = run
        self.count = 0
        self.head = genesis(run)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._fd = self._open()
        # Told of every line once it is written (the monitoring's push); must not raise.
        self.on_commit: Callable[[bytes], None] | None = None

    def _open(self) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        return os.open(self.path, flags, 0o600)

    def _reopen_if_rotated(self) -> None:
        try:
            current = os.stat(self.path).st_ino
        except FileNotFoundError:
            current = None
        if current != os.fstat(self._fd).st_ino:
            os.close(self._fd)
            self._fd = self._open()

    @property
    def state(self) -> tuple[int, str]:
        """(lines written by this run, hash of the last one): what the index signs."""
        return self.count, self.head

    def prepare(self, entry: dict[str, Any]) -> Prepared:
        """The line for `entry` at the next place in this run's sequence."""
        chained = {**entry, "run": self.run, "seq": self.count, "prev": self.head}
        line = json.dumps(chained, separators=(",", ":"), sort_keys=True).encode() + b"\n"
        return Prepared(line, self.count, line_hash(line))

    def commit(self, prepared: Prepared) -> None:
        """Write a prepared line; the sequence moves on only when it was written."""
        if prepared.seq != self.count:
            raise RecordingUnavailable("audit_log_unavailable", "audit line out of sequence")
        try:
            self._reopen_if_rotated()
            view = memoryview(prepared.line)
            while view:
                view = view[os.write(self._fd, view) :]
            if self.fsync:
                os.fsync(self._fd)
        except OSError:
            raise RecordingUnavailable(
                "audit_log_unavailable", "the audit log could not be written"
            ) from None
        self.count += 1
        self.head = prepared.hash
        if self.on_commit is not None:
            try:
                self.on_commit(prepared.line)
            except Exception:
                logger.exception("sluicegate: audit line listener failed")

    def write(self, entry: dict[str, Any]) -> None:
        self.commit(self.prepare(entry))

    def close(self) -> None:
        os.close(self._fd)


# -- verification ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AuditRun:
    """What the index signed about one run's audit lines."""

    count: int  # lines the run had written at its last checkpoint or seal
    head: str
    final: bool  # from the run's seal: no line may follow
    state: str  # sealed | crashed | open


def signed_runs(runs: Iterable[Run]) -> dict[str, AuditRun]:
    """What each indexed run signed about its audit lines. Every run the index opened counts:
    its signed opening starts its audit sequence at (0, genesis), so a run killed before its
    first checkpoint is known (its lines are an unsigned tail), while a run no index opened is
    not. A run sealed without an audit state wrote no audit log: no line may claim it."""
    out: dict[str, AuditRun] = {}
    for run in runs:
        count, head = run.audit if run.audit is not None else (0, genesis(run.name))
        out[run.name] = AuditRun(count, head, run.audit_final or run.sealed, run.state)
    return out


def verify_audit(
    lines: Iterable[bytes],
    runs: dict[str, AuditRun],
    anchors: dict[tuple[str, int], str],
    session_runs: dict[str, str] | None = None,
) -> tuple[list[Finding], int]:
    """Check audit lines (all files, oldest first) against the runs' signed counts and heads and
    the per-flow hashes in the session chains (`anchors`: (session, index) -> line hash;
    `session_runs`: session -> the run that wrote it). Returns the findings and the number of
    lines checked."""
    findings: list[Finding] = []
    by_run: dict[str, list[tuple[int, str, dict[str, Any]]]] = {}
    seen: set[tuple[str, int]] = set()
    checked = 0
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        checked += 1
        try:
            entry = json.loads(raw)
            if not isinstance(entry, dict):
                raise ValueError
        except ValueError:
            findings.append(Finding("audit_unreadable", f"audit line {number} is not JSON"))
            continue
        run = entry.get("run")
        if not isinstance(run, str) or not isinstance(entry.get("seq"), int):
            message = (
                f"audit line {number} names no run or sequence (written before audit lines "
                "were chained? start a new audit log when upgrading)"
            )
            findings.append(Finding("audit_unchained", message))
            continue
        by_run.setdefault(run, []).append((number, line_hash(raw), entry))
        place = (str(entry.get("session")), _int(entry.get("index")))
        seen.add(place)
        anchor = anchors.get(place)
        if anchor is not None and anchor != line_hash(raw):
            findings.append(
                Finding(
                    "audit_modified",
                    f"audit line {number} (flow {entry.get('flow_id')}) differs from what was "
                    "recorded with the flow",
                    index=_int(entry.get("index")),
                    flow_id=str(entry.get("flow_id")),
                )
            )
    for run, found in by_run.items():
        signed = runs.get(run)
        if signed is None:
            message = f"{len(found)} audit line(s) of run {run}, which no index knows"
            findings.append(Finding("audit_unknown_run", message))
        findings += _check_run(run, found, signed)
    complete = {run for run, found in by_run.items() if found[0][2]["seq"] == 0}
    for session, index in sorted(set(anchors) - seen):
        if (session_runs or {}).get(session) in complete:
            findings.append(
                Finding(
                    "audit_line_missing",
                    f"{session}: no audit line (its write failed? see the gateway log)",
                    index=index,
                    fatal=False,
                )
            )
    for run, signed in runs.items():
        if run not in by_run and signed.count > 0:
            findings.append(
                Finding(
                    "audit_missing",
                    f"run {run} wrote {signed.count} audit line(s); none are here",
                )
            )
    return findings, checked


def _check_run(
    run: str, found: list[tuple[int, str, dict[str, Any]]], signed: AuditRun | None
) -> list[Finding]:
    out: list[Finding] = []
    first_seq = found[0][2]["seq"]
    if first_seq > 0:
        out.append(
            Finding(
                "audit_head_missing",
                f"run {run}: audit lines 0..{first_seq - 1} are not here (rotated away, or "
                "deleted: pass the rotated files with --audit-log to check them)",
                fatal=False,
            )
        )
    expected_seq, head = first_seq, found[0][2].get("prev") if first_seq else genesis(run)
    at_count: dict[int, str] = {}
    for number, hashed, entry in found:
        if entry["seq"] != expected_seq or entry.get("prev") != head:
            out.append(
                Finding(
                    "audit_broken",
                    f"run {run}: audit line {number} (seq {entry['seq']}) does not follow "
                    f"seq {expected_seq - 1}: lines were removed, inserted or edited",
                )
            )
        expected_seq, head = entry["seq"] + 1, hashed
        at_count[expected_seq] = hashed
    if signed is None:
        return out
    if signed.count > expected_seq:
        out.append(
            Finding(
                "audit_cut",
                f"run {run}: the index signed {signed.count} audit line(s), {expected_seq} are "
                "here: lines were cut from the end",
            )
        )
    elif signed.count > first_seq and at_count.get(signed.count) != signed.head:
        out.append(
            Finding("audit_modified", f"run {run}: the audit lines differ from what was signed")
        )
    if signed.final and expected_seq > signed.count:
        out.append(
            Finding(
                "audit_inserted",
                f"run {run} ended after {signed.count} audit line(s); {expected_seq} are here",
            )
        )
    elif expected_seq > signed.count:
        how = (
            "it stopped without closing (crash or kill)"
            if signed.state == "crashed"
            else "it is running, or was killed"
        )
        out.append(
            Finding(
                "audit_unsigned_tail",
                f"run {run}: audit lines seq {max(signed.count, first_seq)} to {expected_seq - 1} "
                "follow its last signed checkpoint: consistent, but not proven (anyone who can "
                f"write the log could have written or changed them); {how}",
                fatal=False,
            )
        )
    return out


def _int(value: Any) -> int:
    return value if isinstance(value, int) else -1
