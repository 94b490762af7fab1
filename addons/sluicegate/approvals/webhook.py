"""Webhook notifications of approvals (failures are logged, never blocking).

What is sent (generic JSON, Slack blocks or a Teams Adaptive Card) is `payloads.py`'s; when, the
service's: a new approval once (however many retries join it), and its end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
from typing import Any

from sluicegate.approvals.payloads import Format, Notice, payload
from sluicegate.secrets import SecretRef, SecretUnavailable

logger = logging.getLogger("sluicegate.approvals")


class WebhookNotifier:
    """POSTs each notice to a URL. Fire and forget: failures are only logged."""

    def __init__(self, url: SecretRef, timeout: float, fmt: Format = "json") -> None:
        self.url = url
        self.timeout = timeout
        self.format = fmt
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, notice: Notice) -> None:
        self.notify(notice)

    def notify(self, notice: Notice) -> None:
        body = payload(notice, self.format)
        task = asyncio.get_running_loop().create_task(
            self._post(notice.approval.id, notice.event, body)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, approval_id: str, event: str, body: dict[str, Any]) -> None:
        try:
            url = self.url.read()
            status = await asyncio.to_thread(post_json, url, body, self.timeout)
        except (SecretUnavailable, OSError, ValueError) as e:
            # Never the URL: chat webhook URLs embed their credential.
            logger.warning(
                "sluicegate: approvals webhook (%s) for %s failed: %s",
                event,
                approval_id,
                type(e).__name__,
            )
            return
        if not 200 <= status < 300:
            logger.warning(
                "sluicegate: approvals webhook (%s) for %s answered %s", event, approval_id, status
            )


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
