"""Recorded sessions for the console: listing with verification status, and flows as recorded.

Reads what the recorder wrote (`recording/`): `<identity>/<session>.mitm` files of tnetstring
records (decoded with `recording.tnetstring`, no mitmproxy) and their signed `.mitm.chain`
sidecars. Verification is what `sessions verify` does, against the gateway's own public key:
each session's chain (`chain.verify`, cached per file version), that it sits where its signed
opening says, and the signed session index of every gateway run (`index.verify_index`,
`index.check_sessions`): deleted, unindexed, cut and crashed sessions, broken or forked runs.
(The audit log's own check stays with `sessions verify`.) It runs on a worker thread, so a large
directory never stalls the proxy's event loop.

Paths come from the browser: a session is named by `<directory>/<file>` relative to the
recording directory and must be exactly one of the listed files (no `..`, no symlinks out).
Sealed originals (encrypted pre-redaction bodies) are never decoded here.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sluicegate.recording import chain, tnetstring
from sluicegate.recording import index as index_mod
from sluicegate.recording.facts import decision, rules_fired

SESSION_SUFFIX = ".mitm"
_RELATIVE = re.compile(r"[A-Za-z0-9._@-]{1,80}/[A-Za-z0-9._-]{1,120}\.mitm")
MAX_SESSIONS = 500


@dataclasses.dataclass(frozen=True)
class SessionInfo:
    name: str  # relative to the recording directory: <identity-dir>/<file>.mitm
    path: Path
    identity: str
    created: float | None
    flows: int
    size: int
    sealed: str | None  # the seal's reason, None while open (or killed)
    status: str  # ok | unsealed | crashed | failed
    findings: tuple[str, ...]
    key_trusted: bool


@dataclasses.dataclass(frozen=True)
class Overview:
    """The directory as `sessions verify` sees it (newest sessions first)."""

    sessions: list[SessionInfo]
    findings: list[str]  # directory-level: deleted sessions, runs, no index...
    failed: bool
    runs: list[tuple[str, str, str]]  # (run, state, gateway)


@dataclasses.dataclass(frozen=True)
class FlowRecord:
    session: str
    index: int
    state: dict[str, Any]

    @property
    def id(self) -> str:
        flow_id = self.state.get("id")
        return flow_id.decode() if isinstance(flow_id, bytes) else str(flow_id)

    @property
    def meta(self) -> dict[str, Any]:
        metadata = self.state.get("metadata")
        sg = metadata.get("sluicegate") if isinstance(metadata, dict) else None
        return sg if isinstance(sg, dict) else {}

    def summary(self) -> dict[str, Any]:
        req = self.state.get("request") or {}
        resp = self.state.get("response")
        sg = self.meta
        caller: dict[str, Any] = sg["caller"] if isinstance(sg.get("caller"), dict) else {}
        return {
            "flow_id": self.id,
            "session": self.session,
            "index": self.index,
            "timestamp": req.get("timestamp_start"),
            "identity": caller.get("subject") or "anonymous",
            "route": sg.get("route"),
            "method": text(req.get("method")),
            "host": text(req.get("host")),
            "path": text(req.get("path")),
            "status": resp.get("status_code") if isinstance(resp, dict) else None,
            "decision": decision(sg, self.state.get("error") is not None),
            "rules": rules_fired(sg),
        }


def text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


class Recordings:
    def __init__(self, directory: Path, trusted_key: Ed25519PublicKey | None = None) -> None:
        self.directory = directory
        self.trusted_key = trusted_key
        self._lock = threading.Lock()
        self._verdicts: dict[str, tuple[tuple[int, int, int, int], SessionInfo, chain.Verdict]] = {}

    # -- sessions -----------------------------------------------------------------------------

    def session_files(self, limit: int | None = MAX_SESSIONS) -> list[Path]:
        if not self.directory.is_dir():
            return []
        files = [
            p
            for p in self.directory.glob(f"*/*{SESSION_SUFFIX}")
            if p.is_file() and not p.is_symlink() and not p.parent.is_symlink()
        ]
        files.sort(key=lambda p: (p.name, p.parent.name), reverse=True)  # newest first
        return files if limit is None else files[:limit]

    def sessions(self) -> list[SessionInfo]:
        """The newest sessions, each verified alone (cached while its files are unchanged)."""
        return [self.info(path) for path in self.session_files()]

    def overview(self) -> Overview:
        """Every session checked as `sessions verify` checks the directory (blocking: call it
        on a worker thread); the newest MAX_SESSIONS are listed."""
        files = self.session_files(None)
        verdicts: dict[str, chain.Verdict] = {}
        infos: dict[str, SessionInfo] = {}
        for path in files:
            info = self.info(path)
            infos[info.name] = info
            verdicts[info.name] = self._verdicts[info.name][2]
        findings: list[str] = []
        failed = False
        indexed = index_mod.verify_index(self.directory, self.trusted_key)
        per_session: dict[str, list[chain.Finding]] = {}
        runs: list[tuple[str, str, str]] = []
        if indexed is None:
            if files:
                findings.append(
                    f"no_index: {self.directory} has no session index: sessions could have "
                    "been deleted unnoticed"
                )
                failed = True
        else:
            per_session = index_mod.check_sessions(indexed, verdicts)
            for finding in indexed.findings + per_session.pop("", []):
                findings.append(str(finding))
                failed = failed or finding.fatal
            runs = [(r.name, r.state, str(r.opening.get("gateway", "?"))) for r in indexed.runs]
        listed = []
        for path in files[:MAX_SESSIONS]:
            info = infos[f"{path.parent.name}/{path.name}"]
            verdict = verdicts[info.name]
            extra = list(per_session.get(info.name, []))
            if verdict.session is not None and verdict.session != info.name:
                extra.append(
                    chain.Finding(
                        "misplaced", f"recorded as {verdict.session}: moved or copied here"
                    )
                )
            if extra:
                status = info.status
                if any(f.fatal for f in extra):
                    status = "failed"
                elif status == "unsealed" and any(f.kind == "session_crashed" for f in extra):
                    status = "crashed"
                info = dataclasses.replace(
                    info, status=status, findings=info.findings + tuple(str(f) for f in extra)
                )
            failed = failed or info.status == "failed"
            listed.append(info)
        return Overview(listed, findings, failed, runs)

    def resolve(self, name: str) -> Path | None:
        """The session file a browser-supplied name stands for, or None."""
        if not _RELATIVE.fullmatch(name) or ".." in name.split("/"):
            return None
        path = self.directory / name
        if path not in self.session_files():
            return None
        return path

    def info(self, path: Path) -> SessionInfo:
        name = f"{path.parent.name}/{path.name}"
        sidecar = path.with_name(path.name + chain.CHAIN_SUFFIX)
        try:
            st = path.stat()
            cst = sidecar.stat() if sidecar.exists() else None
        except OSError:
            st, cst = None, None
        stamp = (
            st.st_mtime_ns if st else 0,
            st.st_size if st else 0,
            cst.st_mtime_ns if cst else 0,
            cst.st_size if cst else 0,
        )
        with self._lock:
            cached = self._verdicts.get(name)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        info, verdict = self._verify(name, path, sidecar)
        with self._lock:
            self._verdicts[name] = (stamp, info, verdict)
        return info

    def _verify(self, name: str, path: Path, sidecar: Path) -> tuple[SessionInfo, chain.Verdict]:
        try:
            data = path.read_bytes()
        except OSError:
            data = b""
        try:
            chain_text = sidecar.read_text()
        except OSError:
            chain_text = None
        if chain_text is None:
            spans, _ = chain.split_records(data)
            missing = chain.Finding("no_chain", f"{sidecar.name} is missing")
            return SessionInfo(
                name, path, path.parent.name, None, len(spans), len(data), None, "failed",
                (str(missing),), False,
            ), chain.Verdict(None, 0, len(spans), False, None, False, [missing])  # fmt: skip
        summary = chain.summarize(chain_text)
        opening = summary.get("opening") or {}
        seal = summary.get("seal")
        verdict = chain.verify(data, chain_text, trusted_key=self.trusted_key, record_id=_record_id)
        created = opening.get("created")
        info = SessionInfo(
            name=name,
            path=path,
            identity=str(opening.get("identity") or path.parent.name),
            created=float(created) if isinstance(created, (int, float)) else None,
            flows=verdict.records_in_file,
            size=len(data),
            sealed=str(seal.get("reason")) if isinstance(seal, dict) else None,
            status=verdict.status,
            findings=tuple(str(f) for f in verdict.findings),
            key_trusted=verdict.key_trusted,
        )
        return info, verdict

    # -- flows --------------------------------------------------------------------------------

    def flows(self, name: str) -> list[FlowRecord]:
        """The flows of one session as recorded (blocking: call it on a worker thread)."""
        path = self.resolve(name)
        if path is None:
            return []
        data = path.read_bytes()
        spans, _ = chain.split_records(data)
        records = []
        for index, (offset, length) in enumerate(spans):
            try:
                state = tnetstring.loads(data[offset : offset + length])
            except tnetstring.TNetStringError:
                continue
            if isinstance(state, dict):
                records.append(FlowRecord(name, index, state))
        return records

    def flow(self, name: str, index: int) -> FlowRecord | None:
        path = self.resolve(name)
        if path is None or index < 0:
            return None
        data = path.read_bytes()
        spans, _ = chain.split_records(data)
        if index >= len(spans):
            return None
        offset, length = spans[index]
        try:
            state = tnetstring.loads(data[offset : offset + length])
        except tnetstring.TNetStringError:
            return None
        return FlowRecord(name, index, state) if isinstance(state, dict) else None


def _record_id(record: bytes) -> str | None:
    try:
        state = tnetstring.loads(record)
    except tnetstring.TNetStringError:
        return None
    if isinstance(state, dict):
        flow_id = state.get("id")
        return flow_id.decode() if isinstance(flow_id, bytes) else flow_id
    return None


def display_path(path: Path) -> str:
    """An absolute path for the mitmweb command line."""
    return os.path.abspath(path)
