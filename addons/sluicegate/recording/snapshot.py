"""The recordable copy of a finished flow: what the agent saw, secrets masked, plain metadata.

The live flow is never changed: everything happens on `flow.copy()`. On the copy, bodies are
content-decoded (so masking cannot miss a secret inside gzip, and `grep` works on recordings),
the proxy credential is dropped, credential-bearing headers are masked unless they already hold a
`[credential:<route>]` marker, and every scrub literal (injected credentials in all encodings, the
caller's token) is replaced by its marker everywhere in the serialized state: headers, URL,
bodies, websocket messages, trailers, metadata. The serialized bytes are checked once more for
every literal; a hit refuses the record instead of writing a secret.

Metadata must be plain (mitmproxy drops a flow whose metadata it cannot serialize): non-plain
values are replaced by a marker naming their type and reported, so the flow is still recorded and
the bug is loud.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Iterable
from typing import Any, cast

from mitmproxy import http
from mitmproxy import version as mitmproxy_version
from mitmproxy.io import tnetstring

import sluicegate
from sluicegate import flowstate
from sluicegate.engine.sealing import ALGORITHM, Sealer

ANONYMOUS = "anonymous"
MASKED = "[masked]"
CREDENTIAL_MARKER = "[credential:"
ALWAYS_DROPPED_HEADERS = ("proxy-authorization",)


class SnapshotLeak(Exception):
    """A scrub literal survived into the serialized record; nothing is written."""

    code = "recording_scrub_failed"


@dataclasses.dataclass(frozen=True)
class SnapshotPolicy:
    mask_headers: frozenset[str]
    gateway_name: str
    sealer: Sealer | None = None


@dataclasses.dataclass
class Snapshot:
    record: bytes  # the exact bytes to append to the session file
    identity: str  # the session owner: caller subject or "anonymous"
    flow: http.HTTPFlow  # the sanitized copy (audit fields come from it, scrubbed again)
    meta: dict[str, Any]  # its metadata["sluicegate"]
    errors: list[str]  # problems that were recorded instead of failing (metadata paths)
    replacements: list[tuple[str, str]]


def marker(literal: flowstate.ScrubLiteral) -> str:
    """What a scrubbed literal becomes: `[credential:<route>]`, `[caller-token:<fp>]`, a tag."""
    kind, _, detail = literal.rule_id.partition(":")
    if kind == "injected-credential":
        return f"[credential:{detail}]"
    if kind == "caller-token":
        return f"[caller-token:{detail}]"
    return f"[REDACTED:{literal.rule_id}]"


def replacements_for(literals: Iterable[flowstate.ScrubLiteral]) -> list[tuple[str, str]]:
    """(value, marker) pairs, longest first so a variant containing another is masked whole."""
    pairs = {lit.value: marker(lit) for lit in literals if lit.value}
    return sorted(pairs.items(), key=lambda item: -len(item[0]))


def scrub_text(value: str, pairs: list[tuple[str, str]]) -> str:
    for old, new in pairs:
        if old in value:
            value = value.replace(old, new)
    return value


def scrub_bytes(value: bytes, pairs: list[tuple[str, str]]) -> bytes:
    for old, new in pairs:
        raw = old.encode()
        if raw in value:
            value = value.replace(raw, new.encode())
    return value


def scrub_value(value: Any, pairs: list[tuple[str, str]]) -> Any:
    """Scrub every str and bytes inside a state structure (keys included)."""
    if not pairs:
        return value
    if isinstance(value, str):
        return scrub_text(value, pairs)
    if isinstance(value, bytes):
        return scrub_bytes(value, pairs)
    if isinstance(value, (list, tuple)):
        return type(value)(scrub_value(v, pairs) for v in value)
    if isinstance(value, dict):
        return {scrub_value(k, pairs): scrub_value(v, pairs) for k, v in value.items()}
    return value


_PLAIN = (str, int, float, bool, bytes, type(None))


def plain_copy(value: Any, path: str, errors: list[str]) -> Any:
    """A fresh plain copy of `value`; anything else becomes a marker and an error naming it."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (list, tuple)):
        return [plain_copy(v, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                errors.append(f"{path}: non-string key ({type(k).__name__})")
                k = f"<key:{type(k).__name__}>"
            out[k] = plain_copy(v, f"{path}.{k}", errors)
        return out
    errors.append(f"{path}: {type(value).__name__} cannot be saved")
    return f"<unserializable:{type(value).__name__}>"


def _copy(flow: http.HTTPFlow) -> http.HTTPFlow:
    """flow.copy() without its metadata (deep-copying arbitrary objects may fail), same id."""
    metadata = flow.metadata
    flow.metadata = {}
    try:
        clean = flow.copy()
    finally:
        flow.metadata = metadata
    clean.id = flow.id
    return clean


def _fill_bodies(c: http.HTTPFlow, st: flowstate.FlowState, notes: list[str]) -> None:
    if c.request.raw_content is None:
        c.request.raw_content = b""
        notes.append("request_body_not_captured")
    response = c.response
    if response is None:
        return
    if st.streamed_body is not None and not response.raw_content:
        response.raw_content = bytes(st.streamed_body)
    if response.raw_content is None:
        response.raw_content = b""
        notes.append("response_body_not_captured")


def _decode(message: http.Message, part: str, notes: list[str]) -> None:
    if "content-encoding" not in message.headers:
        return
    try:
        message.decode(strict=True)
    except ValueError:
        # Bytes we cannot decode cannot be checked for secrets: not recorded.
        message.headers.pop("content-encoding", None)
        message.content = b""
        notes.append(f"{part}_body_dropped_undecodable")


def _mask(headers: http.Headers, names: frozenset[str]) -> None:
    for name in ALWAYS_DROPPED_HEADERS:
        headers.pop(name, None)
    for name in names:
        values = headers.get_all(name)
        if values:
            headers.set_all(name, [v if CREDENTIAL_MARKER in v else MASKED for v in values])


def _timings(c: http.HTTPFlow) -> dict[str, Any]:
    req, resp = c.request, c.response
    out: dict[str, Any] = {"request_start": req.timestamp_start}
    end = resp.timestamp_end if resp is not None else None
    if resp is not None and resp.timestamp_start and req.timestamp_end:
        out["upstream_ms"] = round((resp.timestamp_start - req.timestamp_end) * 1000, 3)
    if end is None and c.error is not None:
        end = c.error.timestamp
    if c.websocket is not None and c.websocket.timestamp_end:
        end = c.websocket.timestamp_end
    if end:
        out["total_ms"] = round((end - req.timestamp_start) * 1000, 3)
    return out


def _seal(
    sealer: Sealer, st: flowstate.FlowState, flow_id: str, pairs: list[tuple[str, str]]
) -> dict[str, Any] | None:
    parts = {k: v for k, v in st.originals.items() if k in ("request", "response")}
    if not parts:
        return None
    sealed: dict[str, Any] = {"key_id": sealer.key_id, "algorithm": ALGORITHM}
    for part, body in parts.items():
        # The auditor sees the original content, never the gateway's injected credential.
        sealed[part] = sealer.seal(scrub_bytes(bytes(body), pairs), seal_context(flow_id, part))
    return sealed


def seal_context(flow_id: str, part: str) -> bytes:
    return f"sluicegate-original:{flow_id}:{part}".encode()


def snapshot(
    flow: http.HTTPFlow, policy: SnapshotPolicy, *, event: str, now: float | None = None
) -> Snapshot:
    """Build the record for a finished flow (`event`: the hook that finished it)."""
    st = flowstate.state(flow)
    pairs = replacements_for(st.scrub)
    notes: list[str] = []
    errors: list[str] = []
    c = _copy(flow)
    _fill_bodies(c, st, notes)
    for message, part in ((c.request, "request"), (c.response, "response")):
        if message is None:
            continue
        _decode(message, part, notes)
        for headers in (message.headers, message.trailers):
            if headers is not None:
                # Injected credentials become their marker first, so masking keeps the marker.
                headers.fields = tuple((k, scrub_bytes(v, pairs)) for k, v in headers.fields)
                _mask(headers, policy.mask_headers)
        raw = message.raw_content or b""
        scrubbed = scrub_bytes(raw, pairs)
        if scrubbed != raw:
            message.content = scrubbed

    meta = plain_copy(flow.metadata, "metadata", errors)
    sg = meta.get(flowstate.METADATA_KEY)
    if not isinstance(sg, dict):
        if sg is not None:
            errors.append(f"metadata.{flowstate.METADATA_KEY}: not a mapping")
        sg = {}
    meta[flowstate.METADATA_KEY] = sg
    sg.setdefault("request_id", st.request_id)
    if st.caller is not None and not isinstance(sg.get("caller"), dict):
        sg["caller"] = st.caller.as_metadata()
    if st.route is not None and "route" not in sg:
        sg["route"] = st.route
    if st.refusal is not None and "refusal" not in sg:
        sg["refusal"] = dataclasses.asdict(st.refusal)
    timings = sg.get("timings")
    sg["timings"] = {**_timings(c), **(timings if isinstance(timings, dict) else {})}
    sg["gateway"] = {
        "name": policy.gateway_name,
        "version": sluicegate.__version__,
        "mitmproxy": mitmproxy_version.VERSION,
    }
    if policy.sealer is not None:
        sealed = _seal(policy.sealer, st, flow.id, pairs)
        if sealed is not None:
            sg["sealed"] = sealed
    recorded_at = time.time() if now is None else now
    sg["recording"] = {"event": event, "recorded_at": recorded_at, "notes": notes, "errors": errors}
    c.metadata = meta

    state = scrub_value(c.get_state(), pairs)
    record = tnetstring.dumps(state)
    for old, _ in pairs:
        if old.encode() in record:
            raise SnapshotLeak(flow.id)
    caller = st.caller
    identity = caller.subject if caller is not None and caller.subject else ANONYMOUS
    return Snapshot(record, identity, c, sg, errors, pairs)


def decision(sg: dict[str, Any], c: http.HTTPFlow) -> str:
    """The flow's outcome in one word, for the audit log and filters."""
    policy = sg.get("policy")
    if isinstance(policy, dict) and isinstance(policy.get("decision"), str):
        return policy["decision"]
    if sg.get("refusal"):
        return "refused"
    if c.error is not None:
        return "error"
    return "allowed"


def rules_fired(sg: dict[str, Any]) -> dict[str, int]:
    """Counts per rule id: redaction in both directions plus the policy rule(s)."""
    counts: dict[str, int] = {}

    def add(rule: Any, n: Any) -> None:
        if isinstance(rule, str) and isinstance(n, int) and not isinstance(n, bool):
            counts[rule] = counts.get(rule, 0) + n

    redaction = sg.get("redaction")
    if isinstance(redaction, dict):
        for direction in redaction.values():
            if isinstance(direction, dict):
                for rule, n in direction.items():
                    add(rule, n)
    policy = sg.get("policy")
    if isinstance(policy, dict):
        if isinstance(policy.get("rules"), dict):
            for rule, n in policy["rules"].items():
                add(rule, n)
        elif isinstance(policy.get("rule"), str):
            add(policy["rule"], 1)
    return counts


def audit_entry(snap: Snapshot, session: str, index: int) -> dict[str, Any]:
    """One audit-log line for a recorded flow (scrubbed like the record)."""
    c, sg = snap.flow, snap.meta
    caller = sg.get("caller") if isinstance(sg.get("caller"), dict) else {}
    req, resp = c.request, c.response
    timings = sg.get("timings", {})
    refusal = sg.get("refusal")
    entry = {
        "time": datetime.datetime.fromtimestamp(req.timestamp_start, datetime.UTC).isoformat(),
        "flow_id": c.id,
        "request_id": sg.get("request_id"),
        "identity": snap.identity,
        "groups": caller.get("groups", []),
        "token_id": caller.get("token_id"),
        "token_fingerprint": caller.get("token_fingerprint"),
        "route": sg.get("route"),
        "method": req.method,
        "scheme": req.scheme,
        "host": req.host,
        "port": req.port,
        "path": req.path.split("?", 1)[0],
        "status": resp.status_code if resp is not None else None,
        "request_bytes": len(req.raw_content or b""),
        "response_bytes": len(resp.raw_content or b"") if resp is not None else 0,
        "websocket_messages": len(c.websocket.messages) if c.websocket is not None else None,
        "rules": rules_fired(sg),
        "decision": decision(sg, c),
        "refusal": refusal.get("code") if isinstance(refusal, dict) else None,
        "error": c.error.msg if c.error is not None else None,
        "duration_ms": timings.get("total_ms") if isinstance(timings, dict) else None,
        "event": sg["recording"]["event"],
        "session": session,
        "index": index,
    }
    return cast(dict[str, Any], scrub_value(entry, snap.replacements))
