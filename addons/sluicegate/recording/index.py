"""The session index: a signed, append-only account of every session a gateway run recorded.

Each session file verifies on its own (chain.py), but a session deleted whole, copied to a second
name or moved to another caller's directory leaves nothing behind that its own chain could show.
So each gateway run (one `SessionStore`: a process start or a config reload) also keeps an index
in `<recording directory>/index/<run>.index`, JSON lines, each signed with the recording key and
linked to the one before (`seq`, `prev` = SHA-256 of the previous line as written):

- `open`: the run (gateway name, host, pid, start, key, audit log path) and the run before it
  in this directory (`previous`: its name, how many complete lines it had, the hash of its last
  line and whether it was sealed), so runs form one chain and a run cut or deleted later breaks
  the next one's link;
- `session`: a session opened (written before its first record), with its identity and genesis;
- `checkpoint`: every second at most, the flow count and chain head of each session that grew, and
  the audit log's line count and head: what a crash may lose is what came after the last one;
- `session_sealed`: a session closed (rotation, idle, shutdown) with its final count and head;
- `deleted`: sessions retention is about to delete;
- `seal`: the run ended cleanly (shutdown or reload), with the audit log's count and head.

The `open` line is written (and with `fsync`, made durable with the file's name) before the run
opens its audit log, so every audit line names a run whose signed opening is already on disk: a
run killed before its first checkpoint is known (its audit lines start at the run's genesis and
verify as an unsigned tail), and audit lines of a run no index opened are forged or copied.

`verify_index` reads every index of a directory and says, run by run, what must be on disk; the
CLI (`sessions verify`) compares that with the session files and the audit log. What a local
index cannot show: the newest run deleted whole with all its sessions (nothing after it refers to
it), or the newest lines of a run that is still open or was killed. Ship audit lines or index
heads off the machine for that (docs/DEPLOYMENT.md).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import json
import os
import secrets
import socket
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sluicegate.recording import chain
from sluicegate.recording.chain import Finding

INDEX_DIR = "index"
INDEX_SUFFIX = ".index"
INDEX_VERSION = 1
_GENESIS_PREFIX = b"sluicegate-index-v1\x00"

AuditState = tuple[int, str]  # (lines written by this run, hash of the last one)


def genesis(run: str) -> str:
    return hashlib.sha256(_GENESIS_PREFIX + run.encode()).hexdigest()


def line_hash(line: bytes) -> str:
    """What the next line's `prev` holds: SHA-256 of a line as written (without its newline)."""
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


@dataclasses.dataclass(frozen=True)
class RunTail:
    """The end of an index file as the next run found it."""

    run: str
    lines: int  # complete lines
    last: str  # line_hash of the last complete line
    sealed: bool

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_lines(data: bytes) -> tuple[list[bytes], bytes]:
    """Complete lines (newline-terminated) and what follows the last one (a cut write)."""
    *complete, rest = data.split(b"\n")
    return complete, rest


def tail_of(path: Path) -> RunTail | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    lines, _ = read_lines(data)
    if not lines:
        return RunTail(path.name.removesuffix(INDEX_SUFFIX), 0, "", False)
    try:
        last = json.loads(lines[-1])
    except ValueError:
        last = {}
    sealed = isinstance(last, dict) and last.get("type") == "seal"
    return RunTail(path.name.removesuffix(INDEX_SUFFIX), len(lines), line_hash(lines[-1]), sealed)


def latest_run(index_dir: Path) -> RunTail | None:
    """The run a new run follows: the one no other run names as its predecessor (the newest
    such by name when several do, which verification reports as a fork)."""
    files = sorted(index_dir.glob(f"*{INDEX_SUFFIX}"))
    if not files:
        return None
    named: set[str] = set()
    for path in files:
        opening = _first_line(path)
        previous = opening.get("previous") if opening else None
        if isinstance(previous, dict) and isinstance(previous.get("run"), str):
            named.add(previous["run"])
    tips = [p for p in files if p.name.removesuffix(INDEX_SUFFIX) not in named]
    return tail_of((tips or files)[-1])


def _audit_location(directory: Path, audit_log: Path | None) -> str | None:
    """Where the run's audit log is: relative to the recording directory when inside it (so a
    copied or moved directory still finds it), else absolute."""
    if audit_log is None:
        return None
    path = audit_log.resolve()
    try:
        return str(path.relative_to(directory.resolve()))
    except ValueError:
        return str(path)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _first_line(path: Path) -> dict[str, Any] | None:
    try:
        with path.open("rb") as f:
            first = f.readline()
        entry = json.loads(first)
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) else None


