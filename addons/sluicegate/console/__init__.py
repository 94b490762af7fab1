"""The web console for approvers and investigators, served at `/console` by the control
listener (`control/listener.py`, loopback; production puts the operator's reverse proxy or
`kubectl port-forward` in front).

- `app.py`: the routes (`Console`, mounted by the Policy addon when `console:` is configured);
- `auth.py`: signed session cookies, sign-in with the admin token or an approver's JWT,
  CSRF tokens, origin and host checks;
- `views.py`: server-rendered HTML (every value escaped); `static/`: the console's only CSS and
  JavaScript (no CDN, no framework);
- `recordings.py`: sessions on disk with their verification status, flows as recorded;
- `activity.py`: the activity feed the recorder publishes finished flows to (shared through
  the state backend, so every replica's console sees every replica's flows).

No mitmproxy here; the wiring is `mitm/console.py`.
"""

from sluicegate.console.activity import ActivityFeed
from sluicegate.console.app import Console, ConsoleSettings
from sluicegate.console.recordings import Recordings

__all__ = ["ActivityFeed", "Console", "ConsoleSettings", "Recordings"]
