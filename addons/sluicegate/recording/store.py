"""Session files on disk: one per identity and time window, rotated, retained, never lost quietly.

Each record is written with one unbuffered `write` and then its chain line (and, every 256 flows
or second, a signed head: chain.py), so a crash or a `kill -9` loses at most the flows still in
flight (the kernel keeps what was written); flows after the last signed head verify as an
unsigned tail. `fsync` additionally survives power loss, at a per-flow cost. A failed write
truncates the partial record away, closes the session and raises `RecordingUnavailable`; the
recorder then refuses traffic (or logs loudly) until `ready()` sees writes work again.

No mitmproxy here: records arrive as bytes.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import hashlib
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path

from sluicegate.recording import chain
from sluicegate.recording.index import RunIndex

logger = logging.getLogger("sluicegate.recorder")

SESSION_SUFFIX = ".mitm"
_PROBE_INTERVAL = 0.5
# How long a passed check of the directory's permissions and free space is trusted by `ready()`:
# three system calls per request were a measurable part of a small flow's cost. That the
# directory is still there is checked on every request (one `stat`), so a vanished directory is
# still refused before anything is forwarded; a disk that fills or a mode that changes within
# the window fails the write instead, which closes the session, withholds the answer (503) and
# makes the next `ready()` check everything again.
READY_TTL = 1.0


class RecordingUnavailable(Exception):
    """Flows cannot be recorded right now. `code` is stable; the message names no secret."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass(frozen=True)
class Limits:
    rotate_bytes: int
    rotate_seconds: float
    idle_seconds: float
    retention_seconds: float | None
    retention_bytes: int | None
    min_free_bytes: int
    fsync: bool = False


@dataclasses.dataclass(frozen=True)
class Receipt:
    """Where a record went: the session (relative to the recording directory) and its index."""

    session: str
    index: int
    offset: int


