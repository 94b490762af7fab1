"""Policy: block, hold for approval, redact or rate-limit flows (chain position 4).

Runs after CallerAuth and Routing (so the caller and route are known) and before Redaction and
CredentialInjection (so a blocked or held request has not been rewritten or given a credential;
with `connection_strategy=lazy`, nothing has been sent upstream either).

Request side (`request` hook): the first matching rule decides (engine/policy.py); a block is a
403 naming the rule; anything not blocked counts against the matching rate limits (429 with
Retry-After); a hold waits for an approver while other flows keep flowing; redact_only rewrites
what the rule's patterns matched.

Response side (`response` hook): buffered responses are checked whole and blocked with 403 (not
502: SDKs retry 5xx, which would re-run the request upstream), held, or redacted, before the agent
sees a byte. Streamed responses (text/event-stream) are released incrementally by the streaming
addon, which checks released text with the flow's `ResponsePolicy` (left in
`flowstate.state(flow).response_policy`) and cuts the stream with a final SSE error
event when a rule matches; `hold` and `redact_only` act as block on streams. This hook records
that decision.

Decisions go into `flow.metadata["sluicegate"]["policy"]` (recordings) and the log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import socket
from collections.abc import Callable
from typing import Any, TypeVar

from mitmproxy import connection, http

from sluicegate import runtime as builders
from sluicegate.approvals.server import ControlServer
from sluicegate.approvals.service import Approvals
from sluicegate.approvals.webhook import WebhookNotifier
from sluicegate.config import ApprovalsSection, Config, McpSection, StateSection
from sluicegate.mitm import flowstate, guard
from sluicegate.mitm import mcp as mcp_flows
from sluicegate.mitm.base import GatewayAddon
from sluicegate.mitm.console import WIRING as CONSOLE
from sluicegate.mitm.monitoring import OPS
from sluicegate.mitm.routing import judged_path
from sluicegate.policy import engine
from sluicegate.policy import mcp as mcp_policy
from sluicegate.policy.conditions import FlowContext
from sluicegate.policy.decisions import (
    Action,
    Decision,
    Phase,
    PolicyError,
    ScanTimeout,
)
from sluicegate.policy.redact_only import redact_body
from sluicegate.policy.views import BodyViews
from sluicegate.redaction import bodies
from sluicegate.shapes import decoding
from sluicegate.shapes import mcp as mcp_shapes
from sluicegate.state import ApprovalRequest, SharedState, StateUnavailable, request_digest

logger = logging.getLogger("sluicegate.policy")

RULE_HEADER = "x-sluicegate-policy-rule"
# Bodies larger than this are scanned on a worker thread (the `regex` module releases the GIL),
# so one large upload does not stall every other flow on the event loop.
THREAD_SCAN_BYTES = 256 * 1024

T = TypeVar("T")


class Runtime:
    """State that outlives an addon instance: the shared-state backend and the approvals service.

    Package modules survive hot reloads of the `-s` script, so a reload (or a config change)
    neither forgets held flows nor resets anyone's rate limit. A changed `state:` section builds a
    new backend; the old one is closed once no request waits on it any more.
    """

    def __init__(self, replica: str | None = None) -> None:
        self.replica = replica or f"{socket.gethostname()}:{os.getpid()}"
        self.state: SharedState | None = None
        self.section: StateSection | None = None
        self.approvals: Approvals | None = None
        self._started: asyncio.Future[None] | None = None

    def configure(self, section: StateSection) -> SharedState:
        if self.state is None or section != self.section:
            old = self.state
            self.state = builders.build_state(section, self.replica)
            self.section = section
            self._started = None
            if self.approvals is None:
                self.approvals = Approvals(self.state)
            else:
                self.approvals.state = self.state
            if old is not None:
                _spawn(_close_when_idle(old))
            logger.info("sluicegate: state: %s backend (replica %s)", self.state.kind, self.replica)
        return self.state

    async def ready(self) -> SharedState:
        """The backend, started once on the running loop (a store that is down is no error:
        its users get StateUnavailable until it returns)."""
        assert self.state is not None
        loop = asyncio.get_running_loop()
        if self._started is None or self._started.get_loop() is not loop:
            self._started = loop.create_task(self.state.start())
        await asyncio.shield(self._started)
        return self.state


async def _close_when_idle(state: SharedState) -> None:
    while state.waiting_here:
        await asyncio.sleep(1.0)
    await state.close()


def _spawn(coro: Any) -> None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        coro.close()
        return
    task = loop.create_task(coro)
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)


_TASKS: set[asyncio.Task[Any]] = set()
STATE_RETRY_AFTER = "5"


SHARED = Runtime()


def flow_context(flow: http.HTTPFlow) -> FlowContext:
    st = flowstate.state(flow)
    caller = st.caller
    return FlowContext(
        subject=caller.subject if caller else None,
        issuer=caller.issuer if caller else None,
        groups=frozenset(caller.groups) if caller else frozenset(),
        route=st.route,
        host=flow.request.host,
        port=flow.request.port,
        method=flow.request.method.upper(),
        path=judged_path(flow),
    )


class Policy(GatewayAddon):
    def __init__(self, runtime: Runtime | None = None) -> None:
        self.runtime = runtime or SHARED
        self.engine: engine.Policy | None = None
        self.approvals: ApprovalsSection | None = None
        self.server: ControlServer | None = None
        self.webhook: WebhookNotifier | None = None
        self.max_body_bytes = 0
        self.preview: PreviewRedaction | None = None
        self.mcp = McpSection()
        self.mcp_routes: frozenset[str] = frozenset()
        self._running = False

    # -- lifecycle --------------------------------------------------------------------------------

    def apply(self, config: Config) -> None:
        self.engine = builders.build_policy(config.policy)
        self.max_body_bytes = config.gateway.max_body_bytes
        self.mcp = config.mcp
        self.mcp_routes = frozenset(r.name for r in config.routes if r.mcp)
        previous, approvals = self.approvals, config.approvals
        self.approvals = approvals
        self.runtime.configure(config.state)
        OPS.state_runtime = self.runtime  # readiness and metrics read the state backend
        service = self.runtime.approvals
        assert service is not None
        self.webhook = None
        if approvals is not None and approvals.webhook_url is not None:
            self.webhook = WebhookNotifier(
                approvals.webhook_url, approvals.webhook_timeout_seconds, approvals.webhook_format
            )
        service.notifier = self.webhook
        if approvals is not None:
            service.link_template = approvals.approval_url
            service.retry_grace_seconds = approvals.retry_grace_seconds
        self.preview = None
        if approvals is not None and approvals.preview_chars > 0:
            self.preview = PreviewRedaction(config, approvals.preview_chars)
        CONSOLE.configure(config, service, self.runtime.replica)
        if self._running:
            _spawn(self.runtime.ready())
            if _listen_settings(previous) != _listen_settings(approvals):
                self._start_server()

    def running(self) -> None:
        self._running = True
        _spawn(self.runtime.ready())
        self._start_server()

    def done(self) -> None:
        self._running = False
        self._stop_server()
        super().done()

    def _start_server(self) -> None:
        self._stop_server()
        settings = self.approvals
        if settings is None:
            return
        assert self.runtime.approvals is not None
        server = ControlServer(
            self.runtime.approvals,
            host=settings.listen_host,
            port=settings.listen_port,
            admin_token=settings.admin_token,
            max_grant_minutes=settings.max_grant_minutes,
            require_reason=settings.require_reason,
            audit=CONSOLE.audit,
        )
        try:
            port = server.start()
        except OSError as e:
            # At start-up an error log makes mitmdump exit; later, held flows get 503.
            logger.error(
                "sluicegate: approvals API cannot listen on %s:%s (%s); held flows are refused",
                settings.listen_host,
                settings.listen_port,
                e.strerror or type(e).__name__,
            )
            return
        server.mount("/console", CONSOLE)
        server.mount("/healthz", OPS.healthz)
        server.mount("/readyz", OPS.readyz)
        server.mount("/metrics", OPS.metrics_handler)
        self.server = server
        logger.info("sluicegate: approvals API listening at http://%s:%s", server.host, port)
        if CONSOLE.console is not None:
            logger.info("sluicegate: console at http://%s:%s/console/", server.host, port)

    def _stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def client_disconnected(self, client: connection.Client) -> None:
        """A client that went away while held: cancel its approvals (mitmproxy fires this even
        while our request hook is still waiting; the flow's `error` hook only comes after)."""
        service = self.runtime.approvals
        cancelled = service.cancel_client(client.id) if service is not None else 0
        if cancelled:
            logger.info("sluicegate: client gone, %d held flow(s) cancelled", cancelled)

    # -- request side -------------------------------------------------------------------------

    @guard.fail_closed("policy_error")
    async def request(self, flow: http.HTTPFlow) -> None:
        try:
            await self._request(flow)
        except guard.GatewayRefusal as refusal:
            if not mcp_flows.answer_refusal(flow, refusal):
                raise

    async def _request(self, flow: http.HTTPFlow) -> None:
        policy = self.engine
        assert policy is not None
        ctx = flow_context(flow)
        content = b""
        ctype = flow.request.headers.get("content-type")
        mcp_route = ctx.route in self.mcp_routes
        # Whatever the content type says: a server may read the body as JSON-RPC anyway.
        read_mcp = flow.request.method == "POST" and (mcp_route or policy.mcp_may_apply(ctx))
        if read_mcp or policy.request_needs_body(ctx):
            content = self._content(flow.request, Phase.REQUEST)
        mcp_body = None
        if read_mcp or b'"jsonrpc"' in content:
            mcp_body = mcp_flows.read_request(content, ctype, mcp_route=mcp_route)
        facts = _facts(flow)
        if mcp_body is not None:
            flowstate.state(flow).mcp = mcp_policy.McpFlow(body=mcp_body)
            mcp_flows.record(flow, **mcp_flows.request_facts(flow, mcp_body))
            if mcp_route and self.mcp.pin_tools and mcp_body.tools:
                await self._changed_tools(flow, ctx, mcp_body, facts)
        ctxs = mcp_policy.contexts(ctx, mcp_body)
        decision = await _scan(
            len(content), mcp_policy.decide, policy, ctxs, lambda: BodyViews.of(content, ctype)
        )
        if mcp_body is not None:
            mcp_flows.record(flow, decision=str(decision.action))
            ctx = ctxs[0]  # response rules and approvals see the (first) message's method/tool
        decision = await self._decided(flow, ctx, decision, facts)
        if decision.action is Action.BLOCK:
            raise guard.GatewayRefusal(
                403,
                "policy_blocked",
                f"Blocked by {decision.describe()}",
                {RULE_HEADER: decision.rule_id},
            )
        hits = policy.rate_limit_hits(ctx)
        denied = None
        if hits:
            state = await self._state(decision)
            try:
                denied = await state.acquire(hits)
            except StateUnavailable:
                raise _state_refusal(decision, "its rate limits") from None
        if denied is not None:
            limit = policy.rate_limit(denied.limit_id)
            facts["rate_limit"] = {
                "id": denied.limit_id,
                "retry_after": int(denied.retry_after_header),
            }
            _publish(flow, facts)
            logger.info(
                "sluicegate: rate limit %s exceeded by %s [request %s]",
                denied.limit_id,
                ctx.identity,
                flow.id,
            )
            message = (
                f"Rate limit {denied.limit_id!r} exceeded "
                f"({limit.limit.requests} requests per {limit.limit.window_seconds:g} s). "
                f"Retry after {denied.retry_after_header} s."
            )
            raise guard.GatewayRefusal(
                429,
                "rate_limited",
                f"{message} {limit.message}".strip(),
                {"retry-after": denied.retry_after_header, RULE_HEADER: denied.limit_id},
            )
        if decision.action is Action.HOLD:
            await self._hold(flow, ctx, decision, facts)
        elif decision.action is Action.REDACT_ONLY:
            facts["request"]["redacted"] = await self._redact(flow.request, decision)
            _publish(flow, facts)

        exempt: list[str] = []
        holds = [
            r.id
            for r in policy.response_rules
            if r.action is Action.HOLD and r.when.context_matches(ctx)
        ]
        if holds:  # only then can a grant change the response rules of this flow
            state = await self._state(decision)
            try:
                exempt = await state.granted(ctx.identity, ctx.destination, holds)
            except StateUnavailable:
                raise _state_refusal(decision, "its grants") from None
        response_policy = policy.response_policy(ctx, exempt)
        if response_policy is not None:
            flowstate.state(flow).response_policy = response_policy
        if mcp_body is not None and mcp_shapes.TOOLS_LIST in mcp_body.methods:
            await self._judge_tools_list(flow, ctx, mcp_route, decision)
        elif mcp_route and flow.request.method == "GET":
            # The server's own stream: a resumed stream may replay a `tools/list` answer.
            await self._judge_tools_list(flow, ctx, mcp_route, decision)

    # -- MCP ---------------------------------------------------------------------------------------

    async def _changed_tools(
        self, flow: http.HTTPFlow, ctx: FlowContext, body: mcp_shapes.McpBody, facts: dict[str, Any]
    ) -> None:
        """A `tools/call` of a tool whose definition changed since it was pinned: blocked, or
        held until an approver accepts the new definition (`mcp.on_tool_change`)."""
        probe = Decision(Action.HOLD, mcp_policy.TOOL_CHANGED_RULE, "", Phase.REQUEST)
        state = await self._state(probe)
        try:
            pins = await state.tool_pins(ctx.destination)
        except StateUnavailable:
            raise _state_refusal(probe, "its MCP tool pins") from None
        for tool in dict.fromkeys(body.tools):
            fingerprint = pins.changed.get(tool)
            if fingerprint is None:
                continue
            message = (
                f"The MCP tool {tool!r} on {ctx.destination} changed its description or input "
                "schema since it was pinned; an approver must accept the new definition."
            )
            action = Action.HOLD if self.mcp.on_tool_change == "hold" else Action.BLOCK
            decision = Decision(action, mcp_policy.TOOL_CHANGED_RULE, message, Phase.REQUEST)
            tool_ctx = dataclasses.replace(ctx, mcp_method=mcp_shapes.TOOLS_CALL, mcp_tool=tool)
            mcp_flows.record(flow, tool_changed=tool)
            decision = await self._decided(flow, tool_ctx, decision, facts)
            if decision.action is Action.BLOCK:
                raise guard.GatewayRefusal(
                    403,
                    "policy_blocked",
                    f"Blocked by {decision.describe()}",
                    {RULE_HEADER: decision.rule_id},
                )
            if decision.action is Action.HOLD:
                await self._hold(flow, tool_ctx, decision, facts)
                try:
                    await state.accept_tool(ctx.destination, tool, fingerprint)
                except StateUnavailable:
                    raise _state_refusal(decision, "its MCP tool pins") from None
                logger.info(
                    "sluicegate: MCP tool %s on %s: new definition accepted [request %s]",
                    tool,
                    ctx.destination,
                    flow.id,
                )
                mcp_flows.record(flow, tool_accepted=tool)
            facts["tool_change"] = facts.pop("request")
            _publish(flow, facts)

    async def _judge_tools_list(
        self, flow: http.HTTPFlow, ctx: FlowContext, mcp_route: bool, decision: Decision
    ) -> None:
        """Prepare the judge of this `tools/list` answer: the caller's rules, and the pins of
        the destination (read now: the stream that may carry the answer cannot wait)."""
        policy = self.engine
        assert policy is not None
        pins = None
        if mcp_route and self.mcp.pin_tools:
            state = await self._state(decision)
            try:
                pins = (await state.tool_pins(ctx.destination)).pinned
            except StateUnavailable:
                raise _state_refusal(decision, "its MCP tool pins") from None
        verdicts: dict[str, bool] = {}

        def allowed(tool: str) -> bool:
            if tool not in verdicts:
                verdicts[tool] = mcp_policy.may_call(policy, ctx, tool)
            return verdicts[tool]

        judge = mcp_policy.ToolListJudge(allowed, pins)
        st = flowstate.state(flow)
        st.mcp = st.mcp or mcp_policy.McpFlow()
        st.mcp.judge = judge
        st.mcp.stream_filter = mcp_flows.StreamFilter(judge)

    async def _tools_listed(self, flow: http.HTTPFlow) -> None:
        """After a `tools/list` answer: pin what was new, note what changed, record."""
        st = flowstate.state(flow)
        judge = st.mcp.judge if st.mcp is not None else None
        if judge is None or flow.response is None:
            return
        if not flow.response.stream:
            mcp_flows.judge_answer(flow, judge)
        if judge.pins is not None and (judge.new or judge.changed):
            ctx = flow_context(flow)
            probe = Decision(Action.ALLOW, mcp_policy.TOOL_CHANGED_RULE, "", Phase.RESPONSE)
            state = await self._state(probe)
            try:
                await state.pin_tools(ctx.destination, judge.new, judge.changed)
            except StateUnavailable:
                raise _state_refusal(probe, "its MCP tool pins") from None
            if judge.changed:
                logger.warning(
                    "sluicegate: MCP tools on %s changed since pinned, withheld: %s [request %s]",
                    ctx.destination,
                    ", ".join(sorted(judge.changed)),
                    flow.id,
                )
        if judge.judged:
            mcp_flows.record(flow, **judge.facts())

    # -- response side --------------------------------------------------------------------------

    @guard.fail_closed("policy_error")
    async def response(self, flow: http.HTTPFlow) -> None:
        st = flowstate.state(flow)
        if st.mcp is not None and st.mcp.judge is not None:
            await self._tools_listed(flow)
        response_policy = st.response_policy
        if response_policy is None or flow.response is None:
            return
        facts = _facts(flow)
        if flow.response.stream:
            # Released piece by piece by the streaming addon, which asked response_policy.
            if response_policy.stream_decisions:
                first = response_policy.stream_decisions[0]
                facts["response"] = {**first.as_metadata(), "streamed": True}
                _publish(flow, facts)
            elif response_policy.streams_started == 0:
                # Too late to stop anything; make the gap visible in the log and the recording.
                logger.error(
                    "sluicegate: response rules did not see streamed response [request %s]",
                    flow.id,
                )
                facts["response"] = {"unchecked_stream": True}
                _publish(flow, facts)
            return
        content = self._content(flow.response, Phase.RESPONSE)
        views = BodyViews.of(content, flow.response.headers.get("content-type"))
        decision = await _scan(len(content), response_policy.decide, views)
        if decision is None or decision.action is Action.ALLOW:
            return
        ctx = flow_context(flow)
        decision = await self._decided(flow, ctx, decision, facts)
        if decision.action is Action.BLOCK:
            raise guard.GatewayRefusal(
                403,
                "policy_blocked",
                f"The response was blocked by {decision.describe()}",
                {RULE_HEADER: decision.rule_id},
            )
        if decision.action is Action.HOLD:
            await self._hold(flow, ctx, decision, facts)
        elif decision.action is Action.REDACT_ONLY:
            facts["response"]["redacted"] = await self._redact(flow.response, decision)
            _publish(flow, facts)

    # -- shared steps -----------------------------------------------------------------------------

    async def _state(self, decision: Decision) -> SharedState:
        try:
            return await self.runtime.ready()
        except StateUnavailable:
            raise _state_refusal(decision, "shared state") from None

    async def _decided(
        self, flow: http.HTTPFlow, ctx: FlowContext, decision: Decision, facts: dict[str, Any]
    ) -> Decision:
        """Record a decision (a hold covered by a grant becomes allow) and log the notable."""
        phase_facts = decision.as_metadata()
        if decision.action is Action.HOLD:
            state = await self._state(decision)
            try:
                grant = await state.grant(_grant_key(ctx, decision))
            except StateUnavailable:
                raise _state_refusal(decision, "its approval") from None
            if grant is not None:
                phase_facts.update(action=str(Action.ALLOW), grant=grant.as_metadata())
                decision = Decision(
                    Action.ALLOW, decision.rule_id, decision.message, decision.phase
                )
        facts[str(decision.phase)] = phase_facts
        _publish(flow, facts)
        if decision.action is not Action.ALLOW or "grant" in phase_facts:
            logger.info(
                "sluicegate: policy %s %s by %s%s [request %s, caller %s, %s %s%s]",
                decision.phase,
                phase_facts["action"],
                decision.rule_id,
                " (grant)" if "grant" in phase_facts else "",
                flow.id,
                ctx.identity,
                ctx.method,
                ctx.destination,
                ctx.path,
            )
        return decision

    async def _hold(
        self, flow: http.HTTPFlow, ctx: FlowContext, decision: Decision, facts: dict[str, Any]
    ) -> None:
        """Wait for an approver. Returns when approved; raises a 403 refusal otherwise."""
        phase_facts = facts[str(decision.phase)]
        settings = self.approvals
        if settings is None or self.server is None or not self.server.listening:
            raise guard.GatewayRefusal(
                503,
                "approvals_unavailable",
                f"Held by {decision.describe()}, but the approvals service is not running.",
                {RULE_HEADER: decision.rule_id},
            )
        service = self.runtime.approvals
        assert service is not None
        await self._state(decision)
        request = ApprovalRequest(
            request_id=flowstate.state(flow).request_id,
            rule_id=decision.rule_id,
            message=decision.message,
            phase=str(decision.phase),
            subject=ctx.subject,
            issuer=ctx.issuer,
            groups=tuple(sorted(ctx.groups)),
            route=ctx.route,
            host=ctx.host,
            port=ctx.port,
            method=ctx.method,
            path=ctx.path,
            patterns=decision.patterns,
            grant_key=_grant_key(ctx, decision),
            **(await self._preview(flow, decision.phase)),
        )
        try:
            resolution = await service.hold(
                request,
                dedupe=_same_request(flow, ctx, decision),
                timeout=settings.timeout_seconds,
                client_id=flow.client_conn.id,
            )
        except StateUnavailable:
            raise _state_refusal(decision, "its approval") from None
        phase_facts["approval"] = resolution.as_metadata()
        _publish(flow, facts)
        if resolution.approved:
            return
        held = f"It was held by {decision.describe()}"
        if resolution.outcome == "denied":
            code, message = "approval_denied", f"An approver denied this ({resolution.reason})."
        elif resolution.outcome == "timeout":
            code = "approval_timeout"
            message = (
                f"No approver decided within {settings.timeout_seconds:g} seconds, so the "
                "request was not forwarded. Sending it again holds it for approval again."
            )
        else:
            code, message = (
                "approval_cancelled",
                f"The approval was cancelled ({resolution.reason}).",
            )
        raise guard.GatewayRefusal(403, code, f"{message} {held}", {RULE_HEADER: decision.rule_id})

    async def _preview(self, flow: http.HTTPFlow, phase: Phase) -> dict[str, Any]:
        """The held body's start, redacted, for approvers (`ApprovalRequest.preview`)."""
        message = flow.request if phase is Phase.REQUEST else flow.response
        if message is None:
            return {}
        try:
            content = self._content(message, phase)
        except guard.GatewayRefusal:
            return {"preview": "(body not shown: it cannot be decoded)"}
        if not content or self.preview is None:
            return {"body_bytes": len(content)}
        st = flowstate.state(flow)
        try:
            text = await _scan(
                len(content),
                self.preview.text,
                content,
                message.headers.get("content-type"),
                phase,
                st.caller,
                list(st.scrub),
            )
        except Exception:  # a preview never holds up (or fails) the hold itself
            logger.exception("sluicegate: approval preview failed [request %s]", flow.id)
            text = "(body not shown: it could not be redacted)"
        return {"preview": text, "body_bytes": len(content)}

    async def _redact(self, message: http.Message, decision: Decision) -> int:
        """redact_only: replace what the rule's patterns found; block what stays findable."""
        assert self.engine is not None
        rule = self.engine.rule(decision.rule_id)
        phase = decision.phase
        content = self._content(message, phase)
        ctype = message.headers.get("content-type")
        tag = f"[REDACTED:policy:{rule.id}]"
        timeout = self.engine.scan_timeout
        try:
            new, count = await _scan(
                len(content),
                redact_body,
                content,
                ctype,
                rule.when.body_patterns,
                tag,
                timeout,
            )
            still = await _scan(len(new), rule.when.body_matches, BodyViews.of(new, ctype), timeout)
        except PolicyError as e:
            raise guard.GatewayRefusal(
                403,
                "policy_blocked",
                f"Blocked by {decision.describe()} (the content could not be redacted: {e})",
                {RULE_HEADER: rule.id},
            ) from None
        if still is not None:
            raise guard.GatewayRefusal(
                403,
                "policy_blocked",
                f"Blocked by {decision.describe()} (the content could not be fully redacted)",
                {RULE_HEADER: rule.id},
            )
        message.content = new
        return count

    def _content(self, message: http.Message, phase: Phase) -> bytes:
        """The decoded body, or a refusal: too large (checked while decoding, so a compression
        bomb never expands past the limit), or an encoding we cannot undo."""
        too_large = guard.GatewayRefusal(
            413 if phase is Phase.REQUEST else 502,
            "body_too_large",
            "The body is too large for the gateway to inspect.",
        )
        raw = message.raw_content or b""
        if len(raw) > self.max_body_bytes:
            raise too_large
        try:
            return decoding.decode_body(
                raw, message.headers.get("content-encoding"), self.max_body_bytes
            )
        except decoding.BodyTooLarge:
            raise too_large from None
        except decoding.DecodingError:
            raise guard.GatewayRefusal(
                400 if phase is Phase.REQUEST else 502,
                "policy_undecodable_body",
                "The body's content encoding could not be decoded for inspection.",
            ) from None


PREVIEW_SSE_SECONDS = 2.0


class PreviewRedaction:
    """Redacted, bounded previews of held bodies, for approvers.

    The whole body is redacted first and the result cut afterwards (cutting first could split a
    secret so that no rule sees it). The rules apply whatever `redaction.requests/responses`
    say (a preview is for people, not for the upstream), a response also loses every encoding of
    the flow's injected key, bodies of unknown type are redacted as text, and binary bodies are
    not shown at all."""

    def __init__(self, config: Config, chars: int) -> None:
        redaction = dataclasses.replace(
            config.redaction,
            requests=True,
            responses=True,
            binary_bodies="block",
            worker_processes=0,  # previews are bounded and rare: no worker processes
        )
        # `replace` drops the pack compiled at validation (not an init field): keep it, so the
        # preview uses the same rules (not the rule files read again) and shares their
        # compiled indexes.
        object.__setattr__(redaction, "pack", config.redaction.pack)
        self.runtime = builders.build_redaction(dataclasses.replace(config, redaction=redaction))
        # A buffered event stream runs through the SSE engine, slow on adversarial deltas: a
        # preview stops at PREVIEW_SSE_SECONDS ("not shown") rather than holding up the hold.
        self.policy = bodies.BodyPolicy(
            binary="block", unknown="text", sse_budget_seconds=PREVIEW_SSE_SECONDS
        )
        self.chars = chars

    def text(
        self, content: bytes, ctype: str | None, phase: Phase, caller: Any, scrub: list[Any]
    ) -> str:
        runtime = self.runtime
        redactor: Any
        if phase is Phase.REQUEST:
            redactor = runtime.request_text_redactor(caller)
        else:
            redactor = runtime.response_text_redactor(caller, scrub)
        try:
            result = bodies.redact_body(content, ctype, redactor, self.policy)
        except bodies.BodyRefused as e:
            return f"({len(content)} bytes, not shown: {e.code})"
        text = result.body.decode("utf-8", "replace")
        if len(text) > self.chars:
            text = text[: self.chars] + " [...]"
        return text


def _state_refusal(decision: Decision, what: str) -> guard.GatewayRefusal:
    return guard.GatewayRefusal(
        503,
        "state_unavailable",
        f"The gateway's shared state is unavailable, and this request needs {what} "
        f"({decision.describe()}); nothing was forwarded. Retry later.",
        {"retry-after": STATE_RETRY_AFTER},
    )


def _same_request(flow: http.HTTPFlow, ctx: FlowContext, decision: Decision) -> str:
    """What makes a retry the same request: caller, route, method, path (with its query), body,
    and which rule held it in which phase."""
    body = hashlib.sha256(flow.request.raw_content or b"").hexdigest()
    return request_digest(
        ctx.identity,
        ctx.destination,
        ctx.method,
        flow.request.path,
        flow.request.headers.get("content-encoding", ""),
        body,
        str(decision.phase),
        decision.rule_id,
    )


def _grant_key(ctx: FlowContext, decision: Decision) -> tuple[str, str, str]:
    return (ctx.identity, ctx.destination, decision.rule_id)


def _listen_settings(settings: ApprovalsSection | None) -> tuple[Any, ...] | None:
    if settings is None:
        return None
    return (
        settings.listen_host,
        settings.listen_port,
        settings.admin_token,
        settings.max_grant_minutes,
    )


def _facts(flow: http.HTTPFlow) -> dict[str, Any]:
    """This flow's policy facts so far (the request phase's), to add the response phase to."""
    return flowstate.state(flow).facts.setdefault("policy", {})


def _publish(flow: http.HTTPFlow, facts: dict[str, Any]) -> None:
    flowstate.record(flow, "policy", facts)


async def _scan(size: int, fn: Callable[..., T], *args: Any) -> T:
    """Run a body scan, off the event loop when the body is large. Scan timeouts refuse."""
    try:
        if size > THREAD_SCAN_BYTES:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)
    except ScanTimeout:
        raise guard.GatewayRefusal(
            422,
            "policy_uninspectable_body",
            "The gateway could not inspect this body within its time budget; nothing was "
            "forwarded.",
        ) from None
