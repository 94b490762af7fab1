"""Service operations: Prometheus metrics, health and readiness answers, structured JSON logs
and the audit-line push. Engines only (no mitmproxy); `mitm/monitoring.py` wires them."""
