"""One gateway process per recording directory: an advisory lock held while it records.

Two gateways writing one directory would interleave their runs' indexes and audit lines and make
`sessions verify` report tampering that never happened. The recorder takes an exclusive `flock`
on `<directory>/.gateway.lock` before its first run and keeps it until the process ends (config
reloads keep it; the kernel releases it when the process dies, however it dies). The file names
the holder (pid, host, since), which is how `sessions verify` tells a session a running gateway
is still writing from one whose gateway is gone.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any, Final

LOCK_NAME: Final = ".gateway.lock"

# directory (resolved) -> file descriptor holding its lock, for this process
_held: dict[Path, int] = {}


class DirectoryLocked(Exception):
    """Another process holds the directory."""

    def __init__(self, directory: Path, holder: dict[str, Any] | None) -> None:
        who = (
            f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
            if holder
            else "another process"
        )
        super().__init__(
            f"{directory} is being recorded to by another gateway ({who}); give each gateway "
            "process its own recording.directory"
        )
        self.holder = holder


def acquire(directory: Path) -> None:
    """Hold `directory` for this process (idempotent); raise DirectoryLocked if another does."""
    directory = directory.resolve()
    if directory in _held:
        return
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read(fd)
        os.close(fd)
        raise DirectoryLocked(directory, holder) from None
    except BaseException:
        os.close(fd)
        raise
    since = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    record = {"pid": os.getpid(), "host": socket.gethostname(), "since": since}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode() + b"\n", 0)
    _held[directory] = fd


def release_others(keep: Path | None) -> None:
    """Let go of every directory this process holds except `keep` (a reload moved elsewhere)."""
    keep = keep.resolve() if keep is not None else None
    for directory in [d for d in _held if d != keep]:
        os.close(_held.pop(directory))


def holder(directory: Path) -> dict[str, Any] | None:
    """Who holds `directory` now (pid, host, since), or None when no running process does."""
    directory = directory.resolve()
    if directory in _held:
        return {"pid": os.getpid(), "host": socket.gethostname(), "self": True}
    try:
        fd = os.open(directory / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd) or {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read(fd: int) -> dict[str, Any] | None:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
