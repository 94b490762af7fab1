"""The recordable copy of a finished flow: what the agent saw, secrets masked, plain metadata.

The live flow is never changed: everything happens on a copy of its state (what `flow.copy()`
would build, without the expensive round trip through flow objects). On the copy, bodies are
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
import weakref
from collections.abc import Iterable
from typing import Any

from mitmproxy import http
from mitmproxy import version as mitmproxy_version
from mitmproxy.net import encoding

import sluicegate
from sluicegate.mitm import flowstate
from sluicegate.recording import tnetstring
from sluicegate.recording.facts import (  # re-exported
    comment,
    decided_by,
    decision,
    mark,
    rules_fired,
)
from sluicegate.recording.sealing import ALGORITHM, Sealer

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
    state: dict[str, Any]  # the sanitized flow state that `record` serializes
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


def _holds_literal(record: bytes, pairs: list[tuple[str, str]]) -> bool:
    return any(old.encode() in record for old, _ in pairs)


class ConnectionStates:
    """Connection states (and their encoding) by connection, reused while it is unchanged.

    Every flow of a keep-alive connection records the same client and server connection state,
    and taking it (`get_state`) and encoding it is a third of what recording a small flow costs.
    A cached state is used only while every field of the connection has the value (the same
    object, lists compared by content) it had when the state was taken.
    """

    def __init__(self) -> None:
        self._known: weakref.WeakKeyDictionary[Any, tuple[tuple[Any, ...], dict[str, Any], bytes]]
        self._known = weakref.WeakKeyDictionary()

    def state(self, conn: Any) -> tuple[dict[str, Any], bytes]:
        """The connection's state (never change it: it is shared) and its encoding."""
        fields = tuple(
            tuple(value) if type(value) is list else value for value in vars(conn).values()
        )
        known = self._known.get(conn)
        if known is not None and known[0] == fields:
            return known[1], known[2]
        state = conn.get_state()
        encoded = tnetstring.dumps(state)
        self._known[conn] = (fields, state, encoded)
        return state, encoded


class _KnownState:
    """Stands in for a connection while the flow's state is taken: its state is known."""

    __slots__ = ("_state",)

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def get_state(self) -> dict[str, Any]:
        return self._state


def _state(
    flow: http.HTTPFlow, connections: ConnectionStates | None
) -> tuple[dict[str, Any], dict[int, bytes]]:
    """The flow's state without its metadata: a copy (`get_state` copies every part we change),
    taken without deep-copying metadata, which may hold objects that cannot be copied; and the
    encodings already known of parts of it (by `id`).

    Working on the state instead of `flow.copy()` avoids `from_state`, most of the cost per flow.
    """
    known: dict[int, bytes] = {}
    metadata, client, server = flow.metadata, flow.client_conn, flow.server_conn
    flow.metadata = {}
    try:
        if connections is not None:  # nothing else runs on the event loop meanwhile
            for name, conn in (("client_conn", client), ("server_conn", server)):
                conn_state, encoded = connections.state(conn)
                known[id(conn_state)] = encoded
                setattr(flow, name, _KnownState(conn_state))
        state = flow.get_state()
    finally:
        flow.metadata, flow.client_conn, flow.server_conn = metadata, client, server
    # A backup is an earlier state of the flow (mitmproxy keeps one when a flow is edited or
    # replayed): it may predate redaction, so it is never recorded.
    state["backup"] = None
    return state, known


Fields = list[tuple[bytes, bytes]]


def _get(fields: Fields, name: bytes) -> bytes | None:
    for k, v in fields:
        if k.lower() == name:
            return v
    return None


def _without(fields: Fields, name: bytes) -> Fields:
    return [(k, v) for k, v in fields if k.lower() != name]


def _set_body(message: dict[str, Any], fields: Fields, body: bytes) -> Fields:
    """Replace a body, keeping Content-Length true (as mitmproxy's `Message.content` does)."""
    message["content"] = body
    if _get(fields, b"transfer-encoding") is None:
        fields = [*_without(fields, b"content-length"), (b"content-length", b"%d" % len(body))]
    return fields


def _decoded(message: dict[str, Any], fields: Fields, part: str, notes: list[str]) -> Fields:
    ce = _get(fields, b"content-encoding")
    if ce is None:
        return fields
    fields = _without(fields, b"content-encoding")
    try:
        body = encoding.decode(message["content"], ce.decode("latin-1"))
        if not isinstance(body, bytes):
            raise ValueError("not a byte encoding")
    except ValueError:
        # Bytes we cannot decode cannot be checked for secrets: not recorded.
        notes.append(f"{part}_body_dropped_undecodable")
        body = b""
    return _set_body(message, fields, body)


def _masked(fields: Fields, names: frozenset[str], pairs: list[tuple[str, str]]) -> Fields:
    """Injected credentials become their marker first, so masking keeps the marker."""
    out = []
    for k, v in fields:
        name = k.decode("latin-1").lower()
        if name in ALWAYS_DROPPED_HEADERS:
            continue
        v = scrub_bytes(v, pairs)
        if name in names and CREDENTIAL_MARKER.encode() not in v:
            v = MASKED.encode()
        out.append((k, v))
    return out


def _clean_message(
    message: dict[str, Any],
    part: str,
    policy: SnapshotPolicy,
    pairs: list[tuple[str, str]],
    notes: list[str],
) -> None:
    fields: Fields = list(message["headers"])
    fields = _decoded(message, fields, part, notes)
    body = message["content"]
    scrubbed = scrub_bytes(body, pairs)
    if scrubbed != body:
        fields = _set_body(message, fields, scrubbed)
    message["headers"] = _masked(fields, policy.mask_headers, pairs)
    if message.get("trailers") is not None:
        message["trailers"] = _masked(list(message["trailers"]), policy.mask_headers, pairs)