class RunIndex:
    """The index of one gateway run: appends signed, chained lines (one `write` each)."""

    def __init__(
        self,
        directory: Path,
        signer: chain.Signer,
        *,
        gateway: str,
        now: float,
        fsync: bool = False,
        audit_log: Path | None = None,
    ) -> None:
        index_dir = directory / INDEX_DIR
        created_dir = not index_dir.is_dir()
        index_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        stamp = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        self.run = f"{stamp}-{os.getpid()}-{secrets.token_hex(3)}"
        self.path = index_dir / f"{self.run}{INDEX_SUFFIX}"
        self.signer = signer
        self.fsync = fsync
        self.seq = 0
        self.head = genesis(self.run)
        self.sealed = False
        previous = latest_run(index_dir)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        self._fd = os.open(self.path, flags, 0o600)
        if fsync:  # the file's name too: a run's audit lines must never outlive its index
            _fsync_directory(index_dir)
            if created_dir:
                _fsync_directory(directory)
        self.append(
            {
                "type": "open",
                "version": INDEX_VERSION,
                "gateway": gateway,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": now,
                "key_id": signer.key_id,
                "public_key": signer.public_b64,
                "previous": previous.as_dict() if previous is not None else None,
                "audit_log": _audit_location(directory, audit_log),
            }
        )

    def append(self, entry: dict[str, Any]) -> None:
        """Sign and write one line; raises OSError (the caller decides what that means)."""
        line = chain.dump_line(
            self.signer.signed({**entry, "run": self.run, "seq": self.seq, "prev": self.head})
        )
        view = memoryview(line)
        while view:
            view = view[os.write(self._fd, view) :]
        if self.fsync:
            os.fsync(self._fd)
        self.seq += 1
        self.head = line_hash(line)

    def session(self, relative: str, identity: str, created: float, chain_genesis: str) -> None:
        self.append(
            {
                "type": "session",
                "session": relative,
                "identity": identity,
                "created": created,
                "genesis": chain_genesis,
            }
        )

    def session_sealed(self, relative: str, count: int, head: str, size: int, reason: str) -> None:
        self.append(
            {
                "type": "session_sealed",
                "session": relative,
                "count": count,
                "head": head,
                "bytes": size,
                "reason": reason,
            }
        )

    def checkpoint(
        self, now: float, sessions: dict[str, tuple[int, str]], audit: AuditState | None
    ) -> None:
        entry: dict[str, Any] = {
            "type": "checkpoint",
            "time": now,
            "sessions": {k: list(v) for k, v in sessions.items()},
        }
        if audit is not None:
            entry["audit"] = list(audit)
        self.append(entry)

    def deleted(self, relatives: list[str], reason: str) -> None:
        self.append({"type": "deleted", "sessions": relatives, "reason": reason})

    def seal(self, reason: str, now: float, audit: AuditState | None) -> None:
        if self.sealed:
            return
        entry: dict[str, Any] = {"type": "seal", "reason": reason, "time": now}
        if audit is not None:
            entry["audit"] = list(audit)
        self.append(entry)
        self.sealed = True

    def close(self) -> None:
        os.close(self._fd)


# -- verification ---------------------------------------------------------------------------------


@dataclasses.dataclass
class IndexedSession:
    """What the index says about one session."""

    run: str
    identity: str
    genesis: str
    checkpoint: tuple[int, str] | None = None  # the last (count, head) checkpointed
    sealed: tuple[int, str, str] | None = None  # (count, head, reason)
    deleted: bool = False


@dataclasses.dataclass
class Run:
    name: str
    opening: dict[str, Any]
    lines: int
    sealed: bool
    # sealed | crashed (a later run found it unsealed) | open (the newest, unsealed)
    state: str = "open"
    audit: AuditState | None = None  # the last audit (count, head) the run signed
    audit_final: bool = False  # `audit` is from the seal: nothing after it

    @property
    def started(self) -> float:
        value = self.opening.get("started")
        return float(value) if isinstance(value, int | float) else 0.0


@dataclasses.dataclass
class IndexVerdict:
    runs: list[Run]
    sessions: dict[str, IndexedSession]
    findings: list[Finding]

    @property
    def newest(self) -> Run | None:
        return self.runs[-1] if self.runs else None


def verify_index(
    directory: Path, trusted_key: Ed25519PublicKey | None = None
) -> IndexVerdict | None:
    """Every index of `directory`, verified and linked; None when there is no index at all."""
    index_dir = directory / INDEX_DIR
    files = sorted(index_dir.glob(f"*{INDEX_SUFFIX}")) if index_dir.is_dir() else []
    if not files:
        return None
    findings: list[Finding] = []
    runs: dict[str, Run] = {}
    tails: dict[str, RunTail] = {}
    sessions: dict[str, IndexedSession] = {}
    for path in files:
        name = path.name.removesuffix(INDEX_SUFFIX)
        run = _verify_run(name, path.read_bytes(), trusted_key, sessions, findings)
        if run is not None:
            runs[name] = run
            tail = tail_of(path)
            if tail is not None:
                tails[name] = tail
    ordered = _link_runs(runs, tails, findings)
    return IndexVerdict(ordered, sessions, findings)


