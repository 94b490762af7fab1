"""Structured logs: one JSON object per line, beside mitmproxy's text log.

Two kinds of line: `"event": "flow"` for every finished flow (request id, caller, groups, route,
method, host, path without its query, status, decision, refusal code, rule counts, duration), and
`"event": "log"` for the gateway's own log records (`sluicegate.*` loggers: level, logger,
message). Flow lines are built from the recordable facts only, which hold no values (tokens are
fingerprints, secrets are counts per rule), and queries are left out.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


class JsonLog:
    """Appends JSON lines to a file (reopened when logrotate moved it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def write(self, obj: Mapping[str, Any]) -> None:
        line = json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"
        with self._lock:
            try:
                if os.stat(self.path).st_ino != os.fstat(self._fd).st_ino:
                    os.close(self._fd)
                    self._fd = self._open()
            except FileNotFoundError:
                os.close(self._fd)
                self._fd = self._open()
            os.write(self._fd, line)

    def close(self) -> None:
        with self._lock:
            os.close(self._fd)


def flow_line(
    sg: Mapping[str, Any],
    *,
    method: str,
    host: str,
    path: str,
    status: int | None,
    decision: str,
    rules: Mapping[str, int],
    error: bool,
) -> dict[str, Any]:
    caller = _section(sg, "caller")
    refusal = _section(sg, "refusal")
    timings = _section(sg, "timings")
    stream = _section(sg, "stream")
    return {
        "time": _now(),
        "level": "info",
        "event": "flow",
        "request_id": sg.get("request_id"),
        "caller": caller.get("subject"),
        "groups": caller.get("groups", []),
        "token_fingerprint": caller.get("token_fingerprint"),
        "route": sg.get("route"),
        "method": method,
        "host": host,
        "path": path.split("?", 1)[0],
        "status": status,
        "decision": decision,
        "refusal": refusal.get("code"),
        "rules": dict(rules),
        "stream_cut": stream.get("cut"),
        "error": error,
        "duration_ms": timings.get("total_ms"),
    }


class JsonLogHandler(logging.Handler):
    """The gateway's log records as `"event": "log"` lines."""

    def __init__(self, log: JsonLog) -> None:
        super().__init__(logging.INFO)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.log.write(
                {
                    "time": _now(),
                    "level": record.levelname.lower(),
                    "event": "log",
                    "logger": record.name,
                    "message": record.getMessage(),
                }
            )
        except Exception:
            self.handleError(record)


def _section(sg: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = sg.get(name)
    return value if isinstance(value, Mapping) else {}
