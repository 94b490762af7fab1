"""sluicegate: the full gateway chain.

Run: `mitmdump -s addons/gateway.py --set sluicegate_config=PATH`.

The order is fixed and matters (mitmproxy calls each hook on addons in list order):

1. ProxyHardening       refuse unsafe mitmproxy options; refuse all traffic without a valid config
2. CallerAuth           verify the caller's token (CONNECT / requestheaders); strip it
   BaseUrl              base-URL listener (if configured): map the path's prefix to its route's
                        upstream, so Routing and everything after see an ordinary request
3. Routing              match the verified upstream to a route; egress allowlist; group check
4. Policy               block / hold for approval / redact / rate-limit, request and response side
5. Redaction            redact buffered bodies (and the request query), both directions
6. StreamRedaction      redact text/event-stream responses while they stream
7. WebSockets           refuse WebSocket upgrades unless the route allows them; redact messages
8. MessageParts         path, headers, cookies, trailers, reason phrase; upgrades, transfer codings
9. CredentialInjection  inject the hidden credential last; conceal it once the request has left
10. Recorder            write every finished flow (as the agent saw it, secrets masked); the last
                        addon that may change a flow
11. Monitoring          observes only: metrics, health and readiness, JSON logs, audit push

The addons are thin adapters (addons/sluicegate/mitm/) over engines that import no mitmproxy;
they depend on each other's per-flow state, so they run as this chain, not one by one.
"""

from sluicegate.mitm.auth import CallerAuth
from sluicegate.mitm.base_url import BaseUrl
from sluicegate.mitm.credentials import CredentialInjection
from sluicegate.mitm.hardening import ProxyHardening
from sluicegate.mitm.monitoring import Monitoring
from sluicegate.mitm.parts import MessageParts
from sluicegate.mitm.policy import Policy
from sluicegate.mitm.recorder import Recorder
from sluicegate.mitm.redaction import Redaction
from sluicegate.mitm.routing import Routing
from sluicegate.mitm.streaming import StreamRedaction
from sluicegate.mitm.websockets import WebSockets

addons = [
    ProxyHardening(),
    CallerAuth(),
    BaseUrl(),
    Routing(),
    Policy(),
    Redaction(),
    StreamRedaction(),
    WebSockets(),
    MessageParts(),
    CredentialInjection(),
    Recorder(),  # last of the addons that act on flows
    Monitoring(),  # observes finished flows only
]
