"""A mitmdump script for fault tests: reports what the gateway process still holds.

Loaded after addons/gateway.py (`-s tests/support/state_probe.py`). A request that passed the chain
and has the path `/__sluicegate_state__` is answered here, before it reaches any upstream, with
JSON: flows with gateway state, streams and WebSockets alive, flows the recorder has in flight,
open client connections, and the process's resident memory. Tests use it to prove that aborted and
failed flows release what they held.
"""

from __future__ import annotations

import gc
import json
import os
from typing import Any

from mitmproxy import ctx, http

from sluicegate.mitm import flowstate
from sluicegate.mitm.streaming import StreamSession

PATH = "/__sluicegate_state__"


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _state(probe: http.HTTPFlow) -> dict[str, Any]:
    gc.collect()
    sessions = [obj for obj in gc.get_objects() if isinstance(obj, StreamSession)]
    recorder: Any = ctx.master.addons.get("sluicegate-recorder")
    assert recorder is not None, "the state probe is loaded after the gateway chain"
    proxyserver: Any = ctx.master.addons.get("proxyserver")
    return {
        "flows": sum(1 for flow in list(flowstate._states.keys()) if flow is not probe),
        "stream_sessions": len(sessions),
        "live_stream_pipelines": sum(1 for s in sessions if s._pipeline is not None),
        "recorder_in_flight": sum(1 for f in recorder.in_flight.values() if f is not probe),
        "connections": len(proxyserver.connections) if proxyserver is not None else None,
        "rss": rss_bytes(),
    }


def request(flow: http.HTTPFlow) -> None:
    if flow.response is None and flow.request.path == PATH:
        body = json.dumps(_state(flow)).encode()
        flow.response = http.Response.make(200, body, {"content-type": "application/json"})
