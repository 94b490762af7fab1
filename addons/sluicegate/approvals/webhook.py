"""Webhook notification of new pending approvals (failures are logged, never blocking)."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
from typing import Any

from sluicegate.approvals.registry import Pending
from sluicegate.secrets import SecretRef, SecretUnavailable

logger = logging.getLogger("sluicegate.approvals")


class WebhookNotifier:
    """POSTs each new pending approval to a URL. Fire and forget: failures are only logged."""

    def __init__(self, url: SecretRef, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self._tasks: set[asyncio.Task[None]] = set()

    def notify(self, pending: Pending) -> None:
        payload = {
            "event": "approval_pending",
            "approval": pending.as_json(),
            "approve": f"python -m sluicegate approvals approve {pending.id} --reason ...",
            "deny": f"python -m sluicegate approvals deny {pending.id} --reason ...",
        }
        task = asyncio.get_running_loop().create_task(self._post(pending.id, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, approval_id: str, payload: dict[str, Any]) -> None:
        try:
            url = self.url.read()
            status = await asyncio.to_thread(post_json, url, payload, self.timeout)
        except (SecretUnavailable, OSError, ValueError) as e:
            # Never the URL: chat webhook URLs embed their credential.
            logger.warning(
                "sluicegate: approvals webhook for %s failed: %s", approval_id, type(e).__name__
            )
            return
        if not 200 <= status < 300:
            logger.warning("sluicegate: approvals webhook for %s answered %s", approval_id, status)


def post_json(url: str, payload: dict[str, Any], timeout: float) -> int:
    """POST JSON without any proxy from the environment (it may point at this gateway)."""
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"content-type": "application/json", "user-agent": "sluicegate-approvals"},
        method="POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