def _verify_run(
    name: str,
    data: bytes,
    trusted_key: Ed25519PublicKey | None,
    sessions: dict[str, IndexedSession],
    findings: list[Finding],
) -> Run | None:
    where = f"index {name}"
    lines, rest = read_lines(data)
    if rest:
        findings.append(
            Finding("index_cut", f"{where}: its last line is cut short (a crash)", fatal=False)
        )
    entries: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError
        except ValueError:
            findings.append(Finding("index_unreadable", f"{where}: line {number} is not JSON"))
            return None
        entries.append(entry)
    if not entries or entries[0].get("type") != "open":
        findings.append(Finding("index_no_opening", f"{where}: no signed opening line"))
        return None
    opening = entries[0]
    key = _key(opening, trusted_key, where, findings)
    head = genesis(name)
    run = Run(name, opening, len(lines), sealed=False)
    for number, (entry, line) in enumerate(zip(entries, lines, strict=True), 1):
        if key is not None and not _signed(key, entry):
            findings.append(Finding("index_bad_signature", f"{where}: line {number} not signed"))
        if entry.get("run") != name or entry.get("seq") != number - 1 or entry.get("prev") != head:
            findings.append(
                Finding("index_broken", f"{where}: line {number} does not follow line {number - 1}")
            )
        head = line_hash(line)
        if run.sealed:
            findings.append(Finding("index_after_seal", f"{where}: line {number} follows its seal"))
        try:
            _apply(entry, run, sessions, where, findings)
        except (KeyError, IndexError, TypeError, ValueError):  # edited: a finding, not a crash
            findings.append(
                Finding("index_line_malformed", f"{where}: line {number} lacks fields of its type")
            )
    return run


def _apply(
    entry: dict[str, Any],
    run: Run,
    sessions: dict[str, IndexedSession],
    where: str,
    findings: list[Finding],
) -> None:
    kind = entry.get("type")
    relative = str(entry.get("session"))
    if kind == "session":
        if relative in sessions:
            findings.append(Finding("index_duplicate", f"{where}: {relative} indexed twice"))
        sessions[relative] = IndexedSession(
            run.name, str(entry.get("identity")), str(entry.get("genesis"))
        )
    elif kind in ("session_sealed", "checkpoint", "deleted"):
        names = (
            list(entry.get("sessions") or {})
            if kind == "checkpoint"
            else list(entry.get("sessions") or [])
            if kind == "deleted"
            else [relative]
        )
        for name in names:
            known = sessions.get(name)
            if known is None:
                if kind != "deleted":  # retention may delete sessions of runs no longer indexed
                    findings.append(Finding("index_unknown", f"{where}: {name} was never opened"))
                continue
            if kind == "deleted":
                known.deleted = True
            elif kind == "checkpoint":
                count, head = entry["sessions"][name]
                known.checkpoint = (int(count), str(head))
            else:
                known.sealed = (int(entry["count"]), str(entry["head"]), str(entry["reason"]))
        if kind == "checkpoint" and isinstance(entry.get("audit"), list):
            run.audit = (int(entry["audit"][0]), str(entry["audit"][1]))
    elif kind == "seal":
        run.sealed = True
        if isinstance(entry.get("audit"), list):
            run.audit = (int(entry["audit"][0]), str(entry["audit"][1]))
            run.audit_final = True
    elif kind != "open":
        findings.append(Finding("index_line_unknown", f"{where}: a line of type {kind!r}"))


