"""Audit lines pushed to an HTTP collector as they are written (a SIEM's HTTP input).

Each line is POSTed as the JSON object it is in the audit log, in order, one at a time, by one
worker task; a failed POST (an error or a non-2xx answer) is retried `retries` times with
exponential back-off (0.5 s doubling, at most 30 s), then dropped and counted. Lines wait in a
bounded queue: when it is full the oldest is dropped (and counted). The audit log file is the
record; the push never blocks or fails a flow. The URL is a secret reference and never logged.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from collections.abc import Callable
from typing import Any

from sluicegate.approvals.webhook import post_json
from sluicegate.secrets import SecretRef, SecretUnavailable

logger = logging.getLogger("sluicegate.audit_push")

MAX_BACKOFF = 30.0


class AuditPush:
    def __init__(
        self,
        url: SecretRef,
        *,
        timeout: float,
        retries: int,
        queue_size: int,
        on_sent: Callable[[], None] = lambda: None,
        on_dropped: Callable[[int], None] = lambda n: None,
        post: Callable[[str, dict[str, Any], float], int] = post_json,
        first_backoff: float = 0.5,
    ) -> None:
        self.url, self.timeout, self.retries = url, timeout, retries
        self.queue: collections.deque[dict[str, Any]] = collections.deque()
        self.queue_size = queue_size
        self.on_sent, self.on_dropped, self._post = on_sent, on_dropped, post
        self.first_backoff = first_backoff
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def line_written(self, line: bytes) -> None:
        """Queue one written audit line (called by the audit log; never raises)."""
        try:
            entry = json.loads(line)
        except ValueError:
            return
        if len(self.queue) >= self.queue_size:
            self.queue.popleft()
            self.on_dropped(1)
        self.queue.append(entry)
        self._kick()

    def _kick(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop in this thread: the worker picks the line up when it runs
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._work())
        assert self._wake is not None
        self._wake.set()

    async def _work(self) -> None:
        assert self._wake is not None
        while not self._closed:
            if not self.queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            entry = self.queue[0]
            if await self._deliver(entry):
                self.on_sent()
            else:
                self.on_dropped(1)
            if self.queue and self.queue[0] is entry:
                self.queue.popleft()

    async def _deliver(self, entry: dict[str, Any]) -> bool:
        delay = self.first_backoff
        for attempt in range(self.retries + 1):
            try:
                status = await asyncio.to_thread(self._post, self.url.read(), entry, self.timeout)
                if 200 <= status < 300:
                    return True
                problem = f"answered {status}"
            except (SecretUnavailable, OSError, ValueError) as e:
                problem = type(e).__name__
            if attempt < self.retries:
                logger.warning(
                    "sluicegate: audit push failed (%s), retry %d of %d in %.1f s",
                    problem,
                    attempt + 1,
                    self.retries,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF)
        logger.error(
            "sluicegate: audit push gave up on line %s of run %s after %d attempt(s)",
            entry.get("seq"),
            entry.get("run"),
            self.retries + 1,
        )
        return False

    def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
