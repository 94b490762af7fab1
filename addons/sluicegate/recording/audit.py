"""The audit log: one JSON line per recorded flow, for SIEM ingestion.

Each line is written with a single unbuffered `write` (so it is on its way to disk before the next
flow, and concurrent tail readers never see half a line). The file is opened in append mode and
reopened when it was rotated away (logrotate `create` or a manual move).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sluicegate.recording.store import RecordingUnavailable


class AuditLog:
    def __init__(self, path: Path, fsync: bool = False) -> None:
        self.path = path
        self.fsync = fsync
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._fd = self._open()

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

    def write(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, separators=(",", ":"), sort_keys=True).encode() + b"\n"
        try:
            self._reopen_if_rotated()
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view) :]
            if self.fsync:
                os.fsync(self._fd)
        except OSError:
            raise RecordingUnavailable(
                "audit_log_unavailable", "the audit log could not be written"
            ) from None

    def close(self) -> None:
        os.close(self._fd)