def _link_runs(
    runs: dict[str, Run], tails: dict[str, RunTail], findings: list[Finding]
) -> list[Run]:
    """Order runs by their `previous` links and check each link against the run it names."""
    successors: dict[str | None, list[Run]] = {}
    for run in runs.values():
        found = run.opening.get("previous")
        previous: dict[str, Any] = found if isinstance(found, dict) else {}
        named = previous.get("run") if isinstance(previous.get("run"), str) else None
        successors.setdefault(named, []).append(run)
        if named is None:
            continue
        before = runs.get(named)
        if before is None:
            findings.append(
                Finding(
                    "run_missing",
                    f"run {run.name} follows run {named}, whose index is gone "
                    "(deleted with its sessions?)",
                )
            )
            continue
        tail = tails.get(named)
        lines, last = previous.get("lines"), previous.get("last")
        if tail is None or (tail.lines, tail.last) != (lines, last):
            findings.append(
                Finding(
                    "run_changed",
                    f"index {named} no longer ends where run {run.name} found it "
                    f"({lines} lines): lines were removed or added afterwards",
                )
            )
        if previous.get("sealed"):
            before.state = "sealed"
        elif not before.sealed:
            before.state = "crashed"
    firsts = successors.get(None, [])
    if len(firsts) > 1:
        findings.append(
            Finding(
                "run_unlinked",
                f"{len(firsts)} runs claim to be the first in this directory: "
                + ", ".join(r.name for r in firsts),
            )
        )
    for named, after in successors.items():
        if named is not None and len(after) > 1:
            findings.append(
                Finding(
                    "run_fork",
                    f"runs {', '.join(r.name for r in after)} all follow {named}: two gateways "
                    "recorded to this directory at once",
                )
            )
    ordered: list[Run] = []
    queue = sorted(firsts, key=lambda r: r.started)
    seen: set[str] = set()
    while queue:
        run = queue.pop(0)
        if run.name in seen:
            continue
        seen.add(run.name)
        ordered.append(run)
        queue.extend(sorted(successors.get(run.name, []), key=lambda r: r.started))
    ordered += sorted((r for r in runs.values() if r.name not in seen), key=lambda r: r.started)
    for run in ordered:
        if run.sealed:
            run.state = "sealed"
    return ordered


def _key(
    opening: dict[str, Any],
    trusted: Ed25519PublicKey | None,
    where: str,
    findings: list[Finding],
) -> Ed25519PublicKey | None:
    try:
        embedded = Ed25519PublicKey.from_public_bytes(base64.b64decode(opening["public_key"]))
    except (KeyError, ValueError, TypeError):
        findings.append(Finding("index_bad_key", f"{where}: no usable public key"))
        embedded = None
    if trusted is None:
        return embedded
    if embedded is None or chain.public_key_id(embedded) != chain.public_key_id(trusted):
        findings.append(Finding("index_untrusted_key", f"{where}: signed by another key"))
    return trusted


def _signed(key: Ed25519PublicKey, entry: dict[str, Any]) -> bool:
    return chain.signature_ok(key, entry)


# -- sessions on disk against the index -----------------------------------------------------------


def check_sessions(
    verdict: IndexVerdict,
    on_disk: dict[str, chain.Verdict],
) -> dict[str, list[Finding]]:
    """Findings per session (key "" for the directory): indexed sessions missing from disk,
    sessions on disk the index never saw, files not where their chain says they belong, seals
    and checkpoints a session no longer reaches."""
    out: dict[str, list[Finding]] = {"": []}
    runs = {run.name: run for run in verdict.runs}
    for relative, indexed in sorted(verdict.sessions.items()):
        found = on_disk.get(relative)
        if found is None:
            if not indexed.deleted:
                out[""].append(
                    Finding(
                        "session_missing",
                        f"{relative} (identity {indexed.identity}, run {indexed.run}) is in the "
                        "index but not on disk: deleted",
                    )
                )
            continue
        problems = out.setdefault(relative, [])
        run = runs.get(indexed.run)
        if indexed.sealed is not None:
            count, head, reason = indexed.sealed
            if not found.sealed or found.flows_in_chain != count or found.head != head:
                problems.append(
                    Finding(
                        "session_cut",
                        f"the index recorded this session sealed ({reason}) with {count} flow(s); "
                        f"its chain now has {found.flows_in_chain}"
                        + ("" if found.sealed else " and no seal")
                        + ": its tail was cut",
                    )
                )
        elif indexed.checkpoint is not None and found.flows_in_chain < indexed.checkpoint[0]:
            problems.append(
                Finding(
                    "session_cut",
                    f"the index checkpointed {indexed.checkpoint[0]} flow(s); the chain has "
                    f"{found.flows_in_chain}: its tail was cut",
                )
            )
        elif (
            indexed.checkpoint is not None
            and found.head_at(indexed.checkpoint[0]) != indexed.checkpoint[1]
        ):
            problems.append(
                Finding("session_rewritten", "the chain differs from what the index checkpointed")
            )
        if not found.sealed and indexed.sealed is None and run is not None:
            if run.state == "sealed":
                problems.append(
                    Finding(
                        "session_cut",
                        f"run {run.name} ended cleanly but this session has no seal: cut",
                    )
                )
            elif run.state == "crashed":
                problems.append(
                    Finding(
                        "session_crashed",
                        f"run {run.name} stopped without closing it (crash or kill); flows after "
                        "the last checkpoint may be missing",
                        fatal=False,
                    )
                )
    for relative, found in sorted(on_disk.items()):
        if relative in verdict.sessions:
            continue
        empty = found.flows_in_chain == 0
        out.setdefault(relative, []).append(
            Finding(
                "session_unindexed",
                "not in any index: copied, moved or inserted"
                + (" (empty: possibly a run stopped while opening it)" if empty else ""),
                fatal=not empty,
            )
        )
    return out
