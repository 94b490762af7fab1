"""Per-flow state shared by the addons of the chain, kept beside the flow and never saved.

`flow.metadata` is written to recordings, so it must hold only plain, non-secret values.
Everything else an addon learns about a flow (the verified identity, the route, the injected
credential to scrub from responses, a refusal) lives here, in a side table keyed weakly by the
flow object. `publish()` projects the recordable part into `flow.metadata["sluicegate"]`.

This module is part of the package, not of the `-s` script, so a hot reload of the script keeps
the state of flows in flight.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import weakref
from typing import Any

from sluicegate.auth.caller import Caller
from sluicegate.config import Route
from sluicegate.egress.paths import RequestPath
from sluicegate.policy.mcp import McpFlow
from sluicegate.policy.stream import ResponsePolicy, ResponseScanner
from sluicegate.recording.store import Receipt
from sluicegate.redaction.messages import MessageStream
from sluicegate.redaction.redactor import LiteralSecret as ScrubLiteral
from sluicegate.redaction.redactor import Redactor
from sluicegate.shapes.events import MessageReader

METADATA_KEY = "sluicegate"


@dataclasses.dataclass
class Refusal:
    """Why the gateway answered a flow itself instead of forwarding it."""

    status: int
    code: str
    message: str
    phase: str


@dataclasses.dataclass
class Injected:
    """Which header carries the injected credential, and the value it shows once the request has
    left: the route's template around the marker `[credential:<route>]`."""

    header: str
    concealed: str


@dataclasses.dataclass
class HeldDirection:
    """One direction's messages read as a stream (see `mitm/ws_hold.py`)."""

    stream: MessageStream
    # What the gateway injected and has not seen come back through the hook yet, in order:
    # (content, is_text).
    injected: collections.deque[tuple[bytes, bool]] = dataclasses.field(
        default_factory=collections.deque
    )
    timer: asyncio.TimerHandle | None = None
    # When a close came while messages waited (`websockets.WebSockets.websocket_closing`):
    # messages sent ahead of the close, messages lost, and the code of the loss.
    released_at_close: int = 0
    lost_at_close: int = 0
    lost_code: str | None = None

    def close_facts(self) -> dict[str, Any]:
        if not self.released_at_close and not self.lost_at_close:
            return {}
        facts: dict[str, Any] = {
            "released_at_close": self.released_at_close,
            "lost_at_close": self.lost_at_close,
        }
        if self.lost_code is not None:
            facts["lost_code"] = self.lost_code
        return facts


@dataclasses.dataclass
class WebSocketChannel:
    """What the gateway did on one WebSocket connection (counts are recorded, never content)."""

    route: str | None
    response_redactor: Redactor | None = None
    messages: int = 0
    dropped: int = 0
    counts: dict[str, dict[str, int]] = dataclasses.field(
        default_factory=lambda: {"client": {}, "server": {}}
    )
    closed: str | None = None  # the code the gateway closed the connection with
    # The response rules' scanner over the server's messages (created on the first one).
    scanner: ResponseScanner | None = None
    reader: MessageReader | None = None  # the text channels of its JSON messages
    # Text messages as a stream, per direction (True: from the client); see mitm/ws_hold.py.
    holds: dict[bool, HeldDirection] = dataclasses.field(default_factory=dict)
    policy_rule: str | None = None  # the request rule that closed it (client messages)

    def facts(self) -> dict[str, Any]:
        facts: dict[str, Any] = {
            "route": self.route,
            "messages": self.messages,
            "dropped": self.dropped,
            "redaction": {side: dict(counts) for side, counts in self.counts.items()},
        }
        if self.closed is not None:
            facts["closed_by_gateway"] = self.closed
        if self.scanner is not None and self.scanner.decision is not None:
            facts["policy_rule"] = self.scanner.decision.rule_id
        if self.policy_rule is not None:
            facts["policy_rule"] = self.policy_rule
        if self.holds:
            facts["held"] = {
                "client" if side else "server": {
                    "messages": hold.stream.held,
                    "waiting": hold.stream.pending,
                    "forced": hold.stream.forced,
                    "redaction": dict(hold.stream.counts),
                    **hold.close_facts(),
                }
                for side, hold in self.holds.items()
            }
        return facts


