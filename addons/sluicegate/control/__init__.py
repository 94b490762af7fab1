"""The control listener: the gateway's own loopback HTTP server (`listener.py`).

The approvals API (`approvals/server.py`, at `/v1`) and the web console (`console/`, at
`/console`) are mounted on it by path prefix; more endpoints mount the same way.
"""

from sluicegate.control.listener import ControlListener, Handler, Request, Response

__all__ = ["ControlListener", "Handler", "Request", "Response"]