def identity_slug(identity: str) -> str:
    """A directory name for an identity: readable, filesystem-safe, and collision-free."""
    safe = re.sub(r"[^A-Za-z0-9._@-]+", "_", identity)[:48].strip("._-") or "id"
    return f"{safe}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class Session:
    """One open session file and its chain sidecar."""

    def __init__(self, root: Path, identity: str, signer: chain.Signer, now: float) -> None:
        stamp = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        name = f"{stamp}-{os.getpid()}-{secrets.token_hex(3)}{SESSION_SUFFIX}"
        self.relative = f"{identity_slug(identity)}/{name}"
        self.path = root / self.relative
        self.chain_path = self.path.with_name(self.path.name + chain.CHAIN_SUFFIX)
        self.identity = identity
        self.created = now
        self.last_write = now
        self.path.parent.mkdir(mode=0o700, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        self.fd = os.open(self.path, flags, 0o600)
        try:
            self.chain_fd = os.open(self.chain_path, flags, 0o600)
        except OSError:
            os.close(self.fd)
            raise
        self.writer = chain.ChainWriter(self.relative, signer, identity=identity, created=now)
        self.closed = False
        _write_all(self.chain_fd, chain.dump_line(self.writer.opening()))

    @property
    def size(self) -> int:
        return self.writer.size

    def due(self, now: float, limits: Limits) -> str | None:
        """Why this session should be closed now, if it should."""
        if self.size >= limits.rotate_bytes:
            return "size"
        if now - self.created >= limits.rotate_seconds:
            return "age"
        if now - self.last_write >= limits.idle_seconds:
            return "idle"
        return None

    def still_on_disk(self) -> bool:
        """False when the file was deleted or replaced while open (writes would vanish)."""
        try:
            return os.stat(self.path).st_ino == os.fstat(self.fd).st_ino
        except OSError:
            return False

    def append(
        self, flow_id: str, record: bytes, now: float, fsync: bool, audit: str | None = None
    ) -> Receipt:
        prev_head = self.writer.head
        entry = self.writer.append(flow_id, record, audit)
        lines = chain.dump_line(entry)
        if self.writer.head_due(now):  # one signature per 256 flows or per second
            lines += chain.dump_line(self.writer.signed_head(now))
        try:
            _write_all(self.fd, record)
            _write_all(self.chain_fd, lines)
            if fsync:
                os.fsync(self.fd)
                os.fsync(self.chain_fd)
        except OSError:
            self.writer.undo(entry, prev_head)
            self._truncate_back(entry["offset"])
            raise
        self.last_write = now
        return Receipt(self.relative, entry["index"], entry["offset"])

    def sign_head(self, now: float, fsync: bool) -> None:
        """Sign the head if flows wait for it (a quiet session: the tick calls this)."""
        if self.closed or not self.writer.head_due(now):
            return
        _write_all(self.chain_fd, chain.dump_line(self.writer.signed_head(now)))
        if fsync:
            os.fsync(self.chain_fd)

    def _truncate_back(self, offset: int) -> None:
        """Remove a partial record so the file stays loadable by mitmproxy."""
        try:
            os.ftruncate(self.fd, offset)
        except OSError:
            logger.error(
                "sluicegate: recording: cannot truncate %s after a failed write", self.path
            )

    def seal(self, reason: str, now: float, fsync: bool) -> bool:
        """Sign the head and close. Idempotent; a failure is logged (the chain still verifies).
        Whether the seal was written."""
        if self.closed:
            return False
        self.closed = True
        try:
            _write_all(self.chain_fd, chain.dump_line(self.writer.seal(reason, now)))
            if fsync:
                os.fsync(self.chain_fd)
        except OSError as e:
            logger.error(
                "sluicegate: recording: cannot seal %s (%s)",
                self.relative,
                errno.errorcode.get(e.errno or 0, "error"),
            )
            return False
        finally:
            os.close(self.fd)
            os.close(self.chain_fd)
        return True


class SessionStore:
    """All open sessions of one recording directory, keyed by identity, and the run's index of
    them (index.py): every session is indexed before its first record, sealed sessions and
    retention's deletions are indexed, and `tick` checkpoints what grew."""

    def __init__(
        self,
        directory: Path,
        signer: chain.Signer,
        limits: Limits,
        clock: Callable[[], float] = time.time,
        *,
        gateway: str = "sluicegate",
        audit_log: Path | None = None,
    ) -> None:
        self.directory = directory
        self.signer = signer
        self.limits = limits
        self.clock = clock
        self.sessions: dict[str, Session] = {}
        self._failure: RecordingUnavailable | None = None
        self._next_probe = 0.0
        self._env_ok_until = 0.0  # time.monotonic() until which the environment passed
        self.monotonic: Callable[[], float] = time.monotonic
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.index = RunIndex(
            directory, signer, gateway=gateway, now=clock(), fsync=limits.fsync, audit_log=audit_log
        )
        # (lines written, head) of the audit log this run writes, for checkpoints and the seal.
        self.audit_state: Callable[[], tuple[int, str]] | None = None
        self._checkpointed: dict[str, int] = {}
        self._audit_checkpointed: tuple[int, str] | None = None
        self._closed = False

    # -- health -----------------------------------------------------------------------------

    def ready(self, max_age: float = READY_TTL) -> None:
        """Raise RecordingUnavailable unless a flow could be recorded now. Called per request:
        the directory's existence is checked each time, a passed check of its permissions and
        free space is reused for `max_age` seconds (0: check all now, as /readyz does); a
        problem is never cached, and a failed write invalidates the check."""
        now = self.monotonic()
        if max_age > 0 and self._failure is None and now < self._env_ok_until:
            if self._directory_missing():
                self._env_ok_until = 0.0
                raise RecordingUnavailable(
                    "recording_dir_missing", "the recording directory is missing"
                )
            return
        problem = self._environment_problem()
        self._env_ok_until = now + min(max_age, READY_TTL) if problem is None else 0.0
        if problem is None and self._failure is not None:
            problem = self._probe()
        if problem is not None:
            raise problem
        if self._failure is not None:
            logger.warning("sluicegate: recording works again (%s cleared)", self._failure.code)
            self._failure = None

    def _directory_missing(self) -> bool:
        try:
            return not stat.S_ISDIR(os.stat(self.directory).st_mode)
        except OSError:
            return True

    def _environment_problem(self) -> RecordingUnavailable | None:
        if not self.directory.is_dir():
            return RecordingUnavailable(
                "recording_dir_missing", "the recording directory is missing"
            )
        if not os.access(self.directory, os.W_OK | os.X_OK):
            return RecordingUnavailable(
                "recording_dir_unwritable", "the recording directory is not writable"
            )
        try:
            stats = os.statvfs(self.directory)
        except OSError:
            return RecordingUnavailable("recording_dir_unwritable", "cannot stat the directory")
        if stats.f_bavail * stats.f_frsize < self.limits.min_free_bytes:
            return RecordingUnavailable("disk_low", "less free disk space than min_free_bytes")
        return None

    def _probe(self) -> RecordingUnavailable | None:
        """After a failed write: try a real write, at most every half second."""
        now = time.monotonic()
        if now < self._next_probe:
            return self._failure
        self._next_probe = now + _PROBE_INTERVAL
        probe = self.directory / f".probe-{os.getpid()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _write_all(fd, b"\0" * 4096)
                os.fsync(fd)
            finally:
                os.close(fd)
            probe.unlink()
        except OSError:
            return self._failure
        return None

    def fail(self, code: str, message: str) -> RecordingUnavailable:
        """Remember a failure so `ready()` refuses until a probe write succeeds."""
        self._failure = RecordingUnavailable(code, message)
        self._next_probe = time.monotonic() + _PROBE_INTERVAL
        self._env_ok_until = 0.0
        return self._failure

    # -- writing ----------------------------------------------------------------------------

    def write(
        self,
        identity: str,
        flow_id: str,
        record: bytes,
        audit: Callable[[str, int], str] | None = None,
    ) -> Receipt:
        """Append one serialized flow to the identity's current session. `audit(session, index)`
        gives the hash of the flow's audit line, which the flow's signed chain entry then holds."""
        now = self.clock()
        session = self.sessions.get(identity)
        if session is not None:
            reason = session.due(now, self.limits)
            if reason is None and not session.still_on_disk():
                logger.error(
                    "sluicegate: recording: %s was removed or replaced while open; "
                    "continuing in a new session",
                    session.relative,
                )
                reason = "file_gone"
            if reason is not None:
                self._close(identity, reason, now)
                session = None
        try:
            if session is None:
                session = Session(self.directory, identity, self.signer, now)
                self.sessions[identity] = session
                self.index.session(session.relative, identity, now, chain.genesis(session.relative))
            audit_hash = audit(session.relative, session.writer.count) if audit else None
            receipt = session.append(flow_id, record, now, self.limits.fsync, audit_hash)
        except OSError as e:
            if session is not None:
                self._close(identity, "write_failed", now)
            code = "disk_full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "write_failed"
            raise self.fail(code, "a flow could not be written to the recording") from None
        if self._failure is not None:
            logger.warning("sluicegate: recording works again (%s cleared)", self._failure.code)
            self._failure = None
        return receipt

    def _close(self, identity: str, reason: str, now: float) -> None:
        session = self.sessions.pop(identity, None)
        if session is None:
            return
        self._checkpointed.pop(session.relative, None)
        if session.seal(reason, now, self.limits.fsync):
            writer = session.writer
            try:
                self.index.session_sealed(
                    session.relative, writer.count, writer.head, writer.size, reason
                )
            except OSError:
                logger.error("sluicegate: recording: cannot index the seal of %s", session.relative)

    def tick(self) -> None:
        """Close sessions past their age or idle time (signing their head), sign the heads of
        the others if flows wait for a signature; checkpoint the sessions that grew and the
        audit log in the index."""
        now = self.clock()
        for identity, session in list(self.sessions.items()):
            reason = session.due(now, self.limits)
            if reason is not None:
                self._close(identity, reason, now)
                continue
            try:
                session.sign_head(now, self.limits.fsync)
            except OSError:
                logger.error("sluicegate: recording: cannot sign the head of %s", session.relative)
                self._close(identity, "write_failed", now)
                self.fail("write_failed", "a chain head could not be written")
        self.checkpoint(now)

    def checkpoint(self, now: float | None = None) -> None:
        grown = {
            s.relative: (s.writer.count, s.writer.head)
            for s in self.sessions.values()
            if s.writer.count and self._checkpointed.get(s.relative) != s.writer.count
        }
        audit = self.audit_state() if self.audit_state is not None else None
        if not grown and audit == self._audit_checkpointed:
            return
        try:
            self.index.checkpoint(self.clock() if now is None else now, grown, audit)
        except OSError:
            logger.error("sluicegate: recording: cannot write an index checkpoint")
            return
        self._checkpointed.update({k: v[0] for k, v in grown.items()})
        self._audit_checkpointed = audit

    def close(self, reason: str = "shutdown") -> None:
        """Seal every session, then the run's index (a clean end, told apart from a cut)."""
        if self._closed:
            return
        self._closed = True
        now = self.clock()
        for identity in list(self.sessions):
            self._close(identity, reason, now)
        try:
            audit = self.audit_state() if self.audit_state is not None else None
            self.index.seal(reason, now, audit)
        except OSError:
            logger.error("sluicegate: recording: cannot seal the session index")
        finally:
            self.index.close()

    # -- retention --------------------------------------------------------------------------

    def enforce_retention(self) -> list[str]:
        """Delete closed sessions older than the retention age, then oldest first past the size
        budget. Open sessions are never deleted. Returns the relative paths deleted."""
        now = self.clock()
        open_paths = {s.path for s in self.sessions.values()}
        found: list[tuple[float, int, Path]] = []
        total = 0
        for path in self.directory.glob(f"*/*{SESSION_SUFFIX}"):
            sidecar = path.with_name(path.name + chain.CHAIN_SUFFIX)
            try:
                st = path.stat()
                size = st.st_size + (sidecar.stat().st_size if sidecar.exists() else 0)
            except OSError:
                continue
            total += size
            if path not in open_paths:
                found.append((st.st_mtime, size, path))
        found.sort()
        deleted: list[str] = []
        limits = self.limits
        for mtime, size, path in found:
            too_old = (
                limits.retention_seconds is not None and now - mtime > limits.retention_seconds
            )
            too_big = limits.retention_bytes is not None and total > limits.retention_bytes
            if not (too_old or too_big):
                continue
            relative = str(path.relative_to(self.directory))
            try:  # indexed first: a deletion the index does not know of is tampering
                self.index.deleted([relative], "retention")
            except OSError:
                logger.error("sluicegate: recording: cannot index a deletion; kept %s", relative)
                break
            for victim in (path, path.with_name(path.name + chain.CHAIN_SUFFIX)):
                victim.unlink(missing_ok=True)
            total -= size
            deleted.append(relative)
        if deleted:
            logger.info("sluicegate: recording retention deleted %d session(s)", len(deleted))
        return deleted
