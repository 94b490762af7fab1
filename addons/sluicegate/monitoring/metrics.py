"""Prometheus metrics in the text exposition format, with no dependency.

Labels carry names the configuration chose (routes, rules, decisions, error codes) and HTTP
statuses, never a caller's identity, a host, a path or a value: nothing secret, and a bounded
number of series.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

Labels = tuple[tuple[str, str], ...]

LATENCY_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
MAX_SERIES = 10000  # per metric: beyond it new label sets are folded into one `other` series


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: Labels = ()) -> str:
    pairs = labels + extra
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value):
        return str(int(value))
    return repr(value)


class Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help_text, tuple(label_names)
        self._lock = threading.Lock()

    def _key(self, values: Mapping[str, Any]) -> Labels:
        return tuple((n, str(values.get(n, ""))) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:
        raise NotImplementedError


class Counter(Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, label_names)
        self.values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: Any) -> None:
        key = self._key(labels)
        with self._lock:
            if key not in self.values and len(self.values) >= MAX_SERIES:
                key = tuple((n, "other") for n in self.label_names)
            self.values[key] = self.values.get(key, 0.0) + amount

    def value(self, **labels: Any) -> float:
        return self.values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self.values.items())
        return [*self.header(), *(f"{self.name}{_labels(k)} {_number(v)}" for k, v in items)]


class Gauge(Metric):
    """A value read when scraped (`read()` returns it; labelled gauges: label dict -> value)."""

    kind = "gauge"

    def __init__(
        self,
        name: str,
        help_text: str,
        read: Callable[[], float | Iterable[tuple[Mapping[str, Any], float]]],
        label_names: Sequence[str] = (),
    ) -> None:
        super().__init__(name, help_text, label_names)
        self.read = read

    def render(self) -> list[str]:
        try:
            value = self.read()
        except Exception:
            return []  # a source gone (no state backend yet): no sample, not a broken scrape
        lines = self.header()
        if isinstance(value, int | float):
            lines.append(f"{self.name} {_number(float(value))}")
        else:
            for labels, v in value:
                lines.append(f"{self.name}{_labels(self._key(labels))} {_number(float(v))}")
        return lines


class Histogram(Metric):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        label_names: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        super().__init__(name, help_text, label_names)
        self.buckets = tuple(sorted(buckets))
        self.series: dict[Labels, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, **labels: Any) -> None:
        key = self._key(labels)
        with self._lock:
            if key not in self.series and len(self.series) >= MAX_SERIES:
                key = tuple((n, "other") for n in self.label_names)
            counts, totals = self.series.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
            counts[bisect.bisect_left(self.buckets, value)] += 1
            totals[0] += value

    def render(self) -> list[str]:
        lines = self.header()
        with self._lock:
            items = sorted((k, (list(c), t[0])) for k, (c, t) in self.series.items())
        for key, (counts, total) in items:
            running = 0
            for bound, n in zip([*self.buckets, math.inf], counts, strict=True):
                running += n
                le = (("le", _number(bound)),)
                lines.append(f"{self.name}_bucket{_labels(key, le)} {running}")
            lines.append(f"{self.name}_sum{_labels(key)} {_number(total)}")
            lines.append(f"{self.name}_count{_labels(key)} {running}")
        return lines


M = TypeVar("M", bound=Metric)


class Registry:
    def __init__(self) -> None:
        self.metrics: dict[str, Metric] = {}

    def add(self, metric: M) -> M:
        self.metrics[metric.name] = metric
        return metric

    def render(self) -> bytes:
        lines: list[str] = []
        for metric in self.metrics.values():
            lines += metric.render()
        return ("\n".join(lines) + "\n").encode()


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class GatewayMetrics:
    """The gateway's metrics. One per process: counts survive config reloads."""

    def __init__(self) -> None:
        self.registry = Registry()
        r = self.registry
        self.requests = r.add(
            Counter(
                "sluicegate_requests_total",
                "Finished flows by route, decision and response status.",
                ("route", "decision", "status"),
            )
        )
        self.redactions = r.add(
            Counter(
                "sluicegate_redactions_total",
                "Values redacted, by rule and direction.",
                ("rule", "direction"),
            )
        )
        self.policy_rules = r.add(
            Counter(
                "sluicegate_policy_decisions_total",
                "Policy rules that acted (block, hold, redact_only), by rule and outcome.",
                ("rule", "decision"),
            )
        )
        self.refusals = r.add(
            Counter(
                "sluicegate_refusals_total",
                "Flows the gateway answered itself, by error code and status.",
                ("code", "status"),
            )
        )
        self.stream_cuts = r.add(
            Counter("sluicegate_stream_cuts_total", "Streamed responses cut, by code.", ("code",))
        )
        self.recording_failures = r.add(
            Counter(
                "sluicegate_recording_failures_total",
                "Flows refused or withheld because they could not be recorded, by code.",
                ("code",),
            )
        )
        self.audit_push_dropped = r.add(
            Counter(
                "sluicegate_audit_push_dropped_total",
                "Audit lines the webhook push gave up on (after retries, or a full queue).",
            )
        )
        self.audit_pushed = r.add(
            Counter("sluicegate_audit_pushed_total", "Audit lines the webhook push delivered.")
        )
        self.trace_spans_exported = r.add(
            Counter(
                "sluicegate_trace_spans_exported_total",
                "Spans the OTLP trace export delivered to the collector.",
            )
        )
        self.trace_spans_dropped = r.add(
            Counter(
                "sluicegate_trace_spans_dropped_total",
                "Spans the OTLP trace export dropped, by reason (queue_full, export_failed).",
                ("reason",),
            )
        )
        self.latency = r.add(
            Histogram(
                "sluicegate_request_duration_seconds",
                "Time from the request's start to the end of the response, by route.",
                ("route",),
            )
        )

    def gauge(
        self, name: str, help_text: str, read: Callable[[], Any], labels: Sequence[str] = ()
    ) -> None:
        self.registry.add(Gauge(name, help_text, read, labels))

    def observe_flow(self, sg: Mapping[str, Any], status: int | None, decision: str) -> None:
        """Count one finished flow from its recordable facts (`metadata["sluicegate"]`)."""
        route = str(sg.get("route") or "")
        self.requests.inc(route=route, decision=decision, status=str(status or ""))
        redaction = sg.get("redaction")
        if isinstance(redaction, Mapping):
            for direction, counts in redaction.items():
                if isinstance(counts, Mapping):
                    for rule, n in counts.items():
                        if isinstance(n, int):
                            self.redactions.inc(n, rule=rule, direction=direction)
        policy = sg.get("policy")
        if isinstance(policy, Mapping):
            for phase in ("request", "response"):
                facts = policy.get(phase)
                if isinstance(facts, Mapping) and facts.get("action") not in (None, "allow"):
                    self.policy_rules.inc(rule=str(facts.get("rule")), decision=decision)
        refusal = sg.get("refusal")
        if isinstance(refusal, Mapping) and refusal.get("code"):
            code = str(refusal["code"])
            self.refusals.inc(code=code, status=str(refusal.get("status", "")))
            if code.startswith("recording_"):
                self.recording_failures.inc(code=code)
        stream = sg.get("stream")
        if isinstance(stream, Mapping) and stream.get("cut"):
            self.stream_cuts.inc(code=str(stream["cut"]))
        timings = sg.get("timings")
        if isinstance(timings, Mapping) and isinstance(timings.get("total_ms"), int | float):
            self.latency.observe(float(timings["total_ms"]) / 1000.0, route=route)
