"""The demo upstream of the dev gateway (`scripts/dev.sh run`); see sluicegate/mitm/demo.py.

Load it before the chain:
`mitmdump -s addons/demo.py --set sluicegate_demo=DIR -s addons/gateway.py ...`.
"""

from sluicegate.mitm.demo import DemoUpstreamAddon

addons = [DemoUpstreamAddon()]
