"""sluicegate: the full gateway chain.

Run: `mitmdump -s addons/gateway.py --set sluicegate_config=PATH`.

The order is fixed and matters (mitmproxy calls each hook on addons in list order):

1. ProxyHardening   refuse unsafe mitmproxy options; refuse all traffic without a valid config

Each addon also works on its own: `mitmdump -s addons/<concern>.py`.
"""

from sluicegate.addons.hardening import ProxyHardening

addons = [
    ProxyHardening(),
]
