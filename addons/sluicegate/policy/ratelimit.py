"""Sliding-window rate limits: at most `requests` admitted per key within any `window_seconds`.

A sliding log (one timestamp per admitted request) rather than fixed windows: fixed windows admit
up to twice the limit across a window boundary, and a gateway limit is often a cost or
exfiltration control where that matters. Memory is one float per admitted request still inside
its window, so limits are meant for per-identity budgets (tens to thousands per window), not for
counting bytes.

Pure and synchronous (no mitmproxy, no asyncio): the caller passes a clock, tests pass a fake one.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Callable, Sequence


@dataclasses.dataclass(frozen=True)
class Limit:
    """A budget: `requests` per `window_seconds`, counted separately for every key."""

    id: str
    requests: int
    window_seconds: float

    def __post_init__(self) -> None:
        if self.requests < 1:
            raise ValueError("requests must be at least 1")
        if not self.window_seconds > 0:
            raise ValueError("window_seconds must be positive")


@dataclasses.dataclass(frozen=True)
class Denied:
    """A request over a limit: retry after `retry_after` seconds (when a slot frees up)."""

    limit_id: str
    retry_after: float

    @property
    def retry_after_header(self) -> str:
        """Whole seconds for `Retry-After`, rounded up so a client that obeys it is admitted."""
        return str(max(1, math.ceil(self.retry_after)))


class RateLimiter:
    """Admits or denies requests against any number of limits, all-or-nothing.

    A request that is denied by one limit consumes nothing from the others, so being throttled on
    one budget never drains another. Denied requests are not counted: a client that keeps retrying
    gets in again as soon as its oldest admitted request leaves the window.
    """

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000
    ) -> None:
        self._clock = clock
        self._max_keys = max_keys
        # (limit id, key) -> (window of that limit, timestamps of admitted requests, oldest first)
        self._logs: dict[tuple[str, str], tuple[float, collections.deque[float]]] = {}

    def acquire(self, hits: Sequence[tuple[Limit, str]]) -> Denied | None:
        """Count one request against every `(limit, key)`; None if admitted by all of them.

        When several limits deny, the longest wait is returned: retrying earlier is pointless.
        """
        now = self._clock()
        worst: Denied | None = None
        logs: list[collections.deque[float]] = []
        for limit, key in hits:
            log = self._log(limit, key, now)
            if log is None:  # table full of live keys: refuse rather than forget budgets
                return Denied(limit.id, limit.window_seconds)
            if len(log) >= limit.requests:
                wait = log[len(log) - limit.requests] + limit.window_seconds - now
                if worst is None or wait > worst.retry_after:
                    worst = Denied(limit.id, max(wait, 0.0))
            logs.append(log)
        if worst is not None:
            return worst
        for log in logs:
            log.append(now)
        return None

    def _log(self, limit: Limit, key: str, now: float) -> collections.deque[float] | None:
        slot = (limit.id, key)
        entry = self._logs.get(slot)
        if entry is None:
            if len(self._logs) >= self._max_keys:
                self.sweep()
                if len(self._logs) >= self._max_keys:
                    return None
            entry = (limit.window_seconds, collections.deque())
        # A reloaded config may have changed the window: the current limit's window applies.
        log = entry[1]
        self._logs[slot] = (limit.window_seconds, log)
        _trim(log, now - limit.window_seconds)
        return log

    def sweep(self) -> None:
        """Forget keys with no admitted request left in their window (bounds memory)."""
        now = self._clock()
        for slot, (window, log) in list(self._logs.items()):
            _trim(log, now - window)
            if not log:
                del self._logs[slot]

    def __len__(self) -> int:
        return len(self._logs)


def _trim(log: collections.deque[float], horizon: float) -> None:
    while log and log[0] <= horizon:
        log.popleft()
