"""Held flows waiting for an approver, over the shared state (`sluicegate.state`).

- `service.py`: `Approvals`: hold a request until it is decided (joining retries of the same
  request), expiry, withdrawal with a grace period for retries, decisions, notifications;
- `server.py`: the control API (loopback HTTP, admin token);
- `webhook.py` and `payloads.py`: notifications in generic JSON, Slack or Teams format.

The records themselves (`ApprovalRequest`, `Approval`, `Resolution`, `Grant`, ...) are the
state's, so a console can use `sluicegate.state` directly.
"""
