"""Tamper evidence for session files: a signed hash chain over the exact bytes of each record.

A session file (`*.mitm`) stays a plain mitmproxy flow dump that stock tools load. Beside it, a
sidecar (`*.mitm.chain`, JSON lines) holds one entry per record: where it starts, its length, the
SHA-256 of its bytes and a chain hash linking it to the previous entry. A final `seal` line (on
rotation and shutdown) signs the head and the flow count, so the tail cannot be cut off
unnoticed. A session that was never sealed (the gateway was killed) still verifies.

Version 1 signs every flow line with the gateway's Ed25519 key (~33 us per flow). Version 2 (what
the gateway writes) chains every field of a flow line (offset, length, digest, audit hash) into
the chain hash and signs a `head` line (count, head, bytes) every `HEAD_EVERY_FLOWS` flows or
`HEAD_EVERY_SECONDS`, whichever comes first, and at the seal: a signed head covers every flow
before it, so the sidecar still cannot be rewritten without the key. Flows after the last signed
head of an unsealed session (the gateway was killed, or is still running) are reported as an
`unsigned_tail`: consistent, but not yet proven. Both versions verify.

Verification compares the records found in the file with the chain and says which flow was
modified, removed, inserted or moved, by index and flow id.
"""

from __future__ import annotations

import base64
import dataclasses
import difflib
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

CHAIN_VERSION = 2
VERSIONS = (1, 2)
CHAIN_SUFFIX = ".chain"
HEAD_EVERY_FLOWS = 256
HEAD_EVERY_SECONDS = 1.0
_GENESIS_PREFIX = b"sluicegate-chain-v1\x00"


