"""A mitmdump script for tests: writes what a recorder would see of each finished flow.

Loaded after addons/gateway.py (`-s tests/support/flow_probe.py`), so it runs after the chain,
where the recorder sits. Appends one JSON line per finished flow (response, error, refused
CONNECT) to the file named by $SLUICEGATE_TEST_PROBE: request line and headers, response status and
headers, and `flow.metadata["sluicegate"]`. Tests grep it for secrets and check the metadata.
"""

import json
import os
from typing import Any

from mitmproxy import http


def _dump(flow: http.HTTPFlow, event: str) -> None:
    entry: dict[str, Any] = {
        "event": event,
        "method": flow.request.method,
        "host": flow.request.host,
        "path": flow.request.path,
        "request_headers": [[k, v] for k, v in flow.request.headers.items(multi=True)],
        "status": flow.response.status_code if flow.response else None,
        "response_headers": (
            [[k, v] for k, v in flow.response.headers.items(multi=True)] if flow.response else []
        ),
        "metadata": flow.metadata.get("sluicegate"),
    }
    with open(os.environ["SLUICEGATE_TEST_PROBE"], "a", encoding="utf-8") as out:
        out.write(json.dumps(entry, default=repr) + "\n")


def response(flow: http.HTTPFlow) -> None:
    _dump(flow, "response")


def error(flow: http.HTTPFlow) -> None:
    _dump(flow, "error")


def http_connect_error(flow: http.HTTPFlow) -> None:
    _dump(flow, "http_connect_error")