@dataclasses.dataclass
class FlowState:
    request_id: str
    refusal: Refusal | None = None
    # Set by the auth addon once the caller's token is verified.
    caller: Caller | None = None
    # Name of the route the flow matched (None: unrouted).
    route: str | None = None
    # Injected credentials (all their encoded variants) to scrub from responses and recordings.
    scrub: list[ScrubLiteral] = dataclasses.field(default_factory=list)
    # The response body bytes the client actually received when the response was streamed.
    streamed_body: bytearray | None = None
    # Pre-redaction bodies ("request" / "response", content-decoded), kept only while the
    # recorder seals originals (see `keep_original`); sealed to the auditor's key, never stored.
    originals: dict[str, bytes] = dataclasses.field(default_factory=dict)
    # Recordable facts, grouped by the addon that produced them (plain types only).
    facts: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Working data, one typed slot per owner (never recorded):
    # Routing: the canonical request path judged by routing and policy, and the chosen route.
    path: RequestPath | None = None
    route_config: Route | None = None
    # CredentialInjection: the header it wrote, and what it shows once the request has left.
    injected: Injected | None = None
    # Policy: the response rules of this flow (StreamRedaction asks them while streaming).
    response_policy: ResponsePolicy | None = None
    # Policy: an MCP flow's messages, its tools/list judge and stream filter (StreamRedaction).
    mcp: McpFlow | None = None
    # WebSockets: the connection's channel state.
    websocket: WebSocketChannel | None = None
    # Recorder: where the flow was written (written once).
    recorded: Receipt | None = None
    # MessageParts: counts of the response head (headers, reason phrase), recorded again with
    # the trailers' in `response`.
    response_head: dict[str, int] | None = None
    # guard.answer: the JSON body of a refusal made in `responseheaders`, for a response that
    # has no body to replace (`guard.complete_answer`).
    pending_answer: bytes | None = None
    # Monitoring: counted in the metrics (and logged) once.
    monitored: bool = False
    # The dict `publish` last put into flow.metadata (`record` updates it in place).
    published: dict[str, Any] | None = dataclasses.field(default=None, repr=False)


_states: weakref.WeakKeyDictionary[Any, FlowState] = weakref.WeakKeyDictionary()


def state(flow: Any) -> FlowState:
    """The state of `flow`, created on first use."""
    st = _states.get(flow)
    if st is None:
        st = FlowState(request_id=flow.id)
        _states[flow] = st
    return st


def peek(flow: Any) -> FlowState | None:
    """The state of `flow` if any addon created it."""
    return _states.get(flow)


# Set by the recorder while it seals pre-redaction originals, so redaction keeps them only then.
keep_originals: bool = False


def keep_original(flow: Any, part: str, body: bytes) -> None:
    """Hand the recorder the body of `part` ("request" / "response") before redacting it.

    Redaction addons call this with the content-decoded body they are about to redact; it costs
    nothing unless sealed originals are configured.
    """
    if keep_originals:
        if part not in ("request", "response"):
            raise ValueError(f"unknown body part {part!r}")
        state(flow).originals[part] = bytes(body)


def record(flow: Any, section: str, value: Any) -> None:
    """Set a recordable fact and publish it to `flow.metadata` at once.

    Only the new value is checked (the rest was checked when it was recorded), and the published
    metadata is updated in place while it is still the one `publish` put there.
    """
    ensure_plain(value, f"{METADATA_KEY}.{section}")
    st = state(flow)
    st.facts[section] = value
    published = st.published
    if published is not None and flow.metadata.get(METADATA_KEY) is published:
        published[section] = value
    else:  # every fact was checked when it was recorded; a refusal has plain fields
        flow.metadata[METADATA_KEY] = st.published = _projection(st)


def count_redactions(flow: Any, part: str, counts: dict[str, int]) -> None:
    """The one writer of the `redaction` section: counts per rule for `part` ("request" /
    "response": bodies and query; "request_head" / "response_head": path, headers, trailers,
    reason phrase), beside what was recorded for the other parts."""
    section = dict(state(flow).facts.get("redaction") or {})
    section[part] = dict(counts)
    record(flow, "redaction", section)


def _projection(st: FlowState) -> dict[str, Any]:
    meta: dict[str, Any] = {"request_id": st.request_id, **st.facts}
    if st.refusal is not None:
        meta["refusal"] = dataclasses.asdict(st.refusal)
    return meta


def publish(flow: Any) -> None:
    """Copy the recordable facts into `flow.metadata`, checking they are plain values.

    mitmproxy silently drops a flow from a recording when its metadata holds anything it cannot
    serialize; a programming error here must fail loudly (and the guard fails the flow closed).
    """
    st = state(flow)
    meta = _projection(st)
    ensure_plain(meta, METADATA_KEY)
    flow.metadata[METADATA_KEY] = st.published = meta


_PLAIN_SCALARS = (str, int, float, bool, bytes, type(None))


def ensure_plain(value: Any, path: str) -> None:
    """Raise TypeError if `value` holds anything but str/int/float/bool/bytes/None/list/dict."""
    if isinstance(value, _PLAIN_SCALARS):
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            ensure_plain(item, f"{path}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{path}: metadata keys must be strings")
            ensure_plain(item, f"{path}.{key}")
        return
    raise TypeError(f"{path}: {type(value).__name__} cannot be saved in flow metadata")