class ChainKeyError(ValueError):
    """A signing or verification key could not be loaded (never carries key material)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def canonical(entry: dict[str, Any]) -> bytes:
    """The bytes a chain line's signature covers: the line without `sig`, canonical JSON."""
    body = {k: v for k, v in entry.items() if k != "sig"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def genesis(session_id: str) -> str:
    """The chain's starting value: binds the chain to its session, so entries cannot be moved."""
    return hashlib.sha256(_GENESIS_PREFIX + session_id.encode()).hexdigest()


def link(prev: str, index: int, flow_id: str, digest: str) -> str:
    """Version 1: the chain hash after appending record `index` (flow `flow_id`, SHA-256
    `digest`); the rest of the line is covered by its signature."""
    return hashlib.sha256(f"{prev}\n{index}\n{flow_id}\n{digest}".encode()).hexdigest()


def link_v2(
    prev: str, index: int, flow_id: str, digest: str, offset: int, length: int, audit: str | None
) -> str:
    """Version 2: the chain hash after record `index`, over every field of its unsigned line, so
    the next signed head covers them all."""
    fields = f"v2\n{prev}\n{index}\n{flow_id}\n{digest}\n{offset}\n{length}\n{audit or ''}"
    return hashlib.sha256(fields.encode()).hexdigest()


def entry_link(version: int, prev: str, index: int, entry: dict[str, Any]) -> str:
    """The chain hash a flow line of a chain of `version` should carry after `prev`."""
    flow_id, digest = str(entry.get("flow_id")), str(entry.get("sha256"))
    if version == 1:
        return link(prev, index, flow_id, digest)
    audit = entry.get("audit")
    return link_v2(
        prev,
        index,
        flow_id,
        digest,
        entry.get("offset", -1) if type(entry.get("offset")) is int else -1,
        entry.get("length", -1) if type(entry.get("length")) is int else -1,
        audit if isinstance(audit, str) else None,
    )


def public_key_id(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class Signer:
    """Signs chain lines with an Ed25519 private key."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_key = key.public_key()
        self.key_id = public_key_id(self.public_key)
        raw = self.public_key.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public_b64 = _b64(raw)

    @classmethod
    def from_pem(cls, pem: str | bytes) -> Signer:
        data = pem.encode() if isinstance(pem, str) else pem
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise ChainKeyError("not a PEM private key (unencrypted PKCS#8 expected)") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ChainKeyError("the recording signing key must be an Ed25519 key")
        return cls(key)

    @classmethod
    def generate(cls) -> Signer:
        return cls(Ed25519PrivateKey.generate())

    def private_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def signed(self, entry: dict[str, Any]) -> dict[str, Any]:
        return {**entry, "sig": _b64(self._key.sign(canonical(entry)))}


def load_public_key(pem: str | bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM (a private key PEM gives its public half)."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        if b"PRIVATE KEY" in data:
            return Signer.from_pem(data).public_key
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise ChainKeyError("not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ChainKeyError("not an Ed25519 public key")
    return key


class ChainWriter:
    """Builds the sidecar lines of one session, in write order. No I/O.

    Version 2 (the default): `append` gives an unsigned flow line; `head_due` says when a signed
    `head` line is owed (`signed_head` builds it). Version 1 signs every flow line."""

    def __init__(
        self,
        session_id: str,
        signer: Signer,
        *,
        identity: str,
        created: float,
        version: int = CHAIN_VERSION,
        head_every_flows: int = HEAD_EVERY_FLOWS,
        head_every_seconds: float = HEAD_EVERY_SECONDS,
    ) -> None:
        if version not in VERSIONS:
            raise ValueError(f"unknown chain version {version}")
        self.session_id = session_id
        self.signer = signer
        self.identity = identity
        self.created = created
        self.version = version
        self.head_every_flows = head_every_flows
        self.head_every_seconds = head_every_seconds
        self.head = genesis(session_id)
        self.count = 0
        self.size = 0
        self.signed_count = 0  # flows covered by a signature (v1: every one)
        self.signed_at = created

    def opening(self) -> dict[str, Any]:
        return self.signer.signed(
            {
                "type": "open",
                "version": self.version,
                "session": self.session_id,
                "identity": self.identity,
                "created": self.created,
                "key_id": self.signer.key_id,
                "public_key": self.signer.public_b64,
                "genesis": self.head,
            }
        )

    def append(self, flow_id: str, record: bytes, audit: str | None = None) -> dict[str, Any]:
        """The entry for `record`, written at the current end of the session file. `audit`: the
        hash of the flow's audit-log line, which the chain (v2) or the signature (v1) covers."""
        digest = hashlib.sha256(record).hexdigest()
        fields: dict[str, Any] = {
            "type": "flow",
            "index": self.count,
            "flow_id": flow_id,
            "offset": self.size,
            "length": len(record),
            "sha256": digest,
        }
        if self.version == 1:
            fields["chain"] = link(self.head, self.count, flow_id, digest)
        else:
            fields["chain"] = link_v2(
                self.head, self.count, flow_id, digest, self.size, len(record), audit
            )
        if audit is not None:
            fields["audit"] = audit
        entry = self.signer.signed(fields) if self.version == 1 else fields
        self.head = fields["chain"]
        self.count += 1
        self.size += len(record)
        if self.version == 1:
            self.signed_count = self.count
        return entry

    def undo(self, entry: dict[str, Any], prev_head: str) -> None:
        """Forget `entry` after its write failed (the record was truncated away)."""
        self.head = prev_head
        self.count -= 1
        self.size -= entry["length"]
        self.signed_count = min(self.signed_count, self.count)

    def head_due(self, now: float) -> bool:
        """Whether flows wait for a signed head: `head_every_flows` of them, or the oldest
        signature is `head_every_seconds` old."""
        unsigned = self.count - self.signed_count
        return unsigned > 0 and (
            unsigned >= self.head_every_flows or now - self.signed_at >= self.head_every_seconds
        )

    def signed_head(self, time: float) -> dict[str, Any]:
        """A signed `head` line covering every flow so far (v2)."""
        line = self.signer.signed(
            {
                "type": "head",
                "count": self.count,
                "head": self.head,
                "bytes": self.size,
                "time": time,
            }
        )
        self.mark_signed(time)
        return line

    def mark_signed(self, time: float) -> None:
        self.signed_count = self.count
        self.signed_at = time

    def seal(self, reason: str, time: float) -> dict[str, Any]:
        line = self.signer.signed(
            {
                "type": "seal",
                "count": self.count,
                "head": self.head,
                "bytes": self.size,
                "reason": reason,
                "time": time,
            }
        )
        self.mark_signed(time)
        return line


def dump_line(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, separators=(",", ":")).encode() + b"\n"


# -- reading and verifying --------------------------------------------------------------------


def split_records(data: bytes) -> tuple[list[tuple[int, int]], int | None]:
    """Top-level tnetstring records in `data` as (offset, length); and where framing broke.

    Framing is `<length>:<payload><type byte>`; this is all a reader needs to find record
    boundaries without parsing flows (and without mitmproxy).
    """
    spans: list[tuple[int, int]] = []
    pos = 0
    while pos < len(data):
        colon = data.find(b":", pos, pos + 13)
        digits = data[pos:colon] if colon != -1 else b""
        if not digits.isdigit():
            return spans, pos
        end = colon + 1 + int(digits) + 1
        if end > len(data):
            return spans, pos
        spans.append((pos, end - pos))
        pos = end
    return spans, None


@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem found by verification, located by flow index and id where possible."""

    kind: str  # modified | removed | inserted | moved | unchained_tail | unsigned_tail | ...
    message: str
    index: int | None = None
    flow_id: str | None = None
    fatal: bool = True

    def __str__(self) -> str:
        where = []
        if self.index is not None:
            where.append(f"flow #{self.index}")
        if self.flow_id:
            where.append(f"id {self.flow_id}")
        prefix = f"{' '.join(where)}: " if where else ""
        return f"{self.kind}: {prefix}{self.message}"


@dataclasses.dataclass
class Verdict:
    session: str | None
    flows_in_chain: int
    records_in_file: int
    sealed: bool
    key_id: str | None
    key_trusted: bool
    findings: list[Finding]
    heads: list[str] = dataclasses.field(default_factory=list)  # chain head after each flow
    audit: dict[int, str] = dataclasses.field(default_factory=dict)  # index -> audit line hash

    @property
    def head(self) -> str:
        return self.head_at(len(self.heads))

    def head_at(self, count: int) -> str:
        """The chain head after `count` flows (the genesis for 0; "" past the end)."""
        if count == 0:
            return genesis(self.session or "")
        return self.heads[count - 1] if count <= len(self.heads) else ""

    @property
    def status(self) -> str:
        """`ok`, `unsealed` (consistent, but the gateway did not close it) or `failed`."""
        if any(f.fatal for f in self.findings):
            return "failed"
        return "ok" if self.sealed else "unsealed"


def parse_chain(text: str) -> tuple[list[dict[str, Any]], list[Finding]]:
    """Chain lines; a last line cut short by a crash is dropped with a non-fatal finding."""
    entries: list[dict[str, Any]] = []
    findings: list[Finding] = []
    lines = text.split("\n")
    for number, line in enumerate(lines):
        if not line:
            continue
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError
        except ValueError:
            last = number == len(lines) - 1  # no newline after it: an interrupted write
            findings.append(
                Finding(
                    "chain_line_unreadable",
                    f"chain line {number + 1} is not JSON"
                    + (" (cut short, probably by a crash)" if last else ""),
                    fatal=not last,
                )
            )
            continue
        entries.append(entry)
    return entries, findings


def verify(
    data: bytes,
    chain_text: str,
    *,
    trusted_key: Ed25519PublicKey | None = None,
    record_id: Callable[[bytes], str | None] | None = None,
) -> Verdict:
    """Check a session file against its chain sidecar.

    `trusted_key`: the gateway's public key; without it the key embedded in the sidecar is used,
    which proves integrity only against someone who did not re-sign (`key_trusted` False).
    `record_id`: gives the flow id of a record, to name records the chain does not know.
    """
    entries, findings = parse_chain(chain_text)
    opening = entries[0] if entries and entries[0].get("type") == "open" else None
    if opening is None:
        findings.append(Finding("no_opening", "the chain has no signed opening line"))
        return Verdict(None, 0, 0, False, None, False, findings)
    session = str(opening.get("session"))
    version = opening.get("version")
    if version not in VERSIONS:
        findings.append(Finding("chain_version", f"unknown chain version {version!r}"))
        version = CHAIN_VERSION
    key, key_trusted = _chain_key(opening, trusted_key, findings)
    flows: list[dict[str, Any]] = []
    heads: list[str] = []
    audit: dict[int, str] = {}
    seal: dict[str, Any] | None = None
    signed = 0  # flows covered by a signature
    head = genesis(session)
    if opening.get("genesis") != head:
        findings.append(Finding("bad_genesis", "the chain does not start from this session"))
    for position, entry in enumerate(entries):
        kind = entry.get("type")
        signs = kind != "flow" or version == 1
        if signs and key is not None and not signature_ok(key, entry):
            findings.append(
                Finding(
                    "bad_signature",
                    f"chain line {position + 1} ({kind}) is not signed by the key",
                    index=entry.get("index"),
                    flow_id=entry.get("flow_id"),
                )
            )
        if position == 0:
            continue
        if seal is not None:
            findings.append(Finding("after_seal", f"chain line {position + 1} follows the seal"))
        if kind == "flow":
            expected_index = len(flows)
            if entry.get("index") != expected_index:
                findings.append(
                    Finding(
                        "chain_order",
                        f"chain entry says index {entry.get('index')}",
                        index=expected_index,
                        flow_id=entry.get("flow_id"),
                    )
                )
            head = entry_link(version, head, expected_index, entry)
            if entry.get("chain") != head:
                findings.append(
                    Finding(
                        "chain_broken",
                        "chain hash does not follow from the previous entries",
                        index=expected_index,
                        flow_id=entry.get("flow_id"),
                    )
                )
            flows.append(entry)
            heads.append(head)
            if version == 1:
                signed = len(flows)
            if isinstance(entry.get("audit"), str):
                audit[expected_index] = entry["audit"]
        elif kind == "head" and version != 1:
            if entry.get("count") != len(flows) or entry.get("head") != head:
                findings.append(
                    Finding(
                        "head_mismatch",
                        f"signed head on chain line {position + 1} covers "
                        f"{entry.get('count')} flow(s) with another chain hash than the "
                        f"{len(flows)} before it: the flow lines were rewritten",
                        index=len(flows) - 1 if flows else None,
                    )
                )
            else:
                signed = len(flows)
        elif kind == "seal":
            seal = entry
        else:
            findings.append(Finding("chain_line_unknown", f"chain line {position + 1}: {kind!r}"))
    if seal is not None and (seal.get("count") != len(flows) or seal.get("head") != head):
        findings.append(
            Finding(
                "seal_mismatch",
                f"the seal covers {seal.get('count')} flows, the chain has {len(flows)}",
            )
        )
    elif seal is None and signed < len(flows):
        findings.append(
            Finding(
                "unsigned_tail",
                f"flows #{signed} to #{len(flows) - 1} follow the last signed head: consistent, "
                "but not proven (anyone who can write the files could have written or changed "
                "them); the gateway signs a head within a second, so it was stopped, or is running",
                index=signed,
                flow_id=flows[signed].get("flow_id"),
                fatal=False,
            )
        )

    spans, broken_at = split_records(data)
    digests = [hashlib.sha256(data[o : o + n]).hexdigest() for o, n in spans]
    if broken_at is not None:
        digests.append(hashlib.sha256(data[broken_at:]).hexdigest())
        spans.append((broken_at, len(data) - broken_at))
    findings += _compare(flows, digests, spans, data, seal is not None, record_id)
    return Verdict(
        session=session,
        flows_in_chain=len(flows),
        records_in_file=len(spans),
        sealed=seal is not None,
        key_id=opening.get("key_id"),
        key_trusted=key_trusted,
        findings=findings,
        heads=heads,
        audit=audit,
    )


def _chain_key(
    opening: dict[str, Any], trusted: Ed25519PublicKey | None, findings: list[Finding]
) -> tuple[Ed25519PublicKey | None, bool]:
    try:
        embedded = Ed25519PublicKey.from_public_bytes(base64.b64decode(opening["public_key"]))
    except (KeyError, ValueError, TypeError):
        findings.append(Finding("bad_key", "the opening line has no usable public key"))
        embedded = None
    if trusted is None:
        return embedded, False
    if embedded is None or public_key_id(embedded) != public_key_id(trusted):
        findings.append(
            Finding("untrusted_key", "the session was signed with a key other than the trusted one")
        )
    return trusted, True


def signature_ok(key: Ed25519PublicKey, entry: dict[str, Any]) -> bool:
    """Whether `entry`'s `sig` is `key`'s signature of its canonical form."""
    try:
        key.verify(base64.b64decode(str(entry.get("sig", ""))), canonical(entry))
    except (InvalidSignature, ValueError):
        return False
    return True


def _compare(
    flows: Sequence[dict[str, Any]],
    digests: list[str],
    spans: list[tuple[int, int]],
    data: bytes,
    sealed: bool,
    record_id: Callable[[bytes], str | None] | None,
) -> list[Finding]:
    """Align the chain's digests with the records found and describe every difference."""
    expected = [str(f.get("sha256")) for f in flows]

    def actual_id(j: int) -> str | None:
        if record_id is None:
            return None
        offset, length = spans[j]
        try:
            return record_id(data[offset : offset + length])
        except Exception:  # an unreadable record has no id; it is reported anyway
            return None

    matcher = difflib.SequenceMatcher(None, expected, digests, autojunk=False)
    changes = [op[1:] for op in matcher.get_opcodes() if op[0] != "equal"]
    gone = {expected[i] for i1, i2, _, _ in changes for i in range(i1, i2)}
    new = {digests[j] for _, _, j1, j2 in changes for j in range(j1, j2)}
    moved = gone & new
    where = {digests[j]: j for _, _, j1, j2 in changes for j in range(j1, j2)}
    out: list[Finding] = []
    for i1, i2, j1, j2 in changes:
        lost = [i for i in range(i1, i2) if expected[i] not in moved]
        extra = [j for j in range(j1, j2) if digests[j] not in moved]
        for i in range(i1, i2):
            if expected[i] in moved:
                out.append(
                    Finding(
                        "moved",
                        f"found at position #{where[expected[i]]}: flows were reordered",
                        i,
                        flows[i].get("flow_id"),
                    )
                )
        for i, j in zip(lost, extra, strict=False):
            out.append(
                Finding(
                    "modified",
                    f"record at byte {spans[j][0]} differs from what was written",
                    i,
                    flows[i].get("flow_id"),
                )
            )
        for i in lost[len(extra) :]:
            out.append(
                Finding("removed", "missing from the session file", i, flows[i].get("flow_id"))
            )
        for j in extra[len(lost) :]:
            if j == len(digests) - 1 and j == len(flows) and not sealed:
                out.append(
                    Finding(
                        "unchained_tail",
                        "the last record has no chain entry: the gateway stopped while writing it",
                        j,
                        actual_id(j),
                        fatal=False,
                    )
                )
            else:
                out.append(
                    Finding(
                        "inserted",
                        f"record at byte {spans[j][0]} is not in the chain",
                        j,
                        actual_id(j),
                    )
                )
    return sorted(out, key=lambda f: (f.index if f.index is not None else -1, f.kind))


def read_opening(chain_text: str) -> dict[str, Any] | None:
    """The opening line of a sidecar (session metadata for listings), unverified."""
    first = chain_text.split("\n", 1)[0]
    try:
        entry = json.loads(first)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) and entry.get("type") == "open" else None


def summarize(chain_text: str) -> dict[str, Any]:
    """Opening, flow count and seal of a sidecar, unverified (for `sessions list`)."""
    entries, _ = parse_chain(chain_text)
    flows = [e for e in entries if e.get("type") == "flow"]
    seals = [e for e in entries if e.get("type") == "seal"]
    opening = entries[0] if entries and entries[0].get("type") == "open" else {}
    return {"opening": opening, "flows": len(flows), "seal": seals[-1] if seals else None}