def _fill_bodies(state: dict[str, Any], st: flowstate.FlowState, notes: list[str]) -> None:
    if state["request"]["content"] is None:
        state["request"]["content"] = b""
        notes.append("request_body_not_captured")
    response = state.get("response")
    if response is None:
        return
    if st.streamed_body is not None and not response["content"]:
        response["content"] = bytes(st.streamed_body)
    if response["content"] is None:
        response["content"] = b""
        notes.append("response_body_not_captured")


def _timings(state: dict[str, Any]) -> dict[str, Any]:
    req, resp = state["request"], state.get("response")
    out: dict[str, Any] = {"request_start": req["timestamp_start"]}
    end = None
    if resp is not None:
        end = resp["timestamp_end"]
        if resp["timestamp_start"] and req["timestamp_end"]:
            out["upstream_ms"] = round((resp["timestamp_start"] - req["timestamp_end"]) * 1000, 3)
    if end is None and state.get("error"):
        end = state["error"]["timestamp"]
    websocket = state.get("websocket")
    if websocket and websocket.get("timestamp_end"):
        end = websocket["timestamp_end"]
    if end:
        out["total_ms"] = round((end - req["timestamp_start"]) * 1000, 3)
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


def _metadata(
    flow: http.HTTPFlow,
    state: dict[str, Any],
    st: flowstate.FlowState,
    policy: SnapshotPolicy,
    pairs: list[tuple[str, str]],
    errors: list[str],
) -> tuple[dict[str, Any], dict[str, Any]]:
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
    sg["timings"] = {**_timings(state), **(timings if isinstance(timings, dict) else {})}
    sg["gateway"] = {
        "name": policy.gateway_name,
        "version": sluicegate.__version__,
        "mitmproxy": mitmproxy_version.VERSION,
    }
    if policy.sealer is not None:
        sealed = _seal(policy.sealer, st, flow.id, pairs)
        if sealed is not None:
            sg["sealed"] = sealed
    return meta, sg


def snapshot(
    flow: http.HTTPFlow,
    policy: SnapshotPolicy,
    *,
    event: str,
    now: float | None = None,
    connections: ConnectionStates | None = None,
) -> Snapshot:
    """Build the record for a finished flow (`event`: the hook that finished it)."""
    st = flowstate.state(flow)
    pairs = replacements_for(st.scrub)
    notes: list[str] = []
    errors: list[str] = []
    state, known = _state(flow, connections)
    _fill_bodies(state, st, notes)
    for part in ("request", "response"):
        if state.get(part) is not None:
            _clean_message(state[part], part, policy, pairs, notes)
    meta, sg = _metadata(flow, state, st, policy, pairs, errors)
    recorded_at = time.time() if now is None else now
    sg["recording"] = {"event": event, "recorded_at": recorded_at, "notes": notes, "errors": errors}
    state["metadata"] = meta
    # What stock mitmweb shows of a flow besides method, path and status: who did what.
    errored = state.get("error") is not None
    said = comment(sg, errored)
    state["comment"] = f"{said}\n{state['comment']}" if state.get("comment") else said
    state["marked"] = mark(decision(sg, errored)) or state.get("marked", "")

    record = tnetstring.dumps(state, known)
    if _holds_literal(record, pairs):
        # Somewhere the targeted passes do not look (URL, websocket messages, metadata,
        # comment, connections...): sweep every string of the state (into new containers, so
        # no known encoding applies), then check again.
        state = scrub_value(state, pairs)
        record = tnetstring.dumps(state)
        if _holds_literal(record, pairs):
            raise SnapshotLeak(flow.id)
    caller = st.caller
    identity = caller.subject if caller is not None and caller.subject else ANONYMOUS
    return Snapshot(record, identity, state, sg, errors, pairs)


def audit_entry(snap: Snapshot, session: str, index: int) -> dict[str, Any]:
    """One audit-log line for a recorded flow, from the sanitized state (already scrubbed)."""
    state, sg = snap.state, snap.meta
    caller = sg.get("caller")
    if not isinstance(caller, dict):
        caller = {}
    req, resp = state["request"], state.get("response")
    error, websocket = state.get("error"), state.get("websocket")
    timings = sg.get("timings", {})
    refusal = sg.get("refusal")
    path = req["path"].decode("utf-8", "replace")
    return {
        "time": datetime.datetime.fromtimestamp(req["timestamp_start"], datetime.UTC).isoformat(),
        "flow_id": state["id"],
        "request_id": sg.get("request_id"),
        "identity": snap.identity,
        "groups": caller.get("groups", []),
        "token_id": caller.get("token_id"),
        "token_fingerprint": caller.get("token_fingerprint"),
        "route": sg.get("route"),
        "method": req["method"].decode("latin-1"),
        "scheme": req["scheme"].decode("latin-1"),
        "host": req["host"],
        "port": req["port"],
        "path": path.split("?", 1)[0],
        "status": resp["status_code"] if resp is not None else None,
        "request_bytes": len(req["content"] or b""),
        "response_bytes": len(resp["content"] or b"") if resp is not None else 0,
        "websocket_messages": len(websocket["messages"]) if websocket else None,
        "rules": rules_fired(sg),
        "decision": decision(sg, error is not None),
        "refusal": refusal.get("code") if isinstance(refusal, dict) else None,
        **decided_by(sg),
        "error": error["msg"] if error else None,
        "duration_ms": timings.get("total_ms") if isinstance(timings, dict) else None,
        "event": sg["recording"]["event"],
        "session": session,
        "index": index,
    }
