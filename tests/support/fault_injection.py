"""A mitmdump script for tests: makes the guarded hook named in `x-test-fault` raise.

Loaded after addons/gateway.py (`-s tests/support/fault_injection.py`). The request header
`x-test-fault: Class.hook` (e.g. `ProxyHardening.requestheaders`) makes that hook raise inside the
real fail-closed wrapper. CONNECT requests carry no custom headers, so there the proxy user name
(`HTTPS_PROXY=http://Class.hook:x@...`) names the hook.
"""

import base64
import binascii
from typing import Any

from sluicegate.mitm import guard


class InjectedFault(RuntimeError):
    pass


def inject(where: str, flow: Any) -> None:
    request = getattr(flow, "request", None)
    if request is None:
        return
    target = request.headers.get("x-test-fault")
    auth = request.headers.get("proxy-authorization", "")
    if target is None and auth.lower().startswith("basic "):
        try:
            target = base64.b64decode(auth[6:]).decode().split(":", 1)[0]
        except (binascii.Error, UnicodeDecodeError):
            target = None
    if target == where:
        # The text mimics data an exception might carry; it must never reach the client or log.
        raise InjectedFault("leaky-exception-text-SHOULD-NOT-APPEAR")


guard.fault_injector = inject
