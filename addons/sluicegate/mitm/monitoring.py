"""Monitoring: health, readiness and metrics; structured JSON logs; audit lines pushed out.

After the Recorder in the chain, observing only (it never changes or refuses a flow, and a
failure here is logged, never raised into mitmproxy): every finished flow is counted
(`monitoring/metrics.py`) and, with `monitoring.json_log`, written as one JSON line.

    GET /healthz   200 while the process serves (the event loop answers)
    GET /readyz    200 when the config is loaded and every addon of the chain configured, a flow
                   could be recorded now (directory, free space, last write) and the state
                   backend is reachable; 503 naming what is not
    GET /metrics   Prometheus text format

They are served on the monitoring listener (`monitoring.listen_host/port`, which may be exposed:
it serves nothing else and no secret) and on the control listener (`/healthz`... beside `/v1`).
`monitoring.audit_webhook` pushes every audit line (flows and people's actions) as it is written.
`monitoring.traces` exports a span per finished flow to an OTLP/HTTP collector
(`monitoring/traces.py`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Set
from typing import Any

from mitmproxy import ctx, http

from sluicegate import config as config_mod
from sluicegate.control.listener import ControlListener, Request, Response
from sluicegate.mitm import flowstate, guard
from sluicegate.mitm.base import GatewayAddon
from sluicegate.monitoring.jsonlog import JsonLog, JsonLogHandler, flow_line
from sluicegate.monitoring.metrics import CONTENT_TYPE, GatewayMetrics
from sluicegate.monitoring.push import AuditPush
from sluicegate.monitoring.traces import TraceExporter, flow_span
from sluicegate.recording.facts import decision, rules_fired
from sluicegate.recording.store import RecordingUnavailable

logger = logging.getLogger("sluicegate.monitoring")

RECORDER = "sluicegate-recorder"
GATEWAY_LOGGER = "sluicegate"


class Operations:
    """What outlives an addon instance (script reloads): the metrics, the readiness sources."""

    def __init__(self) -> None:
        self.metrics = GatewayMetrics()
        self.state_runtime: Any = None  # the Policy addon's Runtime (its `.state`)
        self.addon: Monitoring | None = None
        self.metrics.gauge(
            "sluicegate_holds_waiting",
            "Held flows of this replica waiting for an approver.",
            self._holds_waiting,
        )
        self.metrics.gauge(
            "sluicegate_state_available",
            "1 when the state backend (memory or Redis) is reachable, else 0.",
            lambda: 1.0 if self._state_available() else 0.0,
        )

    def _holds_waiting(self) -> float:
        state = self.state_runtime.state if self.state_runtime is not None else None
        return float(len(state.waiting_here)) if state is not None else 0.0

    def _state_available(self) -> bool:
        state = self.state_runtime.state if self.state_runtime is not None else None
        return state is None or bool(state.available)

    # -- handlers (mounted on both listeners) ------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return Response.json(405, {"error": "method_not_allowed"})
        return Response.json(200, {"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return Response.json(405, {"error": "method_not_allowed"})
        checks = self.checks()
        ready = all(v == "ok" or v == "disabled" for v in checks.values())
        return Response.json(200 if ready else 503, {"ready": ready, "checks": checks})

    async def metrics_handler(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return Response.json(405, {"error": "method_not_allowed"})
        return Response(200, [("content-type", CONTENT_TYPE)], self.metrics.registry.render())

    def checks(self) -> dict[str, str]:
        configured = guard.chain_is_live() and all(
            getattr(addon, "config", True) is not None for addon in list(guard._live)
        )
        checks = {"config": "ok" if configured else "not_loaded"}
        recorder = _recorder()
        store = getattr(recorder, "store", None)
        if recorder is None or getattr(recorder, "config", None) is None:
            checks["recording"] = "not_loaded"
        elif store is None:
            checks["recording"] = "disabled"
        else:
            try:
                store.ready(max_age=0)  # a probe asks now, not a second ago
                checks["recording"] = "ok"
            except RecordingUnavailable as e:
                checks["recording"] = e.code
        checks["state"] = "ok" if self._state_available() else "unavailable"
        return checks


OPS = Operations()


def _recorder() -> Any:
    try:
        return ctx.master.addons.get(RECORDER)
    except Exception:
        return None


class Monitoring(GatewayAddon):
    name = "sluicegate-monitoring"

    def __init__(self, ops: Operations | None = None) -> None:
        self.ops = ops or OPS
        self.section: config_mod.MonitoringSection | None = None
        self.listener: ControlListener | None = None
        self.json_log: JsonLog | None = None
        self.handler: JsonLogHandler | None = None
        self.push: AuditPush | None = None
        self.traces: TraceExporter | None = None
        self._traces_section: config_mod.TracesSection | None = None
        self._running = False

    # -- lifecycle ----------------------------------------------------------------------------

    def apply(self, config: config_mod.Config) -> None:
        previous, section = self.section, config.monitoring
        self.section = section
        self.ops.addon = self
        self._logs(section)
        self._audit_push(section)
        self._traces(section)
        if self._running and _listen(previous) != _listen(section):
            self._start_listener()

    def configure(self, updated: Set[str]) -> None:
        super().configure(updated)
        # The Recorder (before us) may have opened a new audit log: follow it.
        self._attach_push()

    def running(self) -> None:
        self._running = True
        self._start_listener()

    def done(self) -> None:
        self._running = False
        self._stop_listener()
        self._logs(None)
        if self.push is not None:
            self.push.close()
            self.push = None
        self._traces(None)
        super().done()

    def _start_listener(self) -> None:
        self._stop_listener()
        section = self.section
        if section is None:
            return
        listener = ControlListener(section.listen_host, section.listen_port)
        listener.mount("/healthz", self.ops.healthz)
        listener.mount("/readyz", self.ops.readyz)
        listener.mount("/metrics", self.ops.metrics_handler)
        try:
            port = listener.start()
        except OSError as e:
            logger.error(
                "sluicegate: monitoring listener cannot listen on %s:%s (%s)",
                section.listen_host,
                section.listen_port,
                e.strerror or type(e).__name__,
            )
            return
        self.listener = listener
        logger.info(
            "sluicegate: monitoring listening at http://%s:%s (/healthz /readyz /metrics)",
            section.listen_host,
            port,
        )

    def _stop_listener(self) -> None:
        if self.listener is not None:
            self.listener.stop()
            self.listener = None

    def _logs(self, section: config_mod.MonitoringSection | None) -> None:
        path = section.json_log if section is not None else None
        if self.json_log is not None and (path is None or path != self.json_log.path):
            if self.handler is not None:
                logging.getLogger(GATEWAY_LOGGER).removeHandler(self.handler)
            self.json_log.close()
            self.json_log = self.handler = None
        if path is not None and self.json_log is None:
            self.json_log = JsonLog(path)
            self.handler = JsonLogHandler(self.json_log)
            logging.getLogger(GATEWAY_LOGGER).addHandler(self.handler)

    def _audit_push(self, section: config_mod.MonitoringSection | None) -> None:
        hook = section.audit_webhook if section is not None else None
        if self.push is not None:
            self.push.close()
            self.push = None
        if hook is not None:
            metrics = self.ops.metrics
            self.push = AuditPush(
                hook.url,
                timeout=hook.timeout_seconds,
                retries=hook.retries,
                queue_size=hook.queue_size,
                on_sent=metrics.audit_pushed.inc,
                on_dropped=lambda n: metrics.audit_push_dropped.inc(n),
            )
        self._attach_push()

    def _traces(self, section: config_mod.MonitoringSection | None) -> None:
        wanted = section.traces if section is not None else None
        if wanted is not None and wanted == self._traces_section and self.traces is not None:
            return  # a reload that leaves `traces` alone keeps the queued spans
        self._traces_section = wanted
        if self.traces is not None:
            self.traces.close()
            self.traces = None
        if wanted is not None:
            metrics = self.ops.metrics
            self.traces = TraceExporter(
                wanted.endpoint,
                service_name=wanted.service_name,
                queue_size=wanted.queue_size,
                batch_size=wanted.batch_size,
                timeout=wanted.timeout_seconds,
                flush_seconds=wanted.flush_seconds,
                on_exported=lambda n: metrics.trace_spans_exported.inc(n),
                on_dropped=lambda reason, n: metrics.trace_spans_dropped.inc(n, reason=reason),
            )

    def _attach_push(self) -> None:
        audit = getattr(_recorder(), "audit", None)
        if audit is not None:
            audit.on_commit = self.push.line_written if self.push is not None else None

    # -- flows --------------------------------------------------------------------------------

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None:
            self._observe(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._observe(flow)

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        self._observe(flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._observe(flow)

    def _observe(self, flow: http.HTTPFlow) -> None:
        try:
            st = flowstate.state(flow)
            if st.monitored:
                return
            st.monitored = True
            sg = flow.metadata.get("sluicegate")
            sg = dict(sg) if isinstance(sg, dict) else {"request_id": st.request_id}
            errored = flow.error is not None
            outcome = decision(sg, errored)
            status = flow.response.status_code if flow.response is not None else None
            timings = sg.get("timings")
            if not (isinstance(timings, dict) and "total_ms" in timings):
                end = time.time()
                if flow.response is not None and flow.response.timestamp_end:
                    end = flow.response.timestamp_end
                sg["timings"] = {"total_ms": (end - flow.request.timestamp_start) * 1000.0}
            self.ops.metrics.observe_flow(sg, status, outcome)
            if self.traces is not None:
                end = time.time()
                if flow.response is not None and flow.response.timestamp_end:
                    end = flow.response.timestamp_end
                self.traces.add(
                    flow_span(
                        sg,
                        method=flow.request.method,
                        status=status,
                        decision=outcome,
                        start=flow.request.timestamp_start,
                        end=end,
                        errored=errored,
                        traceparent=flow.request.headers.get("traceparent"),
                    )
                )
            if self.json_log is not None:
                self.json_log.write(
                    flow_line(
                        sg,
                        method=flow.request.method,
                        host=flow.request.host,
                        path=flow.request.path,
                        status=status,
                        decision=outcome,
                        rules=rules_fired(sg),
                        error=errored,
                    )
                )
        except Exception:
            logger.exception("sluicegate: monitoring could not observe flow %s", flow.id)


def _listen(section: config_mod.MonitoringSection | None) -> tuple[str, int] | None:
    return None if section is None else (section.listen_host, section.listen_port)
